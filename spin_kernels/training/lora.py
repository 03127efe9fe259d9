"""LoRA SPIN: adapters on a frozen base, and the merged model that becomes the next opponent.

With ``training.lora_rank > 0`` the policy is the opponent plus fresh LoRA adapters (peft) on
the linear maps of its decoder layers (``lora_targets``; never the lm_head, whose base weight
the fused ops read). Only the adapters train; the reference is the policy with its adapter
disabled, which is exactly the opponent (the adapters start at B = 0), so the loop's reference
log-probs (computed by the opponent before training) are the LoRA reference and no second model
is ever loaded. At the end of an iteration the adapters are merged into the weights
(``W + (alpha / r) B A``) and saved as a full Hugging Face checkpoint (the next opponent), with
the adapter beside it in ``model/adapter``.

QLoRA (``training.quantize = "nf4"``, one process): the frozen base is held in 4-bit NF4
(bitsandbytes); the opponent that samples and scores is that quantized base too, and the merged
checkpoint is the dequantized base plus the adapters (exactly the trained policy, in full
precision).

The adapters' initial A is drawn from a generator seeded by ``training.seed`` and the module's
name (uniform in ±1/sqrt(fan_in), peft's default distribution), so one process, any number of
FSDP ranks and a resumed run start from the same adapters.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from .config import ConfigError, TrainingConfig

ADAPTER_DIR = "adapter"
_PEFT_PREFIX = "base_model.model."


def default_targets(model: nn.Module) -> list[str]:
    """The names (last component) of every linear map inside the decoder layers."""
    from spin_kernels.distributed import decoder_layers

    names = {n.rsplit(".", 1)[-1] for layer in decoder_layers(model) for n, m in layer.named_modules()
             if isinstance(m, nn.Linear)}
    return sorted(names)


def add_adapters(model: nn.Module, cfg: TrainingConfig) -> nn.Module:
    """``model`` (a causal LM, real or on the meta device) wrapped by peft with LoRA adapters as
    ``cfg`` says; adapters seeded (see the module docstring), everything else frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ConfigError("training.lora_rank: LoRA needs the peft package (pip install spin_kernels[lora])") from exc
    targets = cfg.lora_targets or default_targets(model)
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in targets if t not in linear]
    if unknown:
        raise ConfigError(f"training.lora_targets: {unknown} are not linear maps of this model (it has "
                          f"{sorted(linear)})")
    head = model.get_output_embeddings()
    head_name = next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head), None)
    if head_name in targets:
        raise ConfigError(f"training.lora_targets: {head_name!r} is the lm_head; it stays frozen (the fused loss "
                          f"reads its base weight)")
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.device.type != "meta" and ".lora_A." in name:
                param.copy_(initial_a(hf_module_name(name), tuple(param.shape), cfg.seed).to(param.dtype))
    return peft_model


def hf_module_name(peft_param_name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` ->
    ``model.layers.0.self_attn.q_proj`` (the adapted module's Hugging Face name)."""
    name = peft_param_name.removeprefix(_PEFT_PREFIX)
    return name.split(".lora_", 1)[0]


def initial_a(module: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The seeded initial ``lora_A`` [r, fan_in] of the adapter on ``module`` (float32)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))
    bound = 1.0 / shape[1] ** 0.5
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


def hf_to_peft(full: dict[str, torch.Tensor], peft_model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict renamed for ``peft_model`` (base layers under ``base_layer``),
    with the seeded initial adapters added: what FSDP's rank 0 broadcasts into the shards."""
    out: dict[str, torch.Tensor] = {}
    for name, param in peft_model.state_dict(keep_vars=True).items():
        if ".lora_A." in name:
            out[name] = initial_a(hf_module_name(name), tuple(param.shape), seed)
        elif ".lora_B." in name:
            out[name] = torch.zeros(param.shape, dtype=torch.float32)
        else:
            hf = name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
            if hf in full:
                out[name] = full[hf]
    return out


def is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A LoRA model's full ``state`` (peft names) -> (the base under Hugging Face names,
    {adapted module: {"A": lora_A, "B": lora_B}})."""
    base: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            adapters.setdefault(hf_module_name(name), {})["A" if ".lora_A." in name else "B"] = tensor
        else:
            base[name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")] = tensor
    return base, adapters


def merge_changes_weights(state: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> bool:
    """Whether ``merged`` (``merged_state_dict(state, ...)``) differs from the base the adapters
    were trained on in any bit. False: the adapters' update is below the weights' resolution
    everywhere, the iteration learned nothing, whatever the base's round trip through 4 bits
    (QLoRA) did to it."""
    base, adapters = _split_state(state)
    return any(not torch.equal(merged[f"{module}.weight"], base[f"{module}.weight"]) for module in adapters)


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of a LoRA model's full ``state`` (peft names) with every
    adapter merged: ``W + scaling * B @ A`` computed in float32 (float64 for float64 weights),
    cast back to W's dtype."""
    merged, adapters = _split_state(state)
    merged = dict(merged)
    for module, ab in adapters.items():
        w = merged[f"{module}.weight"]
        acc = torch.promote_types(w.dtype, torch.float32)
        delta = (ab["B"].to(acc) @ ab["A"].to(acc)) * scaling
        merged[f"{module}.weight"] = (w.to(acc) + delta).to(w.dtype)
    return merged


#: Set by the Loader on a LoRA model over a 4-bit base: the checkpoint the base was quantized from.
QUANTIZED_FROM = "spin_quantized_from"


def full_precision_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every 4-bit (bitsandbytes) base weight in full precision as the
    policy used it, ``dequantize(quantize(W))`` (and bnb's quantization entries dropped): the base
    to merge the adapters into. Other models: their state dict as it is.

    The 4-bit weights are quantized again from the checkpoint they were loaded from (one tensor at
    a time) rather than read back from the live parameters: bitsandbytes' CPU kernels repack a
    weight in place on its first forward, into a layout it offers no exact inverse for.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    quantized = {n for n, p in params.items() if getattr(p, "quant_state", None) is not None}
    out: dict[str, torch.Tensor] = {}
    source = _safetensors_reader(getattr(model, QUANTIZED_FROM, None)) if quantized else None
    for name, value in model.state_dict().items():
        if name in quantized:
            from bitsandbytes.functional import dequantize_4bit, quantize_4bit

            state = params[name].quant_state
            hf = name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
            w = source(hf).to(state.dtype)
            packed, fresh = quantize_4bit(w, blocksize=state.blocksize, quant_type=state.quant_type,
                                          compress_statistics=False)
            out[name] = dequantize_4bit(packed, fresh).to(state.dtype)
        elif not any(name.startswith(q + ".") for q in quantized):  # not one of bnb's quant-state entries
            out[name] = value
    return out


def _safetensors_reader(path: str | None):
    """``name -> tensor`` over the safetensors files of a model directory (read lazily)."""
    import glob
    import os

    from safetensors import safe_open

    if path is None:
        raise RuntimeError("a 4-bit model without the checkpoint it was quantized from (Loader sets it)")
    where = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(f, framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), f))

    def read(name: str) -> torch.Tensor:
        with safe_open(where[name], framework="pt") as handle:
            return handle.get_tensor(name)

    return read


def export_target(peft_model: nn.Module) -> nn.Module:
    """The model whose ``save_pretrained`` writes the merged checkpoint: the base model, or for a
    4-bit base an empty (meta) unquantized model of the same config (a quantized model's
    save_pretrained writes its packed weights and a quantization config, whatever state dict it
    is given; the next opponent is a full-precision checkpoint)."""
    base = peft_model.get_base_model()
    if getattr(base, "hf_quantizer", None) is None:
        return base
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=base.dtype)

