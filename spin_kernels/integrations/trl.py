"""SPIN in TRL: ``SPINTrainer``, a ``trl.DPOTrainer`` on padding-free packed batches with the fused loss.

    from spin_kernels.integrations.trl import SPINTrainer
    trainer = SPINTrainer(model=model, args=DPOConfig(...), train_dataset=ds, processing_class=tok)
    trainer.train()     # ds rows: {"prompt", "real", "synthetic"} (or DPO's "chosen" / "rejected")

What it keeps from TRL's DPOTrainer (1.16): the constructor and its arguments, the ``DPOConfig``,
dataset preparation and tokenisation (prompt / completion split, EOS added to plain-text
completions, ``max_length`` with ``truncation_mode="keep_start"``), reference handling (a live
``ref_model``, a PEFT policy whose reference is its adapter disabled or TRL's "ref" adapter copy,
``precompute_ref_log_probs``), metric logging, checkpoints, accelerate. What it replaces:

* collation: each micro-batch's pairs are packed into one padding-free row (``cu_seqlens``,
  ``position_ids`` restarting per sequence; ``spin_kernels.packing.pack_batch``), real and
  synthetic interleaved, instead of TRL's padded ``[2B, L]`` batch;
* the forward: the decoder runs once over the packed tokens with the varlen attention of
  ``spin_kernels.models.prepare_model`` (no padding, no attention across sequences), and the loss
  is ``linear_spin_loss`` straight from the last hidden states and the lm_head weight: no logits,
  not even chunks of them kept between forward and backward;
* precomputed reference log-probs may come with the data: columns ``ref_chosen_logps`` /
  ``ref_rejected_logps`` (TRL's names), ``ref_real_logps`` / ``ref_synthetic_logps``, or
  ``ref_logps`` = ``[real, synthetic]`` (the pairs files of ``spin-kernels reference``); with
  ``precompute_ref_log_probs=True`` they are used as they are, otherwise TRL computes them (on
  packed batches too) before training.

Logged metrics keep TRL's names so dashboards carry over: ``rewards/chosen`` (= SPIN's
``rewards/real``), ``rewards/rejected`` (``rewards/synthetic``), ``rewards/margins``
(``rewards/margin``), ``rewards/accuracies`` (``rewards/accuracy``), ``logps/chosen``,
``logps/rejected``, ``num_tokens``. TRL's ``entropy``, ``logits/chosen``, ``logits/rejected`` and
``mean_token_accuracy`` need vocabulary-wide statistics of every token, which the fused loss does
not compute; they are not logged.

Refused, with a message (they need per-token statistics or padded layouts the fused SPIN loss does
not have): ``loss_type`` other than one of "sigmoid" / "hinge", ``loss_weights`` other than
``[1.0]``, ``ld_alpha``, ``f_divergence_type`` other than "reverse_kl", ``use_weighting``,
``truncation_mode="keep_end"``, ``compute_metrics`` (no logits exist), vision-language data,
MoE router auxiliary losses. ``padding_free`` is ignored: batches are always packed.

Sharded lm_heads (FSDP2 ``fully_shard`` DTensors) are gathered around the fused call by
``spin_kernels.distributed.unsharded_lm_head``. accelerate does not run FSDP on CPU, so on CPU
the distributed path is a model sharded with ``fully_shard`` before it is handed to the trainer
(see ``SPINTrainer``'s docstring and docs/integrations.md).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

try:
    from trl import DPOConfig, DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as exc:  # pragma: no cover - exercised by the import-guard test in a fresh interpreter
    raise ImportError("spin_kernels.integrations.trl needs TRL: pip install trl "
                      "(pip install 'spin_kernels[trl]' installs the tested version, TRL 1.16)") from exc

from ..distributed.full_params import unsharded_lm_head
from ..models import is_prepared, packed_hidden_states, prepare_model, unwrap_model
from ..ops import linear_logprobs, linear_spin_loss
from ..ops.sharded import is_dtensor
from ..packing import IGNORE_INDEX, PackedBatch, SpinExample, pack_batch

LOSS_TYPES = ("sigmoid", "hinge")
# SPIN's names (spin_kernels.ops metrics) -> TRL's DPO names.
METRIC_NAMES = {
    "rewards/real": "rewards/chosen",
    "rewards/synthetic": "rewards/rejected",
    "rewards/margin": "rewards/margins",
    "rewards/accuracy": "rewards/accuracies",
    "logps/real": "logps/chosen",
    "logps/synthetic": "logps/rejected",
}
_REF = ("ref_chosen_logps", "ref_rejected_logps")


def spin_columns(dataset):
    """A dataset with SPIN's columns renamed to TRL's preference columns (None passes through).

    ``real`` -> ``chosen``, ``synthetic`` -> ``rejected``, ``ref_real_logps`` / ``ref_synthetic_logps``
    -> ``ref_chosen_logps`` / ``ref_rejected_logps``, and a ``ref_logps`` column of ``[real,
    synthetic]`` pairs is split into those two. A dict of datasets (eval splits) is mapped per split.

    Raises:
        ValueError: both a SPIN column and the TRL column it maps to are present.
    """
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return type(dataset)({k: spin_columns(v) for k, v in dataset.items()})
    columns = list(dataset.column_names or next(iter(dataset)).keys())
    renames = {"real": "chosen", "synthetic": "rejected", "ref_real_logps": _REF[0], "ref_synthetic_logps": _REF[1]}
    for spin_name, trl_name in renames.items():
        if spin_name in columns:
            if trl_name in columns:
                raise ValueError(f"the dataset has both {spin_name!r} and {trl_name!r} columns; keep one of them")
            dataset = dataset.rename_column(spin_name, trl_name)
    if "ref_logps" in columns:
        if any(name in columns for name in _REF):
            raise ValueError(f"the dataset has both 'ref_logps' and {_REF}; keep one of them")

        def split(row):
            pair = row["ref_logps"]
            if pair is None or len(pair) != 2:
                raise ValueError(f"ref_logps must be [real, synthetic] (two numbers), got {pair!r}")
            return {_REF[0]: float(pair[0]), _REF[1]: float(pair[1])}

        dataset = dataset.map(split, remove_columns=["ref_logps"])
    return dataset


@dataclass
class PackedPreferenceCollator:
    """TRL's tokenised preference rows -> one padding-free packed batch.

    Each row holds ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (TRL's ``_prepare_dataset``) and
    optionally ``ref_chosen_logps`` / ``ref_rejected_logps``. Truncation is TRL's ``keep_start``:
    prompt + completion is cut to ``max_length`` tokens (TRL drops rows whose prompt alone fills
    it), exactly as ``trl.trainer.dpo_trainer.DataCollatorForPreference`` does before padding.

    Returns:
        dict of ``spin_kernels.packing.PackedBatch`` fields: ``input_ids [T]``, ``position_ids
        [T]``, ``cu_seqlens [2B+1]`` int32, ``max_seqlen`` (int), ``targets [T]`` (-100 on prompt
        rows and each sequence's last row), ``example_index [B]`` (row order in the batch) and,
        when the rows carry them, ``ref_logps [2B]`` float32; sequences interleaved (chosen 0,
        rejected 0, chosen 1, ...).
    """

    max_length: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        examples = []
        for i, row in enumerate(rows):
            prompt, chosen, rejected = list(row["prompt_ids"]), list(row["chosen_ids"]), list(row["rejected_ids"])
            if self.max_length is not None:
                keep = self.max_length - len(prompt)
                if keep <= 0:
                    raise ValueError(f"row {i}: the prompt ({len(prompt)} tokens) fills max_length={self.max_length}; "
                                     "no completion token would be scored")
                chosen, rejected = chosen[:keep], rejected[:keep]
            ref = None
            if _REF[0] in row and _REF[1] in row:
                ref = (float(row[_REF[0]]), float(row[_REF[1]]))
            examples.append(SpinExample(prompt_ids=prompt, real_ids=chosen, synthetic_ids=rejected, ref_logps=ref,
                                        index=i))
        batch = pack_batch(examples)
        out = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "cu_seqlens": batch.cu_seqlens,
               "max_seqlen": batch.max_seqlen, "targets": batch.targets, "example_index": batch.example_index}
        if batch.ref_logps is not None:
            out["ref_logps"] = batch.ref_logps
        return out


def _as_packed(inputs: dict[str, Any]) -> PackedBatch:
    return PackedBatch(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                       cu_seqlens=inputs["cu_seqlens"], max_seqlen=int(inputs["max_seqlen"]), targets=inputs["targets"],
                       ref_logps=inputs.get("ref_logps"), example_index=inputs["example_index"])


def _check_args(args: DPOConfig, compute_metrics) -> None:
    """Refuse what the fused packed SPIN loss cannot honour, before TRL does any work."""
    loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    if len(loss_types) != 1 or loss_types[0] not in LOSS_TYPES:
        raise ValueError(f"SPINTrainer trains loss_type 'sigmoid' (the SPIN paper's) or 'hinge', one at a time; got "
                         f"loss_type={args.loss_type!r}. TRL's other DPO losses (and combinations of losses) need "
                         "per-token statistics or length normalisation that the fused SPIN loss does not compute: "
                         "use trl.DPOTrainer for them")
    if args.loss_weights not in (None, [1.0], [1]):
        raise ValueError(f"loss_weights={args.loss_weights!r}: SPINTrainer trains one loss with weight 1.0")
    refused = {
        "ld_alpha": (args.ld_alpha, None),
        "f_divergence_type": (args.f_divergence_type, "reverse_kl"),
        "use_weighting": (args.use_weighting, False),
        "truncation_mode": (args.truncation_mode, "keep_start"),
    }
    for name, (value, default) in refused.items():
        if value != default:
            raise ValueError(f"{name}={value!r} is not supported by SPINTrainer (the fused SPIN loss on packed "
                             f"batches); leave it at {default!r} or use trl.DPOTrainer")
    if compute_metrics is not None:
        raise ValueError("compute_metrics needs logits, which SPINTrainer never forms (that is its point); log from "
                         "a callback instead, the rewards/* and logps/* metrics are logged already")


class SPINTrainer(DPOTrainer):
    """TRL's DPOTrainer for SPIN data, on padding-free packed batches with the fused SPIN loss.

    Arguments: those of ``trl.DPOTrainer`` (TRL 1.16), plus keyword-only ``impl`` (the fused ops'
    backend: "auto", "torch", "cpu", "triton"). The dataset has ``prompt``, ``real`` and
    ``synthetic`` columns (or ``chosen`` / ``rejected``; standard or conversational), optionally
    precomputed reference log-probs (see the module docstring).

    The loss of a micro-batch of B pairs is DPO's with ``beta`` on the (policy - reference) margins
    of (real, synthetic), the SPIN objective (docs/spin-math.md), mean over the B pairs: the same
    number and the same gradients as ``trl.DPOTrainer`` on the same data (tests/test_trl_trainer.py).

    Reference: ``precompute_ref_log_probs=True`` reads them from the dataset or computes them once
    before training; otherwise a live ``ref_model``, or the PEFT policy with its adapter disabled
    (TRL's "ref" adapter when the model came with a trained one). Unlike TRL, which reloads the
    reference from ``model.config._name_or_path``, a ``ref_model=None`` for a full fine-tune is a
    frozen copy of ``model`` as passed (the SPIN opponent θ_t is the model before this iteration;
    models built from a config have no path to reload).

    Sharded models: an lm_head that FSDP2 left sharded (a DTensor) is gathered around the fused
    call (``spin_kernels.distributed.unsharded_lm_head``). accelerate only enables FSDP on
    accelerators; on CPU, shard the model with ``fully_shard`` yourself before constructing the
    trainer under torchrun (``spin_kernels.integrations.trl.presharded`` marks it so accelerate
    does not wrap it in DDP).
    """

    _tag_names = ["trl", "dpo", "spin", "spin_kernels"]
    _name = "SPIN"
    _paper = {
        "title": "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models",
        "id": "2401.01335",
        "citation": "@inproceedings{chen2024selfplay, title={{Self-Play Fine-Tuning Converts Weak Language Models "
                    "to Strong Language Models}}, author={Zixiang Chen and Yihe Deng and Huizhuo Yuan and Kaixuan Ji "
                    "and Quanquan Gu}, booktitle={ICML}, year={2024}}",
    }

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, *, impl: str = "auto"):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = DPOConfig(f"{name.split('/')[-1]}-SPIN")
        _check_args(args, compute_metrics)
        # SPINTrainer always packs; TRL would warn that its own padding-free mode is unavailable.
        args.padding_free = False
        train_dataset = spin_columns(train_dataset)
        eval_dataset = spin_columns(eval_dataset)
        if train_dataset is not None:
            sample = next(iter(train_dataset))
            if "image" in sample or "images" in sample:
                raise ValueError("SPINTrainer packs text-only batches; vision-language data needs trl.DPOTrainer")
        if (ref_model is None and not isinstance(model, str) and peft_config is None
                and not _is_peft(model) and not args.precompute_ref_log_probs):
            if any(is_dtensor(p) for p in model.parameters()):
                raise ValueError("model is sharded (DTensor parameters) and ref_model is None: pass a ref_model "
                                 "(sharded the same way) or use precompute_ref_log_probs=True")
            ref_model = copy.deepcopy(model).requires_grad_(False)
        self.impl = impl
        with _dtensor_aware_hash():
            super().__init__(model, ref_model=ref_model, args=args,
                             data_collator=data_collator or PackedPreferenceCollator(max_length=args.max_length),
                             train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                             compute_metrics=None, callbacks=callbacks, optimizers=optimizers,
                             quantization_config=quantization_config, peft_config=peft_config)
        if self.aux_loss_enabled:
            raise ValueError("MoE router auxiliary losses are not computed on packed batches; set "
                             "router_aux_loss_coef=0.0 or use trl.DPOTrainer")
        if self._is_vlm:
            raise ValueError("SPINTrainer packs text-only batches; vision-language models need trl.DPOTrainer")

    # -- models --------------------------------------------------------------------------------
    @staticmethod
    def _packed(model):
        """The model, switched to the varlen attention packed batches need (once)."""
        inner = unwrap_model(model)
        if not is_prepared(inner):
            prepare_model(inner)
        return model

    def _adapter_off(self):
        """TRL's reference for a PEFT policy without ref_model: its "ref" adapter copy if TRL made one
        (the model came with a trained adapter), else all adapters disabled; a no-op otherwise."""
        if self.ref_model is None and _is_peft(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return nullcontext()

    def _reference_logps(self, model, batch: PackedBatch) -> Tensor:
        """[2B] log-probs of the batch under the reference reached through ``model``, no autograd."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self._adapter_off():
            hidden = packed_hidden_states(self._packed(model), batch)
            with unsharded_lm_head(model) as head:
                return linear_logprobs(hidden, targets=batch.targets, cu_seqlens=batch.cu_seqlens,
                                       ignore_index=IGNORE_INDEX, impl=self.impl, check_values=False, **head)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of a packed batch: ``(chosen [B], rejected [B])``, no autograd.

        ``model`` is the one TRL's precompute pass hands over (the reference, or the policy before
        training); with a PEFT policy and no ref_model the adapter is switched off around it.
        """
        with self.accelerator.autocast():
            logps = self._reference_logps(model, _as_packed(inputs))
        return logps[0::2], logps[1::2]

    # -- the loss ------------------------------------------------------------------------------
    def _reference(self, batch: PackedBatch) -> Tensor:
        if self.precompute_ref_logps:
            if batch.ref_logps is None:
                raise ValueError("precompute_ref_log_probs=True but the batch carries no reference log-probs "
                                 f"(dataset columns {_REF})")
            return batch.ref_logps
        return self._reference_logps(self.ref_model if self.ref_model is not None else self.model, batch)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        batch = _as_packed(inputs)
        ref = self._reference(batch)
        hidden = packed_hidden_states(self._packed(model), batch)
        with unsharded_lm_head(model) as head:
            weight = head.pop("weight")
            loss, metrics = linear_spin_loss(hidden, weight, batch.targets, batch.cu_seqlens,
                                             ref.to(hidden.device), beta=self.beta,
                                             loss_type=self.loss_types[0], ignore_index=IGNORE_INDEX, impl=self.impl,
                                             check_values=False, **head)
        self._log_metrics(mode, metrics, batch)
        if return_outputs:
            return loss, {}
        return loss

    def _log_metrics(self, mode: str, metrics: dict[str, Tensor], batch: PackedBatch) -> None:
        """TRL's metric names, averaged over all pairs of all processes (micro-batches may differ in size)."""
        pairs = float(batch.num_pairs)
        device = self.accelerator.device
        sums = torch.stack([metrics[k].to(device, torch.float64) for k in METRIC_NAMES]) * pairs
        counts = torch.tensor([pairs, float(batch.num_tokens)], dtype=torch.float64, device=device)
        total = self.accelerator.gather(torch.cat([sums, counts])[None]).sum(0).tolist()  # one host sync
        for i, spin_name in enumerate(METRIC_NAMES):
            self._metrics[mode][METRIC_NAMES[spin_name]].append(total[i] / total[-2])
        if mode == "train":
            self._total_train_tokens += int(total[-1])
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss only (there are no logits to return)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """Reference log-probs that came with the data are used as they are (TRL would recompute them)."""
        if all(col in (dataset.column_names or []) for col in _REF):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


@contextmanager
def _dtensor_aware_hash():
    """TRL fingerprints the reference weights (the cache key of precomputed log-probs) with
    ``tensor.numpy()``, which DTensors refuse: a pre-sharded model would fail in the constructor.
    While TRL's constructor runs, a DTensor contributes its local shard (TRL broadcasts rank 0's
    fingerprint, so every rank uses one key)."""
    from trl.trainer import dpo_trainer

    original = dpo_trainer.hash_module

    def hash_module(module):
        if not any(is_dtensor(t) for t in module.state_dict().values()):
            return original(module)
        local = torch.nn.Module()
        for i, (name, t) in enumerate(sorted(module.state_dict().items())):
            local.register_buffer(f"t{i}", (t.to_local() if is_dtensor(t) else t).detach())
        return original(local)

    dpo_trainer.hash_module = hash_module
    try:
        yield
    finally:
        dpo_trainer.hash_module = original


def _is_peft(model) -> bool:
    from accelerate.utils import is_peft_model

    return is_peft_model(model)


def presharded(model):
    """Mark a model sharded with FSDP2 ``fully_shard`` before the trainer sees it (CPU / gloo).

    accelerate enables FSDP only on accelerators; on CPU it would wrap the multi-process model in
    DDP, which refuses DTensor parameters. FSDP2 already synchronises gradients (reduce-scatter in
    backward), so the model is marked as prepared and accelerate leaves it alone; the trainer's data
    loader still gives each process its own share of every batch.

    Returns:
        the same model.
    """
    if not any(is_dtensor(p) for p in model.parameters()):
        raise ValueError("presharded(model) expects a model sharded with fully_shard (DTensor parameters)")
    model._is_accelerate_prepared = True
    return model


__all__ = ["LOSS_TYPES", "METRIC_NAMES", "PackedPreferenceCollator", "SPINTrainer", "presharded", "spin_columns"]
