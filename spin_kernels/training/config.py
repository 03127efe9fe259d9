"""Configuration of a SPIN run: dataclasses, YAML loading and command-line flags.

One run is described by ``SpinConfig`` with four sections (``model``, ``data``,
``generation``, ``training``) plus the loop and the multi-process (``distributed``) options.
Values come, in increasing priority, from the dataclass defaults (the paper's,
../shared/docs/spin-math.md), a YAML file (nested sections, e.g. ``training: {beta: 0.1}``)
and command-line flags (``--beta 0.1``: every field name is unique across sections so that a
flag needs no section prefix).

Errors name the offending field (``training.beta``) and say what was expected; unknown fields
get a "did you mean" hint.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the field."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its --help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    model: str | None = _opt(None, "the starting (SFT) model: a directory written by save_pretrained",
                             required=True, metavar="DIR")
    tokenizer: str | None = _opt(None, "tokenizer directory; none: the model's", metavar="DIR")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = _opt(
        "float32", "dtype the weights are loaded and trained in (bf16 compute comes from --bf16 autocast)")
    device: str = _opt("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'...")


@dataclass
class DataConfig:
    data: str | None = _opt(None, "training data: a .jsonl/.json/.parquet file, a directory saved by "
                            "datasets.save_to_disk, or a datasets hub name already in the local cache",
                            required=True, metavar="PATH")
    split: str = _opt("train", "split to use when --data is a datasets dataset")
    prompt_field: str = _opt("prompt", "field holding the prompt (a string or chat messages)")
    real_field: str = _opt("real", "field holding the real (human/SFT) response")
    messages_field: str = _opt("messages", "chat field used when prompt/real are absent: first user turn = "
                               "prompt, first assistant turn = real (UltraChat-200k layout)")
    max_examples: int | None = _opt(None, "use only the first N examples (paper: 50k prompts)")
    max_length: int = _opt(1024, "max tokens of prompt + response; longer responses are cut (and lose "
                           "their EOS) (paper's released configs: 1024)")
    max_prompt_length: int = _opt(512, "max prompt tokens; longer prompts keep their end (released configs: 512)")
    on_stale: Literal["regenerate", "error"] = _opt(
        "regenerate", "rows of an existing output or run file made from other inputs (another prompt/response, "
        "model, sampling settings or length limits): regenerate them, or stop with an error naming them")


@dataclass
class GenerationConfig:
    max_new_tokens: int = _opt(256, "tokens sampled per synthetic response (paper: 256)")
    temperature: float = _opt(1.0, "sampling temperature (paper: 1.0)")
    top_p: float = _opt(1.0, "nucleus sampling top_p (paper: 1.0)")
    generation_batch_size: int = _opt(16, "prompts per generate() call (left-padded, KV cache)")
    generation_seed: int = _opt(1234, "seed of the sampler (each batch is seeded from it and its position)")
    backend: Literal["hf", "vllm"] = _opt("hf", "generation backend: Hugging Face generate or vLLM (if installed)")


@dataclass
class TrainingConfig:
    beta: float = _opt(0.1, "beta, the scale of the SPIN margin (paper: 0.1)")
    loss_type: Literal["sigmoid", "hinge"] = _opt("sigmoid", "SPIN loss: logistic (paper) or hinge")
    learning_rate: float = _opt(5e-7, "peak learning rate (paper: 5e-7 for 7B models)")
    optimizer: Literal["rmsprop", "adamw"] = _opt("rmsprop", "optimizer (paper: RMSprop, no weight decay)")
    weight_decay: float = _opt(0.0, "weight decay (paper: 0)")
    warmup_ratio: float = _opt(0.1, "fraction of the steps spent in linear warm-up (paper: 0.1)")
    epochs: int = _opt(2, "epochs over the iteration's pairs (paper: 2)")
    global_batch_pairs: int = _opt(64, "pairs per optimizer step (paper: global batch 64)")
    token_budget: int = _opt(8192, "max tokens of one packed micro-batch; a global batch is accumulated "
                             "over as many micro-batches as it needs")
    max_grad_norm: float | None = _opt(1.0, "gradient clipping norm (none to disable)")
    bf16: bool = _opt(True, "bf16 autocast on GPU (ignored on CPU)")
    gradient_checkpointing: bool = _opt(False, "recompute decoder activations in the backward (under FSDP: "
                                        "torch's checkpoint_wrapper around each sharded decoder layer)")
    average_log_prob: bool = _opt(False, "per-token mean log-probs instead of sums (paper: sums)")
    impl: Literal["auto", "torch", "triton", "cpu"] = _opt("auto", "fused loss implementation")
    seed: int = _opt(42, "seed of the data order and the model's RNG")
    save_every: int = _opt(50, "write a resumable checkpoint every N optimizer steps (0: only at the end)")
    log_every: int = _opt(1, "log metrics every N optimizer steps (>= 1)")


@dataclass
class LoopConfig:
    output_dir: str = _opt("runs/spin", "run directory (iterations, checkpoints, metrics, plots)", metavar="DIR")
    iterations: int = _opt(3, "SPIN iterations to run (paper: 4, iter0..iter3)")
    include_previous: bool = _opt(False, "from iteration 1 on, also train on the previous iteration's "
                                  "synthetic responses (as the released SPIN scripts do)")
    tensorboard: bool = _opt(False, "also log to TensorBoard (needs the tensorboard package)")
    resume: bool = _opt(False, "continue an interrupted run found in --output-dir")


@dataclass
class DistributedConfig:
    fsdp: bool | None = _opt(None, "shard the model with PyTorch FSDP2 over the processes started by torchrun "
                             "(torchrun --nproc_per_node K -m spin_kernels.cli ...): each rank generates and scores "
                             "its share of the prompts and trains on its share of every global batch; unset: on "
                             "exactly when WORLD_SIZE > 1")
    mixed_precision: Literal["auto", "bf16", "fp16", "none"] = _opt(
        "auto", "FSDP compute dtype (parameters all-gathered in it, fp32 master weights and gradient reduction); "
                "auto: bf16 on GPU when --bf16, else none (the weights' own dtype)")
    cpu_offload: bool = _opt(False, "FSDP: keep sharded parameters, gradients and optimizer states in host memory "
                             "(CPUOffloadPolicy; the optimizer step runs on the CPU)")
    reshard_after_forward: bool = _opt(True, "FSDP: free each layer's gathered parameters after its forward "
                                       "(ZeRO-3); no: keep them until the backward (more memory, less traffic)")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "generation": GenerationConfig,
    "training": TrainingConfig,
    "loop": LoopConfig,
    "distributed": DistributedConfig,
}


@dataclass
class SpinConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self, *, need: tuple[str, ...] = ()) -> SpinConfig:
        """Check value ranges; ``need`` lists dotted required fields for the caller (e.g. 'model.model')."""
        for name in need:
            sec, key = name.split(".")
            if getattr(getattr(self, sec), key) in (None, ""):
                raise ConfigError(f"{name}: required (flag --{key.replace('_', '-')} or '{key}' in "
                                  f"section '{sec}' of the YAML file)")
        t, g, d = self.training, self.generation, self.data
        positive = {"training.beta": t.beta, "training.learning_rate": t.learning_rate,
                    "training.epochs": t.epochs, "training.global_batch_pairs": t.global_batch_pairs,
                    "training.token_budget": t.token_budget, "training.log_every": t.log_every,
                    "data.max_length": d.max_length, "data.max_prompt_length": d.max_prompt_length,
                    "generation.max_new_tokens": g.max_new_tokens,
                    "generation.generation_batch_size": g.generation_batch_size,
                    "generation.temperature": g.temperature, "generation.top_p": g.top_p,
                    "loop.iterations": self.loop.iterations}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{name}: must be > 0, got {value}")
        for name, value in {"training.save_every": t.save_every, "training.weight_decay": t.weight_decay}.items():
            if value < 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")
        if d.max_examples is not None and d.max_examples < 1:
            raise ConfigError(f"data.max_examples: must be >= 1 or none, got {d.max_examples}")
        if not 0 <= t.warmup_ratio < 1:
            raise ConfigError(f"training.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
        if d.max_prompt_length >= d.max_length:
            raise ConfigError(f"data.max_prompt_length ({d.max_prompt_length}) must be < "
                              f"data.max_length ({d.max_length})")
        if g.top_p > 1:
            raise ConfigError(f"generation.top_p: must be in (0, 1], got {g.top_p}")
        if t.max_grad_norm is not None and t.max_grad_norm <= 0:
            raise ConfigError(f"training.max_grad_norm: must be > 0 or none, got {t.max_grad_norm}")
        return self

    def check_generation_fits(self) -> SpinConfig:
        """The sampled responses must fit the training length (the stages that generate call this):
        a prompt of up to max_prompt_length tokens plus max_new_tokens must not exceed max_length,
        else long synthetic responses would be cut (and lose their EOS) in training."""
        d, g = self.data, self.generation
        if d.max_prompt_length + g.max_new_tokens > d.max_length:
            raise ConfigError(f"generation.max_new_tokens ({g.max_new_tokens}): a prompt of up to "
                              f"data.max_prompt_length ({d.max_prompt_length}) tokens leaves "
                              f"{d.max_length - d.max_prompt_length} tokens of data.max_length ({d.max_length}) for "
                              f"the response, so longer synthetic responses would be cut in training; lower "
                              f"--max-new-tokens or raise --max-length")
        return self

    def check_trainable(self) -> SpinConfig:
        """Refuse settings that cannot train correctly (the stages that train call this).

        Half-precision *weights* cannot hold SPIN's updates: at lr 5e-7 an RMSprop/AdamW step
        changes a weight by ~1e-6 of its size, below bf16's resolution (2^-8), so a bf16 model
        silently stays where it started, and fp16 overflows (NaN from the second step). Half
        precision compute keeps float32 master weights: bf16 autocast (--bf16, on GPU) or FSDP's
        bf16 mixed precision. fp16 compute would need loss scaling, which the trainer does not do.
        """
        if self.model.dtype in ("float16", "bfloat16"):
            raise ConfigError(f"model.dtype: {self.model.dtype} weights cannot be trained correctly (updates "
                              f"below the dtype's resolution are lost; float16 overflows); train with "
                              f"--dtype float32 (master weights) and --bf16 (bf16 compute on GPU; under FSDP: "
                              f"--mixed-precision bf16). {self.model.dtype} is fine for generate and reference.")
        if self.distributed.mixed_precision == "fp16":
            raise ConfigError("distributed.mixed_precision: fp16 training needs loss scaling, which the trainer does "
                              "not do (gradients would underflow or overflow); use --mixed-precision bf16")
        return self


# --------------------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Return ``value`` checked (and, for int -> float, widened) against the annotation ``tp``.

    Strings are NOT parsed here (YAML already typed them); the command line parses with
    ``parse_flag`` first. Raises ConfigError naming ``name``.
    """
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except ConfigError:
                pass
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return [coerce(v, get_args(tp)[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads "5e-7" (no dot) as a string; take it as the float it spells.
        try:
            return float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if not ok:
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float:
        return _finite(float(value), name)
    return value


def _finite(value: float, name: str) -> float:
    """Every float option is a hyper-parameter that must be finite (inf/nan train a NaN model)."""
    if not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number, got {value}")
    return value


def parse_flag(text: str, tp: Any, name: str) -> Any:
    """Parse one command-line string into the annotation's type: ``none`` for optional fields,
    ints, floats (``5e-7``), comma-separated lists; anything else must be an accepted string."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if type(None) in get_args(tp) and text.strip().lower() in ("none", "null"):
            return None
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return parse_flag(text, arg, name)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1 and "must be" in str(errors[0]):  # the value parsed but is out of range
            raise errors[0]
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {text!r}")
    if origin is list:
        return [parse_flag(part.strip(), get_args(tp)[0], f"{name}[{i}]") for i, part in enumerate(text.split(","))]
    if tp is int or tp is float:
        try:
            value = tp(text)
        except ValueError:
            raise ConfigError(f"{name}: expected {_type_name(tp)}, got str {text!r}") from None
        return _finite(value, name) if tp is float else value
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "yes", "1", "false", "no", "0"):
            return low in ("true", "yes", "1")
    return coerce(text, tp, name)


def _accepts(tp: Any, kind: type) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_accepts(a, kind) for a in get_args(tp))
    if origin is Literal:
        return any(isinstance(a, kind) for a in get_args(tp))
    if kind is int and tp is float:
        return True
    return tp is kind


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(name: str, where: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}{name}: unknown field{hint}; known: {', '.join(sorted(known))}")


def config_from_dict(raw: dict[str, Any], base: SpinConfig | None = None) -> SpinConfig:
    """Build a SpinConfig from nested sections ``{section: {field: value}}`` over ``base``."""
    cfg = dataclasses.replace(base) if base is not None else SpinConfig()
    if raw is None:
        return cfg
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections {list(SECTIONS)}, got {type(raw).__name__}")
    for sec_name, values in raw.items():
        if sec_name not in SECTIONS:
            raise _unknown(str(sec_name), "", list(SECTIONS))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{sec_name}: expected a mapping of fields, got {type(values).__name__} {values!r}")
        cls = SECTIONS[sec_name]
        hints = _hints(cls)
        section = dataclasses.replace(getattr(cfg, sec_name))
        for key, value in values.items():
            if key not in hints:
                raise _unknown(str(key), f"{sec_name}.", list(hints))
            setattr(section, key, coerce(value, hints[key], f"{sec_name}.{key}"))
        setattr(cfg, sec_name, section)
    return cfg


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {path} is not valid YAML: {exc}") from exc
    return raw or {}


# --------------------------------------------------------------------------- argparse


def _metavar(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _metavar(inner[0]) if len(inner) == 1 else "VALUE"
    if get_origin(tp) is Literal:
        return "{" + ",".join(str(a) for a in get_args(tp)) + "}"
    return {int: "N", float: "X", str: "STR"}.get(tp, "VALUE")


def add_dataclass_flags(parser: argparse.ArgumentParser, prefix: str, cls: type, defaults: Any = None,
                        title: str | None = None, only: tuple[str, ...] | None = None) -> None:
    """One ``--field-name`` flag per field of the dataclass ``cls`` (dest ``prefix.field``), with
    the field's help text and the default taken from ``defaults`` (an instance) or the class.
    Unset flags stay absent from the namespace, so they never override a YAML value."""
    hints = _hints(cls)
    group = parser.add_argument_group(title or f"{prefix} options")
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if default is None:
            shown = "required" if f.metadata.get("required") else "default: none"
        else:
            shown = f"default: {default}"
        kw: dict[str, Any] = {"dest": f"{prefix}.{f.name}", "default": argparse.SUPPRESS,
                              "help": f"{f.metadata.get('help', '')} ({shown})"}
        if tp is bool or tp == (bool | None):  # --x / --no-x; an optional bool stays none when absent
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        kw["metavar"] = f.metadata.get("metavar") or _metavar(tp)
        group.add_argument(flag, type=str, **kw)


def add_config_flags(parser: argparse.ArgumentParser, sections: dict[str, tuple[str, ...] | None],
                     base: SpinConfig | None = None) -> None:
    """Add ``--config`` and one flag per field of ``sections`` ({section: fields or None for all});
    the defaults shown come from ``base``."""
    parser.add_argument("--config", metavar="YAML", help="YAML file with sections " + ", ".join(SECTIONS)
                        + " (nested mappings of the fields below); flags override it")
    for sec_name, only in sections.items():
        add_dataclass_flags(parser, sec_name, SECTIONS[sec_name], None if base is None else getattr(base, sec_name),
                            only=only)


def dataclass_from_args(args: argparse.Namespace, prefix: str, obj: Any) -> Any:
    """A copy of the dataclass ``obj`` with the flags of ``prefix`` given on the command line applied."""
    hints = _hints(type(obj))
    changes = {}
    for dest, text in vars(args).items():
        if not dest.startswith(prefix + "."):
            continue
        key = dest[len(prefix) + 1:]
        flag = "--" + key.replace("_", "-")
        changes[key] = text if isinstance(text, bool) else parse_flag(text, hints[key], f"{flag} ({prefix}.{key})")
    return dataclasses.replace(obj, **changes)


def config_from_args(args: argparse.Namespace, base: SpinConfig | None = None) -> SpinConfig:
    """Defaults < ``base`` < the YAML file of ``--config`` < explicit flags."""
    cfg = base or SpinConfig()
    if getattr(args, "config", None):
        cfg = config_from_dict(load_yaml(args.config), cfg)
    cfg = dataclasses.replace(cfg)
    for sec_name in SECTIONS:
        setattr(cfg, sec_name, dataclass_from_args(args, sec_name, getattr(cfg, sec_name)))
    return cfg


def save_config(cfg: SpinConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
