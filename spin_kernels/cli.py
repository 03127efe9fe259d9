"""The ``spin-kernels`` command: SPIN stages, the whole loop, and the demos.

    spin-kernels generate  --model SFT --data data.jsonl --output generated.jsonl
    spin-kernels reference --model SFT --input generated.jsonl --output pairs.jsonl
    spin-kernels train     --model SFT --input pairs.jsonl --output-dir out
    spin-kernels iterate   --model SFT --data data.jsonl --output-dir run --iterations 3
    torchrun --nproc_per_node 8 -m spin_kernels.cli iterate ...   (FSDP2 over 8 processes)
    spin-kernels demo      (tiny CPU SPIN run on a known distribution, nothing to download)
    spin-kernels ops-demo  (the fused loss alone on a realistic shape)
    spin-kernels plan      (per-GPU memory of a SPIN iteration and what fits; spin_kernels.memory)

Options come from the dataclasses of spin_kernels.training.config: a YAML file (``--config``)
and flags (spin_kernels.training.flags, on transformers.HfArgumentParser); flags win. Bad values
name the field that holds them.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

PAPER = ("Defaults are the paper's (Chen et al. 2024, arXiv 2401.01335, released configs): beta 0.1, lr 5e-7, "
         "RMSprop, linear schedule with warm-up ratio 0.1, global batch 64 pairs, 2 epochs, max length 1024 / "
         "prompt 512, sampling at temperature 1.0 / top_p 1.0 with 256 new tokens. The sampler is the fastest that writes "
         "the same rows: continuous batching, prompts sorted by length, per-example seeds, a slot count chosen for "
         "the device (--generation-seeding batch: the original sampler, hf generate on batches of 16).")

# Each command: its help, the config fields it uses (None: the whole section), its own arguments.
LENGTHS = ("max_length", "max_prompt_length", "on_stale")
COMMANDS: dict[str, dict] = {
    "generate": {"help": "(1) sample one synthetic response per prompt with the model (resumable JSONL)",
                 "sections": {"model": None, "data": None, "generation": None, "distributed": None},
                 "args": {"--output": "JSONL written row by row (rows already there are kept)"}},
    "reference": {"help": "(2) add the model's log-probs of real and synthetic responses (ref_logps)",
                  "sections": {"model": None, "data": LENGTHS,
                               "training": ("token_budget", "share_prompt", "impl", "average_log_prob", "bf16"),
                               "distributed": None},
                  "args": {"--input": "JSONL from the previous stage", "--output": "JSONL of the pairs with ref_logps"}},
    "train": {"help": "(3) train the main player on pairs with ref_logps (resumable)",
              "sections": {"model": None, "data": LENGTHS, "training": None,
                           "loop": ("output_dir", "tensorboard", "resume"), "distributed": None},
              "args": {"--input": "JSONL from the previous stage"}},
    "iterate": {"help": "the whole SPIN loop: generate, reference, train, repeat for --iterations",
                "sections": {"model": None, "data": None, "generation": None, "training": None, "loop": None,
                             "distributed": None}},
    "demo": {"help": "SPIN on known Markov chains with a tiny Llama on CPU (a few minutes)",
             "description": "Runs SFT into a weak start, then SPIN iterations and an SFT control, and reports the "
                            "exact KL(p_data || p_theta) per iteration (spin_kernels/demo). The SPIN defaults below are "
                            "the demo's (tuned for a 77k-parameter model), not the paper's.",
             "sections": {"training": None, "generation": None,
                          "loop": ("output_dir", "iterations", "include_previous", "tensorboard", "resume")}},
}
#: Commands with parsers of their own, given the rest of the command line.
PASSTHROUGH_HELP = {"ops-demo": "the fused SPIN loss alone on a realistic shape (CPU)",
                    "plan": "per-GPU memory of a SPIN iteration and the cheapest configuration that fits"}


def top_parser() -> argparse.ArgumentParser:
    """``spin-kernels COMMAND ...``: the commands and their one-line help."""
    listing = "\n".join(f"  {name:<10} {text}" for name, text in
                        [*((n, c["help"]) for n, c in COMMANDS.items()), *PASSTHROUGH_HELP.items()])
    parser = argparse.ArgumentParser(prog="spin-kernels", description=__doc__, epilog=f"commands:\n{listing}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*COMMANDS, *PASSTHROUGH_HELP], metavar="COMMAND",
                        help="one of the commands below")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="its options (spin-kernels COMMAND --help)")
    return parser


def command_parser(command: str):
    """The parser of ``command``: the flags of its config sections (spin_kernels.training.flags,
    on transformers.HfArgumentParser) and its own arguments."""
    from .training.flags import SectionParser

    spec = COMMANDS[command]
    kwargs = {"prog": f"spin-kernels {command}", "description": spec.get("description", f"{spec['help']}. {PAPER}")}
    if command == "demo":
        from .demo.run import DemoConfig, demo_spin_defaults

        kwargs.update(base=demo_spin_defaults(), extra=(DemoConfig(),))
    parser = SectionParser(spec["sections"], **kwargs)
    for flag, text in spec.get("args", {}).items():
        parser.add_argument(flag, required=True, help=text)
    return parser


def _run(command: str, cfg, extra: list, args: argparse.Namespace) -> int:
    from .training import commands, loop

    if command == "demo":
        from .demo.run import run_demo

        run_demo(extra[0], cfg)
    elif command == "generate":
        rows = commands.run_generate(cfg, args.output)
        print(f"{len(rows)} synthetic responses in {args.output}")
    elif command == "reference":
        rows = commands.run_reference(cfg, args.input, args.output)
        print(f"{len(rows)} pairs with ref_logps in {args.output}")
    elif command == "train":
        print(f"final model: {commands.run_train(cfg, args.input, cfg.loop.output_dir)}")
    elif command == "iterate":
        loop.run_iterations(cfg)
    return 0


def _passthrough(name: str):
    if name == "ops-demo":
        from .demo.ops import main as run
    else:
        from .memory.cli import main as run
    return run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in PASSTHROUGH_HELP:
        return _passthrough(argv[0])(argv[1:])
    from .training.config import ConfigError
    from .training.trainer import TrainingError

    top = top_parser()
    if not argv:
        top.print_help()
        return 2
    command = top.parse_args(argv[:1]).command  # --help, or an unknown command, exits here
    try:
        cfg, *extra, args = command_parser(command).parse_args_and_config(argv[1:])
        _quiet_transformers()
        return _run(command, cfg.validate(), extra, args)
    except (ConfigError, FileNotFoundError, FileExistsError, TrainingError) as exc:
        code = 1 if isinstance(exc, TrainingError) else 2
        report_error(f"spin-kernels {command}: error: {exc}")
        return code
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            _torchelastic_error_file(f"{type(exc).__name__}: {exc}", traceback.format_exc())
        raise


def report_error(text: str) -> None:
    """Print an error once (rank 0 of a multi-process job) and, under torchrun, also give it to
    the launcher (its error file), whose failure summary then shows it as the root cause instead
    of a bare exit code."""
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr)
    _torchelastic_error_file(text, text)


def _torchelastic_error_file(message: str, callstack: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": callstack,
                                                                      "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass


def _quiet_transformers() -> None:
    """Our own progress bars say what runs; transformers' per-load bars only add noise. And
    bitsandbytes (imported by peft whenever it is installed) warns at import about an optional
    CPU kernel package that only its AVX512-BF16 inference path would use: the trainer keeps the
    differentiable 4-bit layout (spin_kernels/training/loading.py), so the warning is noise."""
    import logging as std_logging

    std_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(std_logging.ERROR)
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
