"""Loading a run's models and tokenizers (``Loader``), and the checks around it: the fused-loss
implementation for the device, the model directory, finite weights, the tokenizer.

``Loader`` is built once per run from the config sections and is the one place that reads how
models are loaded and computed with: dtype, device, FSDP sharding and mixed precision,
activation checkpointing (``training.gradient_checkpointing``) and bf16 autocast
(``training.bf16``). Each model directory is checked once.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING

import torch

from .config import ConfigError, SpinConfig

if TYPE_CHECKING:
    from spin_kernels.distributed import ModelRunner

    from .parallel import Session

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def check_impl(impl: str, device: torch.device) -> None:
    """Refuse a fused-loss implementation that cannot run on ``device`` before any work starts."""
    if impl == "triton" and device.type != "cuda":
        raise ConfigError(f"training.impl: 'triton' needs a CUDA device, but this run uses {device}; use --impl "
                          f"auto (the C++ kernels on CPU) or --impl cpu / torch")
    if impl == "cpu":
        from spin_kernels.ops import available_backends

        if device.type != "cpu":
            raise ConfigError(f"training.impl: 'cpu' runs on CPU tensors, but this run uses {device}; use --impl "
                              f"auto or triton")
        if (why := available_backends(device)["cpu"]) is not None:
            raise ConfigError(f"training.impl: 'cpu' is unavailable here: {why}")


def _weight_files(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def check_model_dir(path: str | None, what: str = "model.model") -> str:
    """``path`` if it is a loadable Hugging Face model directory (config.json + safetensors
    weights); else a ConfigError naming ``what`` and what is missing."""
    if not path:
        raise ConfigError(f"{what}: required (a directory written by save_pretrained)")
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{what}: {path!r} is not a model directory (no config.json); give a directory "
                          f"written by save_pretrained")
    if not _weight_files(path):
        found = sorted(os.listdir(path))
        raise ConfigError(f"{what}: {path!r} holds no weights (*.safetensors; found {found[:8]}); save the model "
                          f"with save_pretrained(..., safe_serialization=True)")
    return path


def check_architecture(path: str, max_length: int | None, what: str = "model.model") -> None:
    """Refuse a model whose architecture the packed passes cannot run correctly (ALiBi, attention
    outside transformers' AttentionInterface, learned positions fewer than ``max_length``:
    spin_kernels.models.check_supported), from its config.json, before generation starts."""
    from transformers import AutoConfig

    from spin_kernels.models import check_supported

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{what}: {path!r}: config.json is not a transformers config ({type(exc).__name__}: "
                          f"{str(exc)[:200]})") from exc
    try:
        check_supported(config, max_length=max_length)
    except ValueError as exc:
        raise ConfigError(f"{what}: {path!r}: {exc}") from None


def check_finite_weights(model: torch.nn.Module, path: str) -> None:
    """Refuse a loaded model whose weights hold NaN or inf: it would sample, score and train
    nothing but NaN. Every rank checks its shards and all raise alike (a collective)."""
    from spin_kernels.distributed.env import all_reduce_sum
    from spin_kernels.distributed.step import nonfinite_names

    bad = nonfinite_names(model.named_parameters())
    (count,) = all_reduce_sum([float(len(bad))], next(model.parameters()).device)
    if count:
        shown = f", e.g. {[b.removeprefix('model.') for b in bad[:3]]}" if bad else ""
        raise ConfigError(f"model {path!r}: the weights hold NaN/inf values ({int(count)} tensor shard(s){shown}); "
                          f"this model cannot be trained or used as an opponent")


class Loader:
    """Loads the models and tokenizers of one run the way its configuration says.

    ``runner(path)``: the causal LM of a model directory as a runner (one process: a plain
    wrapper; FSDP: the sharded root, weights broadcast from rank 0), checked for finite weights,
    with activation checkpointing when configured and, with ``training.lora_rank``, LoRA
    adapters on a frozen base (spin_kernels.training.lora); ``prepared(runner)`` switches it to packed
    (varlen) batches for the reference pass and training; ``tokenizer(path)`` checked against the
    model's vocabulary; ``autocast()`` the compute context of the fused passes (bf16 autocast on
    CUDA in one process; under FSDP the mixed precision is the sharding's own).
    """

    def __init__(self, cfg: SpinConfig, sess: Session):
        self.sess = sess
        self.dtype = DTYPES[cfg.model.dtype]
        self.tokenizer_dir = cfg.model.tokenizer
        self.max_length = cfg.data.max_length
        self.checkpointing = cfg.training.gradient_checkpointing
        self.training = cfg.training  # LoRA options
        self.distributed = cfg.distributed
        mp = cfg.distributed.mixed_precision
        if mp == "auto":
            mp = "bf16" if sess.device.type == "cuda" and cfg.training.bf16 else "none"
        self.mixed_precision = None if mp == "none" else mp
        self.bf16_autocast = cfg.training.bf16 and sess.device.type == "cuda" and not sess.fsdp
        self._checked: set[str] = set()
        self._tokenizers: dict[str, object] = {}

    def check(self, path: str | None, what: str = "model.model") -> str:
        """``check_model_dir`` once per directory, and that its architecture runs packed batches
        at this run's ``max_length`` (``check_architecture``): refused before any work."""
        if path not in self._checked:
            check_model_dir(path, what)
            check_architecture(path, self.max_length, what)
            self._checked.add(path)
        return path

    def tokenizer(self, model_path: str):
        """The run's tokenizer (``--tokenizer`` or the model's), checked against the vocabulary of
        the model at ``model_path``; loaded once."""
        from transformers import AutoConfig

        source = self.tokenizer_dir or self.check(model_path)
        if source not in self._tokenizers:
            config = AutoConfig.from_pretrained(model_path)
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            what = "model.tokenizer" if self.tokenizer_dir else "model.model"
            self._tokenizers[source] = load_tokenizer(source, what=what, vocab_size=getattr(text, "vocab_size", None))
        return self._tokenizers[source]

    def runner(self, path: str) -> ModelRunner:
        """The causal LM of the model directory ``path`` as a runner for this run's session.

        One process: ``from_pretrained`` on the device. FSDP: every rank builds the model with
        empty (meta) parameters, shards it (``apply_fsdp2``: each decoder layer, then the root),
        and rank 0 reads the weights and broadcasts them into the shards (``load_full_weights``):
        no full copy per rank. A model whose weights hold NaN/inf is refused (every rank alike).
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        from spin_kernels.distributed import (
            ModelRunner,
            apply_fsdp2,
            empty_parameters,
            load_full_weights,
            read_safetensors,
        )

        from .lora import QUANTIZED_FROM, add_adapters, hf_to_peft

        self.check(path)
        lora = self.training.lora_rank > 0
        if not self.sess.fsdp:
            quantization = self._quantization()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, **quantization,
                                                         **_softcap_attention(path))
            if quantization:
                _keep_4bit_layout_trainable(model)
            if not quantization:  # a 4-bit model is placed by its device_map (.to() would re-pack it)
                model = model.to(self.sess.device)
            if self.checkpointing:
                enable_checkpointing(model)
            model = add_adapters(model, self.training) if lora else model
            if quantization:  # where the merge at the end re-derives the 4-bit base from
                setattr(model, QUANTIZED_FROM, path)
            runner = ModelRunner(model)
        else:
            with empty_parameters():
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=self.dtype,
                                                         **_softcap_attention(path))
                model = add_adapters(model, self.training) if lora else model
            d = self.distributed
            runner = apply_fsdp2(model, mixed_precision=self.mixed_precision, cpu_offload=d.cpu_offload,
                                 activation_checkpointing=self.checkpointing,
                                 reshard_after_forward=d.reshard_after_forward)
            weights = None
            if self.sess.env.is_main:  # rank 0 reads the checkpoint (HF names; LoRA: + the seeded adapters)
                weights = hf_to_peft(read_safetensors(path, self.dtype), model, self.training.seed) if lora else path
            load_full_weights(runner, weights, device=self.sess.device, dtype=self.dtype)
        check_finite_weights(runner, path)
        runner.train()
        return runner

    def _quantization(self) -> dict:
        """from_pretrained arguments of a 4-bit NF4 base (QLoRA; bitsandbytes), else none."""
        if self.training.quantize == "none":
            return {}
        if self.sess.fsdp:
            raise ConfigError("training.quantize: a 4-bit base runs in one process (FSDP does not shard "
                              "bitsandbytes' packed weights); drop --fsdp / torchrun or --quantize")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise ConfigError("training.quantize: 'nf4' needs the bitsandbytes package (pip install "
                              "spin_kernels[qlora])") from exc
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.dtype)
        return {"quantization_config": config, "device_map": {"": self.sess.device}}

    @staticmethod
    def prepared(runner: ModelRunner) -> ModelRunner:
        """The runner, its model switched to packed (varlen) batches for reference and training."""
        from spin_kernels.models import prepare_model

        prepare_model(runner.model)
        return runner

    def autocast(self):
        """The compute context of the reference pass and training steps."""
        if self.bf16_autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _keep_4bit_layout_trainable(model) -> None:
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first inference
    forward (generation), and the repacked path has no autograd: the training step after it would
    silently get no gradient through any 4-bit layer. Keep the standard layout (dequantize +
    matmul, differentiable) on every CPU."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _softcap_attention(path: str) -> dict:
    """Gemma-2-style models cap their attention logits; transformers 4.56-5.17 default them to
    SDPA, which ignores the cap, so generation would sample from another model. Eager attention
    applies it (packed passes switch to spin_varlen, which applies it too)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"attn_implementation": "eager"} if getattr(text, "attn_logit_softcapping", None) else {}


def enable_checkpointing(model) -> None:
    """Recompute decoder layers in the backward (non-reentrant: works with the packed kwargs).
    (Under FSDP, ``apply_fsdp2`` wraps each sharded layer in torch's checkpoint_wrapper instead.)"""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


_NOTED_PLAIN: set[str] = set()


def load_tokenizer(path: str, *, what: str = "model.model", vocab_size: int | None = None):
    """The tokenizer of the directory ``path``, checked for what SPIN needs.

    Args:
        what: the option that named ``path`` (for messages).
        vocab_size: the model's vocabulary; a tokenizer with more tokens is refused (its ids
            would index past the embeddings).
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{what}: no usable tokenizer in {path!r} ({type(exc).__name__}: {str(exc)[:200]}); save "
                          f"one there with tokenizer.save_pretrained or pass --tokenizer DIR") from exc
    if isinstance(tok, bool) or not hasattr(tok, "eos_token_id"):
        raise ConfigError(f"{what}: {path!r} holds no tokenizer; pass --tokenizer DIR")
    if tok.eos_token_id is None:
        raise ConfigError(f"{what}: tokenizer at {path!r} has no eos token; SPIN responses must end with one")
    if vocab_size is not None and len(tok) > vocab_size:
        raise ConfigError(f"{what}: the tokenizer at {path!r} has {len(tok)} tokens but the model's vocabulary has "
                          f"{vocab_size}; ids past {vocab_size - 1} have no embedding (a tokenizer of another model?)")
    if tok.pad_token_id is None:
        # Padding is only used by generation (masked out); the EOS id is the usual stand-in.
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None) and path not in _NOTED_PLAIN:
        from spin_kernels.distributed.env import rank

        _NOTED_PLAIN.add(path)
        if rank() == 0:
            print(f"spin-kernels: note: the tokenizer at {path!r} has no chat template; prompts are formatted as "
                  f"'User: {{prompt}}\n\nAssistant:' and responses follow after a space "
                  f"(spin_kernels/packing/example.py). Save a tokenizer with a chat template to use another format.",
                  file=sys.stderr)
    return tok
