"""Loading models and tokenizers, devices, autocast and seeding: the small shared plumbing."""

from __future__ import annotations

import contextlib
import os
import random
import sys

import torch

from .config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """The device of ``model.device``; a CUDA device that this machine lacks is refused here,
    before any model is loaded."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"model.device: {exc}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device: {name!r} but no CUDA device is available (torch.cuda.is_available() "
                              f"is False); use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device: {name!r} but this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"model.device: {name!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return device


def check_impl(impl: str, device: torch.device) -> None:
    """Refuse a fused-loss implementation that cannot run on ``device`` before any work starts."""
    if impl == "triton" and device.type != "cuda":
        raise ConfigError(f"training.impl: 'triton' needs a CUDA device, but this run uses {device}; use --impl "
                          f"auto (the C++ kernels on CPU) or --impl cpu / torch")
    if impl == "cpu":
        from spin_kernels.ops.backends import _FACTORIES, _UNAVAILABLE

        if device.type != "cpu":
            raise ConfigError(f"training.impl: 'cpu' runs on CPU tensors, but this run uses {device}; use --impl "
                              f"auto or triton")
        if "cpu" not in _FACTORIES:
            raise ConfigError(f"training.impl: 'cpu' is unavailable here: {_UNAVAILABLE.get('cpu', '')}")


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


def load_model(path: str, cfg: ModelConfig, device: torch.device):
    """A causal LM from ``path`` (safetensors), in ``cfg.dtype``, on ``device``, in train mode."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype])
    return model.to(device)


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


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU runs stay in the weights' dtype)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
