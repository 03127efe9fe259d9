"""``spin-kernels plan``: the per-GPU memory of a SPIN iteration moment by moment, what fits, and
what one iteration costs in time.

    spin-kernels plan llama3-70b --gpus 8 --gpu-memory 80 --token-budget 8192
    spin-kernels plan path/to/config.json --gpus 4 --lora --reference lora-disabled
    spin-kernels plan llama3-70b --gpus 1 --lora --quantize nf4 --no-recommend
    spin-kernels plan llama3-8b --gpus 8 --time --prompts 50000 --gpu-type h100

Prints the moments of the requested configuration (forward, backward, optimizer step, reference
pass, generation), its peak and the term that sets it, and, unless --no-recommend, the cheapest
configuration that fits (see ``spin_kernels.memory.recommend``), each that fits with the exact
``spin-kernels iterate`` / ``torchrun`` command that runs it (``--data`` and the model directory of a
config.json path filled in; the recommended run writes to ``<--output-dir>-recommended``, so the two
printed commands never share a run directory). ``--time`` adds the time and GPU-hours of one
iteration by stage (``spin_kernels.memory.cost``). Exit status: 0 when the requested or a
recommended configuration fits, 1 when nothing fits, 2 on bad options.
"""

from __future__ import annotations

import argparse
import os
import sys

from .commands import launch_command
from .cost import DEVICES, DataSize, estimate_time
from .estimate import plan, recommend
from .models import PRESETS
from .options import ATTENTION, DEVICES as BACKENDS, LOSS_IMPLS, OPTIMIZER_IMPLS, OPTIMIZER_STATES, REFERENCE_MODES
from .options import PlanOptions


def build_parser() -> argparse.ArgumentParser:
    d = PlanOptions()
    ap = argparse.ArgumentParser(prog="spin-kernels plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("model", help=f"a preset ({', '.join(PRESETS)}), a config.json path or a model directory")
    ap.add_argument("--gpus", type=int, default=d.num_gpus, help="number of GPUs (the most recommend may use)")
    ap.add_argument("--gpu-memory", type=float, default=d.gpu_memory_gib, help="GiB per GPU")
    ap.add_argument("--device", choices=BACKENDS, default=d.device,
                    help="cuda (NCCL, foreach optimizer step) or cpu (gloo, the CPU paths)")
    ap.add_argument("--token-budget", type=int, default=d.token_budget, help="packed tokens per micro-batch per GPU")
    ap.add_argument("--max-seqlen", type=int, default=d.max_seqlen, help="longest prompt+response")
    ap.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    ap.add_argument("--lora-rank", type=int, default=d.lora_rank)
    ap.add_argument("--quantize", choices=("none", "nf4"), default=d.quantize, help="nf4: QLoRA (with --lora)")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATES), default=d.optimizer)
    ap.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS, default=d.optimizer_impl,
                    help="torch's step: default = what the trainer runs (foreach on CUDA, for-loop on CPU/offload)")
    ap.add_argument("--no-mixed-precision", action="store_true", help="compute in the parameters' dtype")
    ap.add_argument("--param-bytes", type=int, choices=(2, 4), default=d.param_bytes,
                    help="bytes per stored (master) parameter")
    ap.add_argument("--cpu-offload", action="store_true")
    ap.add_argument("--no-activation-checkpointing", action="store_true")
    ap.add_argument("--share-prompt", action="store_true", help="the shared-prompt layout")
    ap.add_argument("--reference", choices=REFERENCE_MODES, default=d.reference_mode)
    ap.add_argument("--gen-batch", type=int, default=d.gen_batch, help="prompts per generate call per GPU")
    ap.add_argument("--prompt-len", type=int, default=d.prompt_len)
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--attention", choices=ATTENTION, default=d.attention)
    ap.add_argument("--loss-impl", choices=LOSS_IMPLS, default=d.loss_impl)
    ap.add_argument("--host-memory", type=float, default=d.host_memory_gib, help="GiB of host memory per node")
    ap.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node,
                    help="more GPUs than this: one torchrun per node (c10d rendezvous at HEAD_NODE)")
    ap.add_argument("--no-recommend", action="store_true", help="only the requested configuration")
    ap.add_argument("--data", default="DATA.jsonl", help="data file written into the printed command")
    ap.add_argument("--output-dir", default="runs/spin", help="run directory written into the printed command")
    t = ap.add_argument_group("time and cost (--time)")
    t.add_argument("--time", action="store_true", help="estimate one iteration's time and GPU-hours by stage")
    t.add_argument("--prompts", type=int, default=50_000, help="prompts per iteration")
    t.add_argument("--prompt-tokens", type=float, default=DataSize(1).prompt_tokens, help="mean prompt length")
    t.add_argument("--real-tokens", type=float, default=DataSize(1).real_tokens, help="mean real-response length")
    t.add_argument("--epochs", type=int, default=DataSize(1).epochs)
    t.add_argument("--gpu-type", choices=sorted(DEVICES), default="h100", help="device rates (published peaks)")
    t.add_argument("--mfu", type=float, help="share of peak FLOP/s reached (default 0.40)")
    t.add_argument("--price-per-gpu-hour", type=float, help="add a cost in dollars")
    return ap


def _model_dir(model: str) -> str:
    """The --model of the printed command: the directory of a config.json, else a placeholder."""
    if os.path.isfile(model):
        return os.path.dirname(model) or "."
    return os.path.isdir(model) and model or f"PATH/TO/{model}"


def print_command(p, args: argparse.Namespace, output_dir: str) -> None:
    command, why = launch_command(p.options, model=_model_dir(args.model), data=args.data, output_dir=output_dir)
    print(f"command: {command}" if command else f"command: none: not a trainer configuration ({why})")


def options_from_args(args: argparse.Namespace) -> PlanOptions:
    return PlanOptions(
        num_gpus=args.gpus, gpu_memory_gib=args.gpu_memory, device=args.device, token_budget=args.token_budget,
        max_seqlen=args.max_seqlen, finetune="lora" if args.lora or args.quantize == "nf4" else "full",
        lora_rank=args.lora_rank, quantize=args.quantize, optimizer=args.optimizer,
        optimizer_impl=args.optimizer_impl, mixed_precision=None if args.no_mixed_precision else "bf16",
        param_bytes=args.param_bytes, cpu_offload=args.cpu_offload,
        activation_checkpointing=not args.no_activation_checkpointing, share_prompt=args.share_prompt,
        reference_mode=args.reference, gen_batch=args.gen_batch, prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens, attention=args.attention, loss_impl=args.loss_impl,
        host_memory_gib=args.host_memory, gpus_per_node=args.gpus_per_node)


def print_time(p, args: argparse.Namespace) -> None:
    data = DataSize(args.prompts, args.prompt_tokens, args.real_tokens, epochs=args.epochs)
    overrides = {k: v for k, v in (("mfu", args.mfu), ("price_per_hour", args.price_per_gpu_hour)) if v is not None}
    print(estimate_time(p, data, args.gpu_type, **overrides).table())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        opts = options_from_args(args)
        requested = plan(args.model, opts)
    except ValueError as exc:
        print(f"spin-kernels plan: error: {exc}", file=sys.stderr)
        return 2
    print("requested configuration")
    print(requested.table())
    if requested.fits:
        print_command(requested, args, args.output_dir)
    if args.time and (requested.fits or args.no_recommend):
        print_time(requested, args)
    if args.no_recommend:
        return 0 if requested.fits else 1
    best = recommend(args.model, opts, max_gpus=args.gpus)
    print()
    if best is None:
        print(f"nothing fits on up to {args.gpus} x {args.gpu_memory:g} GiB, even with CPU offload, "
              f"activation checkpointing and a token budget of one pair")
        return 1
    print("recommended (cheapest that fits: no offload, fewest GPUs, largest token budget, no AC, "
          "largest generation batch)")
    print(best.table())
    print_command(best, args, f"{args.output_dir}-recommended")
    if args.time:
        print_time(best, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
