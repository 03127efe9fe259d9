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
  comes straight from the last hidden states and the lm_head weight, never forming logits: the
  one-pass ``linear_spin_loss`` for "sigmoid" / "hinge" (gradients computed in its forward), and
  for every other objective the fused sequence log-probs (``linear_logprobs``, logits recomputed
  chunk by chunk in its backward) fed to ``dpo_losses.DPOLoss``, TRL's formulas on sequence
  log-probs;
* precomputed reference log-probs may come with the data: columns ``ref_chosen_logps`` /
  ``ref_rejected_logps`` (TRL's names), ``ref_real_logps`` / ``ref_synthetic_logps``, or
  ``ref_logps`` = ``[real, synthetic]`` (the pairs files of ``spin-kernels reference``); with
  ``precompute_ref_log_probs=True`` they are used as they are, otherwise TRL computes them (on
  packed batches too) before training.

Every ``loss_type`` of TRL's DPOTrainer is trained with TRL's semantics (``dpo_losses``): "sigmoid",
"hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
"apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", lists of them with ``loss_weights``,
``label_smoothing``, ``discopop_tau``, every ``f_divergence_type`` TRL accepts, and ``ld_alpha``
(LD-DPO: one fused call over each sequence split at the shorter completion's length,
``ld_segments``).

Logged metrics keep TRL's names so dashboards carry over: ``rewards/chosen`` (= SPIN's
``rewards/real``), ``rewards/rejected`` (``rewards/synthetic``), ``rewards/margins``
(``rewards/margin``), ``rewards/accuracies`` (``rewards/accuracy``), ``logps/chosen``,
``logps/rejected``, ``num_tokens``. TRL's per-token ``entropy``, ``logits/chosen``,
``logits/rejected`` and ``mean_token_accuracy`` are per-row reductions the fused pass can
accumulate beside its log-sum-exp: they are logged (``TOKEN_METRICS``, averaged over the tokens of
all processes as TRL does) from ``linear_spin_loss(token_metrics=True)`` (docs/ops.md), for
"sigmoid" / "hinge"; the other loss types' fused log-probs (``linear_logprobs``) do not offer
them yet.

Refused, with a message naming the option: ``use_weighting`` (WPO needs every token's sum of
squared probabilities over the vocabulary), ``truncation_mode="keep_end"`` (deprecated by TRL),
``compute_metrics`` (no logits exist), TRL's padding collators as ``data_collator`` (batches must be
packed), vision-language data, MoE router auxiliary losses. ``padding_free`` is ignored: batches
are always packed.

Sharded lm_heads (FSDP2 ``fully_shard`` DTensors) are gathered around the fused call by
``spin_kernels.distributed.unsharded_lm_head``. accelerate does not run FSDP on CPU, so on CPU
the distributed path is a model sharded with ``fully_shard`` before it is handed to the trainer
(see ``SPINTrainer``'s docstring and docs/integrations.md).
"""

from __future__ import annotations

import copy
import functools
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
from ..ops.objective import spin_metrics
from ..ops.sharded import is_dtensor
from ..packing import IGNORE_INDEX, PackedBatch, SpinExample, pack_batch
from .dpo_losses import LOSS_TYPES, DPOLoss, PairLogps
# SPIN's names (spin_kernels.ops metrics) -> TRL's DPO names.
METRIC_NAMES = {
    "rewards/real": "rewards/chosen",
    "rewards/synthetic": "rewards/rejected",
    "rewards/margin": "rewards/margins",
    "rewards/accuracy": "rewards/accuracies",
    "logps/real": "logps/chosen",
    "logps/synthetic": "logps/rejected",
}
# TRL's per-token metrics -> (the fused op's token-weighted mean, the token counts it is over):
# ``linear_spin_loss(..., token_metrics=True)`` (docs/ops.md). TRL averages them over the tokens of
# all processes, so each is logged as gathered sum(mean * tokens) / gathered sum(tokens).
TOKEN_METRICS = {
    "entropy": ("entropy", ("tokens/real", "tokens/synthetic")),
    "logits/chosen": ("logits/real", ("tokens/real",)),
    "logits/rejected": ("logits/synthetic", ("tokens/synthetic",)),
    "mean_token_accuracy": ("token_accuracy/real", ("tokens/real",)),
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
        rejected 0, chosen 1, ...); and ``completion_lengths [2B]`` int64, the completion tokens
        kept after truncation in the same order (TRL's ``completion_mask`` sums: the per-token
        averages of "ipo" and "sigmoid_norm" divide by them).
    """

    max_length: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        examples, lengths = [], []
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
            lengths += [len(chosen), len(rejected)]
        batch = pack_batch(examples)
        out = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "cu_seqlens": batch.cu_seqlens,
               "max_seqlen": batch.max_seqlen, "targets": batch.targets, "example_index": batch.example_index,
               "completion_lengths": torch.tensor(lengths, dtype=torch.int64)}
        if batch.ref_logps is not None:
            out["ref_logps"] = batch.ref_logps
        return out


PACKED_KEYS = ("input_ids", "position_ids", "cu_seqlens", "max_seqlen", "targets", "example_index")


def _as_packed(inputs: dict[str, Any]) -> PackedBatch:
    missing = [k for k in PACKED_KEYS if k not in inputs]
    if missing:
        raise ValueError(f"data_collator: SPINTrainer needs packed batches with {list(PACKED_KEYS)} (what "
                         f"PackedPreferenceCollator returns); this batch has {sorted(inputs)}, without {missing}. "
                         "Leave data_collator=None (SPINTrainer packs the rows itself) or pass a "
                         "PackedPreferenceCollator")
    return PackedBatch(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                       cu_seqlens=inputs["cu_seqlens"], max_seqlen=int(inputs["max_seqlen"]), targets=inputs["targets"],
                       ref_logps=inputs.get("ref_logps"), example_index=inputs["example_index"])


def _check_data_collator(data_collator) -> None:
    """TRL's own collators pad ``[2B, L]`` batches; SPINTrainer's forward needs packed ones."""
    from trl.trainer import dpo_trainer

    padded = tuple(getattr(dpo_trainer, name) for name in ("DataCollatorForPreference",
                                                           "DataCollatorForVisionPreference")
                   if hasattr(dpo_trainer, name))
    if isinstance(data_collator, padded):
        raise ValueError(f"data_collator={type(data_collator).__name__}(...) pads each micro-batch to [2B, L] "
                         "(input_ids, attention_mask, completion_mask); SPINTrainer trains on padding-free packed "
                         f"batches ({', '.join(PACKED_KEYS)}). Leave data_collator=None: SPINTrainer packs the rows "
                         "with PackedPreferenceCollator(max_length=args.max_length), keeping TRL's truncation")


def _check_args(args: DPOConfig, compute_metrics) -> DPOLoss:
    """Refuse what the fused packed loss cannot honour, before TRL does any work; the loss to train."""
    loss = DPOLoss.from_config(args)  # ValueError naming an unknown loss_type / f_divergence_type
    refused = {
        # WPO weights need each token's sum over the vocabulary of p^2: a statistic of the full logits.
        "use_weighting": (args.use_weighting, False, "it needs every token's sum of squared probabilities over "
                          "the vocabulary, which the fused ops do not compute"),
        "truncation_mode": (args.truncation_mode, "keep_start", "TRL deprecates 'keep_end'"),
    }
    for name, (value, default, why) in refused.items():
        if value != default:
            raise ValueError(f"{name}={value!r} is not supported by SPINTrainer ({why}); leave it at {default!r} or "
                             "use trl.DPOTrainer")
    if compute_metrics is not None:
        raise ValueError("compute_metrics needs logits, which SPINTrainer never forms (that is its point); log from "
                         "a callback instead, the rewards/* and logps/* metrics are logged already")
    return loss


def ld_segments(cu_seqlens: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """LD-DPO's split of each packed sequence for the fused sums: [2S+1] int32 offsets.

    Sequence i's scored rows are contiguous and end just before its last row (prompt rows, then
    completion rows, then the last row, which predicts nothing). Each pair's shared length is the
    smaller of its two scored counts; segment 2i holds sequence i up to and including its first
    ``shared`` scored rows, segment 2i+1 the rest. ``linear_logprobs`` over these segments gives
    (shared, tail) sums per sequence: TRL's ``shared_logps`` and ``tail_logps``.

    Args:
        cu_seqlens: [S+1] int32 of S = 2B interleaved sequences (chosen, rejected, ...).
        targets: [T] int64 with ``ignore_index`` on unscored rows.
    """
    cu = cu_seqlens.long()
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff())
    scored = torch.zeros(cu.numel() - 1, dtype=torch.long, device=cu.device)
    scored.index_add_(0, seq, (targets != ignore_index).long())
    shared = torch.minimum(scored[0::2], scored[1::2]).repeat_interleave(2)
    split = cu[1:] - 1 - scored + shared
    return torch.cat([torch.stack([cu[:-1], split], 1).flatten(), cu[-1:]]).to(torch.int32)


def _pair_logps(seq: Tensor, sums: Tensor, ref: Tensor, batch: PackedBatch,
                completion_lengths: Tensor | None) -> PairLogps:
    """``DPOLoss``'s input from [2B] interleaved policy log-probs (as scored, and plain sums) and
    reference log-probs of a packed batch.

    Completion lengths come from the collator (``completion_lengths``); a collator without them
    gives the scored counts, the same numbers unless a prompt is empty.
    """
    cu = batch.cu_seqlens.long()
    seq_id = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff())
    scored = torch.zeros(cu.numel() - 1, dtype=seq.dtype, device=seq.device)
    scored.index_add_(0, seq_id.to(seq.device), (batch.targets != IGNORE_INDEX).to(seq.device, seq.dtype))
    lengths = scored if completion_lengths is None else completion_lengths.to(seq.device, seq.dtype)
    return PairLogps(chosen=seq[0::2], rejected=seq[1::2], ref_chosen=ref[0::2], ref_rejected=ref[1::2],
                     chosen_tokens=lengths[0::2], rejected_tokens=lengths[1::2], chosen_scored=scored[0::2],
                     chosen_sum=None if sums is seq else sums[0::2])


class SPINTrainer(DPOTrainer):
    """TRL's DPOTrainer for SPIN data, on padding-free packed batches with the fused SPIN loss.

    Arguments: those of ``trl.DPOTrainer`` (TRL 1.16), plus keyword-only ``impl`` (the fused ops'
    backend: "auto", "torch", "cpu", "triton"). The dataset has ``prompt``, ``real`` and
    ``synthetic`` columns (or ``chosen`` / ``rejected``; standard or conversational), optionally
    precomputed reference log-probs (see the module docstring).

    The loss of a micro-batch of B pairs is the configured DPO objective on the (policy - reference)
    log-ratios of (real, synthetic); with the default "sigmoid" the SPIN objective
    (docs/spin-math.md), mean over the B pairs: the same number and the same gradients as
    ``trl.DPOTrainer`` on the same data, for every loss type (tests/test_trl_trainer.py).

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
        self.dpo_loss = _check_args(args, compute_metrics)
        _check_data_collator(data_collator)
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

    def _head_logps(self, hidden: Tensor, head: dict, batch: PackedBatch) -> tuple[Tensor, Tensor]:
        """Sequence log-probs from the last hidden states with the fused op (autograd when enabled):
        ``(logps [2B], sums [2B])``, sums over each completion's scored tokens; ``logps`` are the
        same sums, or with ``ld_alpha`` LD-DPO's shared + ld_alpha * tail (one fused call either way)."""
        if self.ld_alpha is None:
            sums = linear_logprobs(hidden, targets=batch.targets, cu_seqlens=batch.cu_seqlens,
                                   ignore_index=IGNORE_INDEX, impl=self.impl, check_values=False, **head)
            return sums, sums
        parts = linear_logprobs(hidden, targets=batch.targets, cu_seqlens=ld_segments(batch.cu_seqlens, batch.targets),
                                ignore_index=IGNORE_INDEX, impl=self.impl, check_values=False, **head)
        return parts[0::2] + self.ld_alpha * parts[1::2], parts[0::2] + parts[1::2]

    def _reference_logps(self, model, batch: PackedBatch) -> Tensor:
        """[2B] log-probs of the batch under the reference reached through ``model``, no autograd."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self._adapter_off():
            hidden = packed_hidden_states(self._packed(model), batch)
            with unsharded_lm_head(model) as head:
                return self._head_logps(hidden, head, batch)[0]

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
        """The configured DPO loss of a packed micro-batch. "sigmoid" / "hinge" alone: the one-pass
        fused SPIN loss (gradients computed in its forward). Every other objective: the fused
        sequence log-probs (``linear_logprobs``, logits recomputed in its backward) into ``DPOLoss``."""
        mode = "train" if self.model.training else "eval"
        batch = _as_packed(inputs)
        ref = self._reference(batch)
        hidden = packed_hidden_states(self._packed(model), batch)
        with unsharded_lm_head(model) as head:
            ref = ref.to(hidden.device)
            if self.dpo_loss.is_spin_loss and self.ld_alpha is None:
                weight = head.pop("weight")
                loss, metrics = linear_spin_loss(hidden, weight, batch.targets, batch.cu_seqlens, ref,
                                                 beta=self.beta, loss_type=self.dpo_loss.loss_types[0],
                                                 ignore_index=IGNORE_INDEX, impl=self.impl, check_values=False,
                                                 token_metrics=True, **head)
            else:
                seq, sums = self._head_logps(hidden, head, batch)
                loss = self.dpo_loss(_pair_logps(seq, sums, ref.to(seq.dtype), batch, inputs.get("completion_lengths")))
                metrics = spin_metrics(seq[0::2], seq[1::2], ref[0::2], ref[1::2], self.beta)
        self._log_metrics(mode, metrics, batch)
        if return_outputs:
            return loss, {}
        return loss

    def _log_metrics(self, mode: str, metrics: dict[str, Tensor], batch: PackedBatch) -> None:
        """TRL's metric names: the rewards and log-probs averaged over all pairs of all processes
        (micro-batches may differ in size), the per-token metrics (when the fused op gave them) over
        all their tokens, as TRL does; one gather, one host sync."""
        pairs = float(batch.num_pairs)
        device = self.accelerator.device
        f64 = functools.partial(torch.as_tensor, dtype=torch.float64, device=device)
        values = [f64(metrics[k]) * pairs for k in METRIC_NAMES]
        token_names = [name for name, (key, _) in TOKEN_METRICS.items() if key in metrics]
        for name in token_names:
            key, counted = TOKEN_METRICS[name]
            tokens = sum(f64(metrics[c]) for c in counted)
            values += [f64(metrics[key]) * tokens, tokens]
        values += [f64(pairs), f64(float(batch.num_tokens))]
        total = self.accelerator.gather(torch.stack(values)[None]).sum(0).tolist()
        for i, spin_name in enumerate(METRIC_NAMES):
            self._metrics[mode][METRIC_NAMES[spin_name]].append(total[i] / total[-2])
        for j, name in enumerate(token_names):
            value, tokens = total[len(METRIC_NAMES) + 2 * j:len(METRIC_NAMES) + 2 * j + 2]
            self._metrics[mode][name].append(value / tokens if tokens > 0 else 0.0)  # TRL: 0.0 without tokens
        if mode == "train":
            self._total_train_tokens += int(total[-1])
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """TRL's ``evaluate``; a dataset (or dict of them) passed here may have SPIN's columns
        (``real`` / ``synthetic``, ``ref_logps``), as the constructor's ``eval_dataset`` may."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = spin_columns(eval_dataset)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                metric_key_prefix=metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss only (there are no logits to return)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """Reference log-probs that came with the data are used as they are (TRL would recompute them)."""
        if all(col in (dataset.column_names or []) for col in _REF):
            if self.ld_alpha is not None:
                raise ValueError(f"ld_alpha={self.ld_alpha} with reference log-probs in the {name} dataset: LD-DPO "
                                 "weighs each sequence's tokens past the shorter completion's length by ld_alpha, "
                                 "and log-probs computed elsewhere are plain sums; drop the columns "
                                 f"{_REF} (or ref_logps) so that SPINTrainer computes them")
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


__all__ = ["LOSS_TYPES", "METRIC_NAMES", "PACKED_KEYS", "PackedPreferenceCollator", "SPINTrainer", "ld_segments",
           "presharded", "spin_columns"]
