"""TRL's DPO losses on per-sequence log-probs: the one home of their formulas in spin_kernels.

Every ``loss_type`` of ``trl.DPOTrainer`` (TRL 1.16, ``DPOTrainer._compute_loss``) reads the
policy's and the reference's per-sequence log-probs, summed over the completion tokens, and at most
the completion lengths: none needs the logits. ``DPOLoss`` computes them from those [B] tensors
with TRL's semantics, so that the fused ops (which give the sums without forming logits) can feed
them:

* ``f_divergence_type`` turns the log-ratios into scores ("reverse_kl": the log-ratios; "forward_kl",
  "js_divergence", "alpha_divergence" as TRL);
* each loss type is a per-pair loss, averaged over the micro-batch's pairs; ``loss_weights`` weigh
  the averages of a list of loss types (``["sigmoid", "sft"]``: RPO);
* "ipo" and "sigmoid_norm" average the scores per completion token (TRL's ``completion_mask``
  sums, prompt excluded), "sft" is the mean log-prob of the chosen tokens that are scored,
  "aot" / "aot_unpaired" sort log-ratios across the micro-batch, "robust", "exo_pair", "aot" and
  "aot_unpaired" use ``label_smoothing``, "discopop" uses ``discopop_tau``.

TRL 1.16's "bco_pair" is a plain per-pair loss (no running reward mean: that lives in its
BCOTrainer). Options that need more than sequence sums are not here: ``use_weighting`` (WPO) needs
each token's Σ p² over the vocabulary; ``ld_alpha`` needs the log-prob sums split at the shorter
completion's length, which the caller does (two sums per sequence) before calling ``DPOLoss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL's rule: the f-DPO reparameterisation leaves a beta * log Z(x) term that cancels only in a
# chosen-minus-rejected score difference; the other losses have no f-divergence form.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


@dataclass(frozen=True)
class PairLogps:
    """Sequence log-probs of a micro-batch of B pairs, [B] each, float32 or float64.

    Attributes:
        chosen, rejected: the policy's, summed over the completion tokens (gradients flow through).
        ref_chosen, ref_rejected: the reference's, same sums (no gradient is taken through them).
        chosen_tokens, rejected_tokens: completion lengths (TRL's ``completion_mask`` sums: every
            completion token kept after truncation), for "ipo" and "sigmoid_norm".
        chosen_scored: the chosen completion tokens that are scored (those with a preceding token;
            all of them unless the prompt is empty), for "sft".
        chosen_sum: the plain sum of the chosen tokens' log-probs, for "sft": ``chosen`` itself
            (None) unless LD-DPO weighs the tokens past the shorter completion (``ld_alpha``).
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    chosen_scored: Tensor
    chosen_sum: Tensor | None = None


@dataclass(frozen=True)
class _Terms:
    """What the loss formulas read: the inputs, log-ratios and (f-divergence) scores, [B] each."""

    x: PairLogps
    chosen_logratios: Tensor
    rejected_logratios: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor

    @property
    def delta(self) -> Tensor:
        return self.chosen_scores - self.rejected_scores


def _scores(logratios: Tensor, kind: str, alpha: float) -> Tensor:
    """TRL's f'(π/π_ref) of a log-ratio for f-DPO; the log-ratio itself for "reverse_kl"."""
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        # TRL clamps the exponent by dtype so that exp() stays representable.
        clamp_max = {torch.float16: 11.0}.get(logratios.dtype, 80.0)
        t = torch.clamp(((alpha - 1.0) * logratios).float(), max=clamp_max)
        return (torch.exp(t) - 1.0).to(logratios.dtype) / (alpha - 1.0)
    return logratios  # reverse_kl, and alpha_divergence's limit alpha -> 1


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log σ(z) - eps log σ(-z): the logistic loss with labels smoothed by eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _per_token(t: _Terms) -> Tensor:
    """The score margin with each score averaged over its completion's tokens (ipo, sigmoid_norm)."""
    return (t.chosen_scores / t.x.chosen_tokens.clamp(min=1.0)
            - t.rejected_scores / t.x.rejected_tokens.clamp(min=1.0))


def _exo_pair(t: _Terms, o: DPOLoss) -> Tensor:
    # KL(softmax(beta * scores) || [1 - eps, eps]) over {chosen, rejected} (EXO, Eq. 16).
    z = o.beta * t.delta
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-o.label_smoothing))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(o.label_smoothing)))


def _discopop(t: _Terms, o: DPOLoss) -> Tensor:
    z = o.beta * t.delta
    mix = torch.sigmoid(z / o.discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def _aot(t: _Terms, o: DPOLoss) -> Tensor:
    # Sorted across the micro-batch: the policy's chosen-minus-rejected log-prob gaps against the reference's.
    gaps = torch.sort(t.x.chosen - t.x.rejected, dim=0).values
    ref_gaps = torch.sort(t.x.ref_chosen - t.x.ref_rejected, dim=0).values
    return _smoothed_logistic(o.beta * (gaps - ref_gaps), o.label_smoothing)


def _aot_unpaired(t: _Terms, o: DPOLoss) -> Tensor:
    delta = torch.sort(t.chosen_logratios, dim=0).values - torch.sort(t.rejected_logratios, dim=0).values
    return _smoothed_logistic(o.beta * delta, o.label_smoothing)


def _sft(t: _Terms, o: DPOLoss) -> Tensor:
    # The mean log-prob of all scored chosen tokens of the micro-batch, the same for every pair.
    chosen = t.x.chosen if t.x.chosen_sum is None else t.x.chosen_sum
    mean = chosen.sum() / t.x.chosen_scored.sum().clamp(min=1.0)
    return (-mean).expand(t.x.chosen.shape[0])


# loss_type -> per-pair loss [B] of the terms and the options (TRL 1.16's formulas).
LOSSES: dict[str, Callable[[_Terms, DPOLoss], Tensor]] = {
    "sigmoid": lambda t, o: -F.logsigmoid(o.beta * t.delta),
    "hinge": lambda t, o: torch.relu(1 - o.beta * t.delta),
    "ipo": lambda t, o: (_per_token(t) - 1 / (2 * o.beta)) ** 2,
    "exo_pair": _exo_pair,
    "nca_pair": lambda t, o: (-F.logsigmoid(o.beta * t.chosen_logratios)
                              - 0.5 * F.logsigmoid(-o.beta * t.chosen_logratios)
                              - 0.5 * F.logsigmoid(-o.beta * t.rejected_logratios)),
    "robust": lambda t, o: ((-(1 - o.label_smoothing) * F.logsigmoid(o.beta * t.delta)
                             + o.label_smoothing * F.logsigmoid(-o.beta * t.delta)) / (1 - 2 * o.label_smoothing)),
    "bco_pair": lambda t, o: -F.logsigmoid(o.beta * t.chosen_logratios) - F.logsigmoid(-o.beta * t.rejected_logratios),
    "sppo_hard": lambda t, o: (t.chosen_logratios - 0.5 / o.beta) ** 2 + (t.rejected_logratios + 0.5 / o.beta) ** 2,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": lambda t, o: 1 - torch.sigmoid(o.beta * t.chosen_logratios) + torch.sigmoid(o.beta * t.rejected_logratios),
    "apo_down": lambda t, o: (torch.sigmoid(o.beta * t.chosen_logratios)
                              + 1 - torch.sigmoid(o.beta * (t.chosen_logratios - t.rejected_logratios))),
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": lambda t, o: -F.logsigmoid(o.beta * _per_token(t)),
}
LOSS_TYPES = tuple(LOSSES)


@dataclass(frozen=True)
class DPOLoss:
    """TRL's DPO objective on sequence log-probs: ``sum_k weight_k * mean_pairs(loss_k)``.

    Attributes: ``DPOConfig``'s fields of the same names (``loss_types`` = ``loss_type`` as a list);
    ``from_config`` reads them.
    """

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0

    def __post_init__(self):
        unknown = [t for t in self.loss_types if t not in LOSSES]
        if unknown or not self.loss_types:
            raise ValueError(f"loss_type {unknown or list(self.loss_types)!r} unknown; the loss types on sequence "
                             f"log-probs are {list(LOSS_TYPES)}")
        if len(self.loss_weights) != len(self.loss_types):
            raise ValueError(f"loss_weights {list(self.loss_weights)} must have one weight per loss_type "
                             f"{list(self.loss_types)}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r}: expected one of {F_DIVERGENCES}")
        others = [t for t in self.loss_types if t not in F_DIVERGENCE_LOSSES]
        if self.f_divergence_type != "reverse_kl" and others:
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r} applies to loss types {F_DIVERGENCE_LOSSES} "
                             f"only (as in TRL), not {others}")

    @classmethod
    def from_config(cls, args) -> DPOLoss:
        """From a ``trl.DPOConfig`` (or anything with its fields)."""
        types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
        return cls(loss_types=tuple(types), loss_weights=tuple(args.loss_weights or [1.0] * len(types)),
                   beta=float(args.beta), label_smoothing=float(args.label_smoothing),
                   discopop_tau=float(args.discopop_tau), f_divergence_type=args.f_divergence_type,
                   f_alpha_divergence_coef=float(args.f_alpha_divergence_coef))

    @property
    def is_spin_loss(self) -> bool:
        """True when this is one of the fused SPIN loss's objectives (``linear_spin_loss``): a single
        "sigmoid" or "hinge" of weight 1 on plain log-ratios."""
        return (len(self.loss_types) == 1 and self.loss_types[0] in ("sigmoid", "hinge")
                and self.loss_weights[0] == 1.0 and self.f_divergence_type == "reverse_kl")

    def __call__(self, logps: PairLogps) -> Tensor:
        """The loss (a scalar) of one micro-batch of B >= 1 pairs."""
        chosen_logratios = logps.chosen - logps.ref_chosen.detach()
        rejected_logratios = logps.rejected - logps.ref_rejected.detach()
        terms = _Terms(logps, chosen_logratios, rejected_logratios,
                       _scores(chosen_logratios, self.f_divergence_type, self.f_alpha_divergence_coef),
                       _scores(rejected_logratios, self.f_divergence_type, self.f_alpha_divergence_coef))
        total = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            total = total + LOSSES[loss_type](terms, self).mean() * weight
        return total


__all__ = ["DPOLoss", "F_DIVERGENCES", "LOSSES", "LOSS_TYPES", "PairLogps"]
