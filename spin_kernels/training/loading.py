"""Loading models and tokenizers, devices, autocast and seeding: the small shared plumbing."""

from __future__ import annotations

import contextlib
import os
import random

import torch

from .config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"model.device: {exc}") from exc


def check_model_dir(path: str | None, what: str = "model.model") -> str:
    if not path:
        raise ConfigError(f"{what}: required (a directory written by save_pretrained)")
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{what}: {path!r} is not a model directory (no config.json); give a directory "
                          f"written by save_pretrained")
    return path


def load_model(path: str, cfg: ModelConfig, device: torch.device):
    """A causal LM from ``path`` (safetensors), in ``cfg.dtype``, on ``device``, in train mode."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype])
    return model.to(device)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer at {path!r} has no eos token; SPIN responses must end with one")
    if tok.pad_token_id is None:
        # Padding is only used by generation (masked out); the EOS id is the usual stand-in.
        tok.pad_token = tok.eos_token
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
