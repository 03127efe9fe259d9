"""Running Hugging Face causal LMs on a PackedBatch, and the SPIN loss / reference pass on top.

The decoder runs once over the packed tokens (varlen attention, no padding); the lm_head is
applied to zero rows: the fused ops (spin_kernels.ops) take the last hidden states and the
head's weight, so no [T, V] logits tensor exists.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from ..ops import linear_logprobs, linear_spin_loss
from ..ops.sharded import is_dtensor
from ..packing import IGNORE_INDEX, PackedBatch
from .attention import ATTN_IMPLEMENTATION, SHARED_PROMPT_KWARG, register_attention
from .shared_prompt import SharedPromptLayout


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside data-parallel wrappers (DDP, DataParallel: they forward to ``.module``);
    any other model is returned as it is (peft models keep their wrapper: it is the model)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model must be a transformers PreTrainedModel (or a peft model wrapping one), "
                        f"got {type(model).__name__} without .config")
    return config


#: Model types with learned absolute position embeddings, and the config field that bounds them.
_LEARNED_POSITIONS = {"gpt2": "n_positions", "gpt_bigcode": "n_positions", "opt": "max_position_embeddings",
                      "biogpt": "max_position_embeddings"}


def check_supported(config, *, max_length: int | None = None) -> None:
    """Refuse (ValueError) a causal LM config the packed passes cannot run correctly, from the
    config alone (no weights): ALiBi position biases (Bloom, MPT, Falcon with ``alibi``), which
    the varlen attention does not apply; a model class whose attention does not go through
    transformers' AttentionInterface (its packed sequences would attend to each other); and, with
    ``max_length``, learned absolute positions fewer than ``max_length`` (GPT-2's ``n_positions``:
    later positions have no embedding)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "")
    attn = getattr(text, "attn_config", None)
    if getattr(text, "alibi", False) or model_type in ("bloom", "mpt") or getattr(attn, "alibi", False):
        raise ValueError(f"{model_type or type(config).__name__} models use ALiBi position biases, which the packed "
                         f"varlen attention (spin_varlen) does not apply: their packed log-probs would be wrong. "
                         f"Supported: models with rotary or learned positions whose attention goes through "
                         f"transformers' AttentionInterface (Llama, Mistral, Qwen2, Gemma, Phi, GPT-2, ...)")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        cls = None  # a model of remote code: prepare_model checks the loaded model
    if cls is not None and not getattr(cls, "_supports_attention_backend", False):
        raise ValueError(f"{cls.__name__} does not run its attention through transformers' AttentionInterface, so "
                         f"the packed varlen attention cannot replace it: its packed sequences would attend to each "
                         f"other. Supported: Llama, Mistral, Qwen2, Gemma, Phi, GPT-2 and other models that do")
    field = _LEARNED_POSITIONS.get(model_type)
    limit = getattr(text, field, None) if field else None
    if max_length is not None and limit is not None and limit < max_length:
        raise ValueError(f"{model_type} has learned position embeddings for {limit} positions ({field}), fewer than "
                         f"--max-length {max_length}: positions {limit} and later have no embedding; lower "
                         f"--max-length to at most {limit} (and --max-prompt-length / --max-new-tokens with it)")


def prepare_model(model):
    """Make a transformers causal LM (or a peft model wrapping one) run packed batches.

    Registers the "spin_varlen" attention (see spin_kernels.models.attention), switches the model
    (and its sub-models) to it, and sets ``config.use_cache = False``. Packed calls pass
    ``use_cache=False`` anyway, and the attention takes sequence boundaries from cu_seqlens or
    position_ids, so even a cache created by a direct call cannot leak attention across
    sequences. ``generate`` keeps working (it asks for its own cache; padded prompts use
    transformers' mask).

    Args:
        model: e.g. LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Gemma2ForCausalLM.

    Returns:
        the same model, modified in place.
    """
    config = _config(model)
    check_supported(config)
    name = register_attention()
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} has no set_attn_implementation(); it is not a transformers model")
    model.set_attn_implementation(name)
    if config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} refused attn_implementation={name!r} "
                           "(it does not use transformers' AttentionInterface)")
    config.use_cache = False
    return model


def is_prepared(model) -> bool:
    """True when ``prepare_model`` was applied (the model runs "spin_varlen" attention)."""
    return getattr(_config(model), "_attn_implementation", None) == ATTN_IMPLEMENTATION


def _require_prepared(model) -> None:
    if not is_prepared(model):
        impl = getattr(_config(model), "_attn_implementation", None)
        raise ValueError(f"model runs attn_implementation={impl!r}; call spin_kernels.models.prepare_model(model) "
                         "first (packed batches need the varlen attention)")


def _require_device(model, batch: PackedBatch) -> None:
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"batch must be a PackedBatch, got {type(batch).__name__}")
    param = next(model.parameters(), None)
    if param is not None and param.device != batch.device:
        raise ValueError(f"batch is on {batch.device} but the model is on {param.device}; use batch.to(device)")


def _require_gatherable_embeddings(model) -> None:
    """A model whose embeddings FSDP2 sharded under an outer root cannot run by itself.

    FSDP2 gathers a parameter in the forward of the FSDP module that owns it. If the embeddings'
    owner is not inside ``model`` (``apply_fsdp2`` puts them in the ``ModelRunner`` root), calling
    ``model`` directly hands the embedding a DTensor and PyTorch fails deep inside with "mixed
    torch.Tensor and DTensor"; this says what to do instead.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or not is_dtensor(getattr(embeddings, "weight", None)):
        return
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) and any(e is embeddings for e in m.modules()) for m in model.modules()):
        return
    raise ValueError(f"model ({type(model).__name__}) has sharded input embeddings (a DTensor) but no FSDP module "
                     "inside it gathers them: it was sharded under an outer FSDP root (apply_fsdp2's ModelRunner). "
                     "Run the call through that root, e.g. sharded(packed_spin_loss, batch), so that the root's "
                     "parameters are gathered")


def packed_hidden_states(model, batch: PackedBatch) -> Tensor:
    """The decoder's last hidden states (after the final norm) for every packed token.

    The call goes through the model's own ``forward`` (so wrappers' hooks run: FSDP2's
    all-gathers, peft), with ``logits_to_keep`` = no position: the lm_head sees zero rows and no
    logits are formed. The hidden states are taken from the decoder's output by a forward hook.
    The attention gets the sequence boundaries (``cu_seq_lens_q``), or for a shared-prompt batch
    its ``SharedPromptLayout`` (one per call, shared by all layers).

    Args:
        model: a prepared causal LM (``prepare_model``), on the batch's device; it may sit inside
            DDP (called through the wrapper, so that DDP synchronises its gradients).
        batch: a PackedBatch (either layout).

    Returns:
        [T, H] in the model's dtype.
    """
    inner = unwrap_model(model)
    _require_prepared(inner)
    _require_device(inner, batch)
    _require_gatherable_embeddings(inner)
    captured: list[Tensor] = []

    def keep(module, args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    if batch.share_prompt:  # batch.cu_seqlens are loss sequences here, not attention spans
        attention = {SHARED_PROMPT_KWARG: SharedPromptLayout.from_batch(batch)}
    else:
        attention = {"cu_seq_lens_q": batch.cu_seqlens, "cu_seq_lens_k": batch.cu_seqlens,
                     "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen}
    handle = inner.get_decoder().register_forward_hook(keep)
    try:
        model(
            input_ids=batch.input_ids.unsqueeze(0),
            position_ids=batch.position_ids.unsqueeze(0),
            use_cache=False,
            logits_to_keep=torch.empty(0, dtype=torch.long, device=batch.device),
            **attention,
        )
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder call per forward, saw {len(captured)}")
    return captured[0][0]


def lm_head_kwargs(model) -> dict:
    """The head arguments of the fused ops for this model.

    Returns:
        {"weight": [V, H] the output embedding's weight (tied or not), "bias": [V] or None,
         "softcap": Gemma-2's ``final_logit_softcapping`` or None,
         "temperature": ``logits_scaling`` for Granite (logits are divided by it), else 1.0}.
    """
    model = unwrap_model(model)
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (lm_head)")
    if hasattr(head, "base_layer"):
        raise NotImplementedError("the lm_head carries a peft adapter; the fused ops read only its base weight. "
                                  "Leave lm_head out of the adapter's target_modules")
    config = _config(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    temperature = float(getattr(text, "logits_scaling", None) or 1.0)
    return {"weight": head.weight, "bias": getattr(head, "bias", None), "softcap": softcap,
            "temperature": temperature}


def sequence_logps(model, batch: PackedBatch, *, impl: str = "auto", average: bool = False,
                   check_values: bool = True) -> Tensor:
    """Per-sequence log-probabilities of the responses under ``model``.

    ``check_values``: as in ``spin_kernels.ops.linear_logprobs`` (False: the batch comes from
    ``pack_batch``, so its targets and cu_seqlens are known good; non-finite hidden states then
    give non-finite log-probs instead of a ValueError, and no host synchronisation).

    Returns:
        [S] float32 (float64 for a float64 model), interleaved (real, synthetic) like the batch;
        differentiable wrt the model's parameters. ``average=True`` gives per-token means.
    """
    hidden = packed_hidden_states(model, batch)
    return linear_logprobs(hidden, targets=batch.targets, cu_seqlens=batch.cu_seqlens, ignore_index=IGNORE_INDEX,
                           average=average, impl=impl, check_values=check_values, **lm_head_kwargs(model))


def packed_spin_loss(model, batch: PackedBatch, *, beta: float = 0.1, loss_type: str = "sigmoid",
                     impl: str = "auto", average: bool = False, ref_logps: Tensor | None = None,
                     check_values: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """The SPIN loss of a packed batch under the policy ``model``.

    Args:
        ref_logps: [S] reference log-probs; default ``batch.ref_logps`` (see ``reference_logps``).
        beta, loss_type, impl, average, check_values: as in ``spin_kernels.ops.linear_spin_loss``
            (see ``sequence_logps`` for check_values=False on packed batches).

    Returns:
        (loss, metrics) as ``linear_spin_loss``: a scalar mean over pairs, and detached metrics.
    """
    ref = ref_logps if ref_logps is not None else batch.ref_logps
    if ref is None:
        raise ValueError("no reference log-probs: batch.ref_logps is None and ref_logps was not given; "
                         "compute them with reference_logps(batch, ref_model=... or policy=...)")
    hidden = packed_hidden_states(model, batch)
    head = lm_head_kwargs(model)
    weight = head.pop("weight")
    return linear_spin_loss(hidden, weight, batch.targets, batch.cu_seqlens, ref.to(hidden.device), beta=beta,
                            loss_type=loss_type, ignore_index=IGNORE_INDEX, average=average, impl=impl,
                            check_values=check_values, **head)


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def reference_logps(batch: PackedBatch, *, ref_model=None, policy=None, impl: str = "auto",
                    average: bool = False) -> Tensor:
    """The opponent's per-sequence log-probs for ``batch``, from one of three sources:

    * ``ref_model``: a frozen prepared model, run in eval mode under ``torch.inference_mode``;
    * ``policy``: a prepared peft model; its adapter is disabled for the pass (LoRA: the base
      model is the reference), eval mode, inference mode;
    * neither: ``batch.ref_logps`` (precomputed, e.g. right after generation).

    Returns:
        [S] tensor without autograd history (a normal tensor, usable in a later backward).
    """
    if ref_model is not None and policy is not None:
        raise ValueError("give ref_model or policy, not both")
    if ref_model is None and policy is None:
        if batch.ref_logps is None:
            raise ValueError("batch.ref_logps is None: pass ref_model= (a frozen model) or policy= (a peft model)")
        return batch.ref_logps
    if policy is not None and not hasattr(policy, "disable_adapter"):
        raise TypeError(f"policy must be a peft model with an adapter (has disable_adapter()), "
                        f"got {type(policy).__name__}; pass a separate frozen model as ref_model instead")
    model = ref_model if ref_model is not None else policy
    adapter_off = policy.disable_adapter() if policy is not None else nullcontext()
    with _eval_mode(model), adapter_off, torch.inference_mode():
        logps = sequence_logps(model, batch, impl=impl, average=average)
    return logps.clone()  # a clone outside inference mode is a normal tensor
