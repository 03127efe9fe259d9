"""Configuration of a SPIN run: the option dataclasses and YAML loading.

One run is described by ``SpinConfig`` with four sections (``model``, ``data``,
``generation``, ``training``) plus the loop and the multi-process (``distributed``) options.
Values come, in increasing priority, from the dataclass defaults (the paper's, docs/spin-math.md),
a YAML file (nested sections, e.g. ``training: {beta: 0.1}``) and command-line flags (``--beta
0.1``: every field name is unique across sections so that a flag needs no section prefix; the
flags are made by spin_kernels.training.flags).

Every section checks its fields' types and ranges when it is built (``Section.__post_init__``),
so errors name the offending field (``training.beta``) and say what was expected; unknown YAML
fields get a "did you mean" hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml


#: The slot count of continuous batching when --generation-batch-size is unset (samplers.device_slots).
CPU_SLOTS, CUDA_MAX_SLOTS = 64, 256


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the field."""


# --------------------------------------------------------------------------- fields and their checks


def option(default: Any, help: str, *, check: Callable[[Any], str | None] | None = None, **kw: Any) -> Any:
    """A dataclass field carrying its --help text, an optional range ``check`` (value -> why it is
    wrong, or None) and argparse extras (``metavar``; ``required=True`` marks a field that must be
    given for the commands that use it, by flag or YAML)."""
    meta = {"help": help, "check": check, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _rule(ok: Callable[[Any], bool], expected: str) -> Callable[[Any], str | None]:
    """A range ``check``: value -> None when ``ok(value)``, else "must be <expected>, got <value>"."""
    return lambda v: None if ok(v) else f"must be {expected}, got {v}"


positive = _rule(lambda v: v > 0, "> 0")
non_negative = _rule(lambda v: v >= 0, ">= 0")
fraction = _rule(lambda v: 0 <= v < 1, "in [0, 1)")
at_least_one = _rule(lambda v: v >= 1, ">= 1 or none")
at_most_one = _rule(lambda v: v <= 1, "in (0, 1]")


def probability(v: Any) -> str | None:
    return positive(v) or at_most_one(v)


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _expected(name: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{name}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")


def parse_value(value: Any, tp: Any, name: str, *, text: bool = False) -> Any:
    """``value`` as the annotation ``tp``, or a ConfigError naming ``name``: the one reader of YAML
    values and flag text. With ``text`` a string is a flag's text: ``none`` for an optional field,
    numbers, ``true``/``false``, comma lists (``--lora-targets q_proj,v_proj`` gives the YAML list
    [q_proj, v_proj]; ``--beta 0.1,0.5`` one value per iteration). Otherwise (YAML, Python) the
    value must have its type already, except that an int is taken for a float and a float spelled
    as a string (PyYAML reads ``5e-7``, without a dot, so) is read. Types only: ranges, finiteness
    and empty lists are the section's checks (``Section.__post_init__``)."""
    text = text and isinstance(value, str)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        arms = get_args(tp)
        if type(None) in arms and (value is None or (text and value.strip().lower() in ("none", "null"))):
            return None
        # A value or a per-iteration list (or a count or a bool): try the reading the value
        # suggests first (a list for a list or a text with a comma; numbers before bools).
        lists = [a for a in arms if get_origin(a) is list]
        scalars = sorted((a for a in arms if a not in lists and a is not type(None)), key=lambda a: a is bool)
        many = isinstance(value, list) or (text and "," in value)
        errors = []
        for arm in (lists + scalars) if many else (scalars + lists):
            try:
                return parse_value(value, arm, name, text=text)
            except ConfigError as exc:
                errors.append(exc)
        if many and lists:
            raise errors[0]  # names the list's element that is wrong
        raise _expected(name, Union[tuple(a for a in arms if a not in lists)] if scalars else tp, value)
    if origin is Literal:
        if value not in get_args(tp):
            raise _expected(name, tp, value)
        return value
    if origin is list:
        if text:
            value = [part.strip() for part in value.split(",")]
        if not isinstance(value, list):
            raise _expected(name, tp, value)
        return [parse_value(v, get_args(tp)[0], f"{name}[{i}]", text=text) for i, v in enumerate(value)]
    if isinstance(value, str) and (tp is float or (text and tp in (int, bool))):
        try:  # a number or true/false/yes/no; unchanged where the text spells none
            value = {"true": True, "yes": True, "false": False, "no": False}.get(value.strip().lower(), value) \
                if tp is bool else tp(value)
        except ValueError:
            pass
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str)}.get(tp)
    if not ok:
        raise _expected(name, tp, value)
    return float(value) if tp is float else value


class Section:
    """Base of the config sections: ``__post_init__`` reads every field's value as its type
    (``parse_value``), checks that floats are finite (no hyper-parameter can be inf or nan) and
    the field's range (its ``check``), then the section's joint constraints (``_check_together``),
    so a section never exists with a bad value, however it was built (defaults, YAML, flags, code)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            name = f"{self.SECTION}.{f.name}"
            value = parse_value(getattr(self, f.name), hints[f.name], name)
            if isinstance(value, list) and not value:
                raise ConfigError(f"{name}: an empty list")
            check = f.metadata.get("check")
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                why = (f"must be a finite number, got {v}" if isinstance(v, float) and not math.isfinite(v)
                       else check(v) if check is not None and v is not None else None)
                if why:
                    raise ConfigError(f"{name}{f'[{i}]' if isinstance(value, list) else ''}: {why}")
            object.__setattr__(self, f.name, value)
        self._check_together()

    def _check_together(self) -> None:
        """Constraints between fields of the section (none by default)."""


@dataclass
class ModelConfig(Section):
    SECTION: ClassVar[str] = "model"

    model: str | None = option(None, "the starting (SFT) model: a directory written by save_pretrained",
                             required=True, metavar="DIR")
    tokenizer: str | None = option(None, "tokenizer directory; none: the model's", metavar="DIR")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = option(
        "float32", "dtype the weights are loaded and trained in (bf16 compute comes from --bf16 autocast)")
    device: str = option("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'...")


@dataclass
class DataConfig(Section):
    SECTION: ClassVar[str] = "data"

    data: str | None = option(None, "training data: a .jsonl/.json/.parquet file, a directory saved by "
                            "datasets.save_to_disk, or a datasets hub name already in the local cache",
                            required=True, metavar="PATH")
    split: str = option("train", "split to use when --data is a datasets dataset")
    prompt_field: str = option("prompt", "field holding the prompt (a string or chat messages)")
    real_field: str = option("real", "field holding the real (human/SFT) response")
    messages_field: str = option("messages", "chat field used when prompt/real are absent: first user turn = "
                               "prompt, first assistant turn = real (UltraChat-200k layout)")
    max_examples: int | None = option(None, "use only the first N examples (paper: 50k prompts)",
                                       check=at_least_one)
    max_length: int = option(1024, "max tokens of prompt + response; longer responses are cut (and lose "
                           "their EOS) (paper's released configs: 1024)", check=positive)
    max_prompt_length: int = option(512, "max prompt tokens; longer prompts keep their end (released configs: 512)",
                                    check=positive)
    on_stale: Literal["regenerate", "error"] = option(
        "regenerate", "rows of an existing output or run file made from other inputs (another prompt/response, "
        "model, sampling settings or length limits): regenerate them, or stop with an error naming them")

    def _check_together(self) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"data.max_prompt_length ({self.max_prompt_length}) must be < "
                              f"data.max_length ({self.max_length})")


@dataclass
class SamplingOptions(Section):
    """The ``generation`` section: how the opponent samples (translated into a transformers
    ``GenerationConfig``, or vLLM's ``SamplingParams``, by spin_kernels.training.samplers).

    Unset fields (None) take the defaults of the seeding: with ``example`` seeds (the default)
    continuous batching, prompts sorted by length, a slot count chosen for the device; with
    ``batch`` seeds the original sampler (hf ``generate`` on batches of 16 in file order).
    ``in_force`` fills them in."""

    SECTION: ClassVar[str] = "generation"

    max_new_tokens: int = option(256, "tokens sampled per synthetic response (paper: 256)", check=positive)
    temperature: float = option(1.0, "sampling temperature (paper: 1.0)", check=positive)
    top_p: float = option(1.0, "nucleus sampling top_p (paper: 1.0)", check=probability)
    generation_batch_size: int | None = option(
        None, "sequences sampled at once: slots decoding together (continuous; none: chosen for the device, "
        f"{CPU_SLOTS} on CPU, on CUDA as many as a quarter of its memory holds the key/value cache of, at most "
        f"{CUDA_MAX_SLOTS}), or prompts per generate() call (hf; none: 16)", check=positive)
    generation_seed: int = option(1234, "seed of the sampler (each example, or each batch, is seeded from it)")
    backend: Literal["hf", "continuous", "vllm"] | None = option(
        None, "generation backend: 'continuous' continuous batching (a finished response's slot takes the next "
        "prompt at once); 'hf' transformers generate() on static batches; 'vllm' one vLLM engine per stage (if "
        "installed; untested); none: continuous, or hf with --generation-seeding batch")
    generation_order: Literal["input", "length"] | None = option(
        None, "prompts into batches in file order, or sorted by prompt length, longest first (rows are written in "
        "file order either way); none: length, or input with --generation-seeding batch")
    generation_token_budget: int = option(
        0, "most tokens of one batch, counted as prompts x (longest prompt + max_new_tokens); 0: only "
        "--generation-batch-size bounds a batch", check=non_negative)
    generation_seeding: Literal["example", "batch"] = option(
        "example", "'example': each prompt sampled from its own seed (seed, example index), so every backend, "
        "order and batch size writes the same rows; 'batch': the original sampler (hf generate() on batches of 16 "
        "in file order, each batch from the seed (seed, batch number)), the rows of runs made before example "
        "seeds were the default")
    generation_chunk_size: int = option(
        0, "continuous: prompts per chunk, the unit that is written and resumed (0: 8 x --generation-batch-size)",
        check=non_negative)

    def _check_together(self) -> None:
        if self.generation_seeding == "batch" and self.backend not in (None, "hf"):
            raise ConfigError(f"generation.generation_seeding: 'batch' needs backend 'hf'; {self.backend!r} seeds "
                              f"each example (use 'example')")

    def in_force(self, slots: int | None = None) -> SamplingOptions:
        """A copy with the unset fields set: the backend, order and (hf) batch size of the seeding;
        ``slots`` (samplers.device_slots) for the batch size of continuous and vllm."""
        batch = self.generation_seeding == "batch"
        backend = self.backend or ("hf" if batch else "continuous")
        size = self.generation_batch_size or (16 if backend == "hf" else slots)
        return dataclasses.replace(self, backend=backend, generation_order=self.generation_order
                                   or ("input" if batch else "length"), generation_batch_size=size)

    def chunk_size(self) -> int:
        """Prompts per resumable chunk of the continuous backend."""
        return self.generation_chunk_size or 8 * self.generation_batch_size


@dataclass
class TrainingConfig(Section):
    SECTION: ClassVar[str] = "training"

    beta: float | list[float] = option(0.1, "beta, the scale of the SPIN margin; a comma list gives one per iteration "
                                        "(released recipe: 0.1,0.1,0.1,5.0) (paper: 0.1)", check=positive)
    loss_type: Literal["sigmoid", "hinge"] = option("sigmoid", "SPIN loss: logistic (paper) or hinge")
    learning_rate: float | list[float] = option(5e-7, "peak learning rate (paper: 5e-7 for 7B models); a comma list: "
                                                 "one per iteration (released recipe: 5e-7,5e-7,1e-7,1e-7)",
                                                 check=positive)
    optimizer: Literal["rmsprop", "adamw"] = option("rmsprop", "optimizer (paper: RMSprop, no weight decay)")
    weight_decay: float = option(0.0, "weight decay (paper: 0)", check=non_negative)
    warmup_ratio: float = option(0.1, "fraction of the steps spent in linear warm-up (paper: 0.1)",
                                 check=fraction)
    epochs: int | list[int] = option(2, "epochs over the iteration's pairs (paper: 2); a comma list: one per iteration",
                                    check=positive)
    global_batch_pairs: int = option(64, "pairs per optimizer step (paper: global batch 64)", check=positive)
    token_budget: int = option(8192, "max tokens of one packed micro-batch; a global batch is accumulated "
                             "over as many micro-batches as it needs", check=positive)
    share_prompt: bool = option(False, "pack each pair as one segment [prompt | real | synthetic]: the prompt "
                                "is computed once by the policy and the reference passes (measured: faster "
                                "when prompts are at least half a pair's tokens; docs/packing.md)")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm (none to disable)", check=positive)
    bf16: bool = option(True, "bf16 autocast on GPU (ignored on CPU)")
    gradient_checkpointing: bool = option(False, "recompute decoder activations in the backward (under FSDP: "
                                        "torch's checkpoint_wrapper around each sharded decoder layer)")
    average_log_prob: bool = option(False, "per-token mean log-probs instead of sums (paper: sums)")
    impl: Literal["auto", "torch", "triton", "cpu"] = option("auto", "fused loss implementation")
    seed: int = option(42, "seed of the data order and the model's RNG")
    lora_rank: int = option(0, "LoRA: rank of adapters trained on a frozen base (0: full fine-tuning); the "
                            "reference is the base (the adapter disabled), the merged model the next opponent",
                            check=non_negative)
    lora_alpha: float = option(16.0, "LoRA: the adapters' update is scaled by alpha / rank", check=positive)
    lora_dropout: float = option(0.0, "LoRA: dropout on the adapters' input", check=fraction)
    lora_targets: list[str] | None = option(None, "LoRA: names of the modules to adapt (comma list); none: "
                                            "every linear map of the decoder layers (never the lm_head)",
                                            metavar="NAMES")
    quantize: Literal["none", "nf4"] = option("none", "QLoRA: hold the frozen base in 4-bit NF4 (bitsandbytes; "
                                              "needs --lora-rank, one process)")
    save_every: int = option(50, "write a resumable checkpoint every N optimizer steps (0: only at the end)",
                             check=non_negative)
    log_every: int = option(1, "log metrics every N optimizer steps (>= 1)", check=positive)


@dataclass
class LoopConfig(Section):
    SECTION: ClassVar[str] = "loop"

    output_dir: str = option("runs/spin", "run directory (iterations, checkpoints, metrics, plots)", metavar="DIR")
    iterations: int = option(3, "SPIN iterations to run (paper: 4, iter0..iter3)", check=positive)
    include_previous: bool | int = option(0, "from iteration 1 on, also train on the synthetic responses of the "
                                          "previous K iterations (bare flag: K = 1; the released SPIN scripts use "
                                          "2)", check=non_negative, const=1, metavar="K")
    eval_fraction: float = option(0.0, "share of the data's prompts held out of training: each iteration the "
                                  "opponent answers them too and the trained model is evaluated on them "
                                  "(heldout/accuracy, margin, logp_real_per_token in summary.json)", check=fraction)
    eval_data: str | None = option(None, "held-out data (same formats as --data) instead of --eval-fraction",
                                   metavar="PATH")
    stop_below_accuracy: float | None = option(None, "end the loop after the first iteration whose held-out "
                                               "accuracy is below X (the game's fixed point: the model no longer "
                                               "tells its own samples from the data)", check=probability,
                                               metavar="X")
    eval_command: str | None = option(None, "a shell command run after each iteration on its model ({model} is "
                                      "replaced by its directory), e.g. an lm-eval-harness call; its last output "
                                      "line and exit code go into the summary", metavar="CMD")
    tensorboard: bool = option(False, "also log to TensorBoard (needs the tensorboard package)")
    resume: bool = option(False, "continue an interrupted run found in --output-dir")


@dataclass
class DistributedConfig(Section):
    SECTION: ClassVar[str] = "distributed"

    fsdp: bool | None = option(None, "shard the model with PyTorch FSDP2 over the processes started by torchrun "
                             "(torchrun --nproc_per_node K -m spin_kernels.cli ...): each rank generates and scores "
                             "its share of the prompts and trains on its share of every global batch; unset: on "
                             "exactly when WORLD_SIZE > 1")
    mixed_precision: Literal["auto", "bf16", "fp16", "none"] = option(
        "auto", "FSDP compute dtype (parameters all-gathered in it, fp32 master weights and gradient reduction); "
                "auto: bf16 on GPU when --bf16, else none (the weights' own dtype)")
    cpu_offload: bool = option(False, "FSDP: keep sharded parameters, gradients and optimizer states in host memory "
                             "(CPUOffloadPolicy; the optimizer step runs on the CPU)")
    reshard_after_forward: bool = option(True, "FSDP: free each layer's gathered parameters after its forward "
                                       "(ZeRO-3); no: keep them until the backward (more memory, less traffic)")


#: Training options that may change per iteration (a list: one value per iteration).
SCHEDULED = ("learning_rate", "beta", "epochs")

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "generation": SamplingOptions,
    "training": TrainingConfig,
    "loop": LoopConfig,
    "distributed": DistributedConfig,
}


@dataclass
class SpinConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: SamplingOptions = field(default_factory=SamplingOptions)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self, *, need: tuple[str, ...] = ()) -> SpinConfig:
        """Check that the dotted fields ``need`` (e.g. 'model.model'), required by the caller, are
        given, and the constraints between sections. (Types and ranges were checked when the
        sections were built.)"""
        for name in need:
            sec, key = name.split(".")
            if getattr(getattr(self, sec), key) in (None, ""):
                raise ConfigError(f"{name}: required (flag --{key.replace('_', '-')} or '{key}' in "
                                  f"section '{sec}' of the YAML file)")
        n = self.loop.iterations
        for key in SCHEDULED:
            value = getattr(self.training, key)
            if isinstance(value, list) and len(value) < n:
                raise ConfigError(f"training.{key}: a list gives one value per iteration: {len(value)} value(s) "
                                  f"for {n} iterations (loop.iterations)")
        lp = self.loop
        if lp.eval_fraction > 0 and lp.eval_data:
            raise ConfigError("loop.eval_data: give --eval-data or --eval-fraction, not both")
        if lp.stop_below_accuracy is not None and not (lp.eval_fraction > 0 or lp.eval_data):
            raise ConfigError("loop.stop_below_accuracy: the stopping rule reads the held-out accuracy; hold out "
                              "prompts with --eval-fraction F or --eval-data PATH")
        return self

    def for_iteration(self, t: int) -> TrainingConfig:
        """The training options of iteration ``t``: each per-iteration list replaced by its t-th value."""
        values = {}
        for key in SCHEDULED:
            value = getattr(self.training, key)
            if isinstance(value, list):
                if t >= len(value):
                    raise ConfigError(f"training.{key}: no value for iteration {t} (the list has {len(value)})")
                values[key] = value[t]
        return dataclasses.replace(self.training, **values)

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
        With LoRA the base is frozen, so it may be bfloat16 (the adapters stay float32).
        """
        lora = self.training.lora_rank > 0
        if self.model.dtype == "float16" or (self.model.dtype == "bfloat16" and not lora):
            raise ConfigError(f"model.dtype: {self.model.dtype} weights cannot be trained correctly (updates "
                              f"below the dtype's resolution are lost; float16 overflows); train with "
                              f"--dtype float32 (master weights) and --bf16 (bf16 compute on GPU; under FSDP: "
                              f"--mixed-precision bf16), or with LoRA (--lora-rank N) on a frozen bfloat16 base. "
                              f"{self.model.dtype} is fine for generate and reference.")
        if self.training.quantize != "none" and not lora:
            raise ConfigError("training.quantize: a 4-bit base is frozen, so it needs LoRA adapters to train "
                              "(--lora-rank N)")
        if self.distributed.mixed_precision == "fp16":
            raise ConfigError("distributed.mixed_precision: fp16 training needs loss scaling, which the trainer does "
                              "not do (gradients would underflow or overflow); use --mixed-precision bf16")
        return self


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
        known = [f.name for f in fields(SECTIONS[sec_name])]
        for key in values:
            if key not in known:
                raise _unknown(str(key), f"{sec_name}.", known)
        setattr(cfg, sec_name, dataclasses.replace(getattr(cfg, sec_name), **values))  # checked in __post_init__
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


def save_config(cfg: SpinConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
