"""The scalar options of the fused ops, validated once and then carried whole.

``api.py`` builds them with ``checked`` (the one place their values are validated); the autograd
Functions of ``autograd.py`` carry them; the custom ops of ``library.py`` take them as scalars
(a ``torch.library`` op takes only tensors and scalars), ``scalars()`` in field order, and
rebuild them unchecked; the backends (``backends/``) take them whole.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .objective import check_loss_options
from .validation import check_flag, check_head_options, check_pairs, check_reduction


@dataclass(frozen=True)
class HeadOptions:
    """How the lm_head's logits are formed and summed, and how the op runs (``doc.HEAD_OPTIONS``).

    The logits: z = softcap·tanh(((W h + b) / temperature) / softcap) (no tanh when softcap is None).
    """

    ignore_index: int = -100
    temperature: float = 1.0
    softcap: float | None = None
    average: bool = False
    impl: str = "auto"
    check_values: bool = True

    @classmethod
    def checked(cls, **options):
        """The options, validated (TypeError/ValueError naming the option), with the float
        options as floats, as the custom ops' schemas declare them."""
        return cls(**options)._validated()

    def _validated(self):
        check_head_options(self.ignore_index, self.temperature, self.softcap, self.average, self.impl,
                           self.check_values)
        return replace(self, temperature=float(self.temperature),
                       softcap=None if self.softcap is None else float(self.softcap))

    @property
    def row_stats(self) -> bool:
        """Whether a backend's forward computes the per-row statistics (``RowLogprobs.stats``)."""
        return False

    def scalars(self) -> tuple:
        """The fields in order: the custom ops' scalar arguments."""
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class LogprobsOptions(HeadOptions):
    """HeadOptions and ``linear_logprobs``'s own: ``reduction`` ("sum", "mean" or "none"; given
    as None it follows ``average``, which then equals reduction == "mean") and
    ``return_entropy``."""

    reduction: str | None = None
    return_entropy: bool = False

    def _validated(self):
        check_reduction(self.reduction, self.average)
        check_flag("return_entropy", self.return_entropy)
        reduction = self.reduction or ("mean" if self.average else "sum")
        return replace(super()._validated(), reduction=reduction, average=reduction == "mean")

    @property
    def row_stats(self) -> bool:
        return self.return_entropy


@dataclass(frozen=True)
class SpinOptions(HeadOptions):
    """HeadOptions and the SPIN objective's: ``beta``, ``loss_type``, the layout of the pairs,
    ``pairs``, and ``token_metrics`` (``doc.SPIN_OPTIONS``)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    pairs: str = "interleaved"
    token_metrics: bool = False

    def _validated(self):
        check_loss_options(self.beta, self.loss_type)  # first, as the SPIN ops always have
        check_pairs(self.pairs)
        check_flag("token_metrics", self.token_metrics)
        return replace(super()._validated(), beta=float(self.beta))

    @property
    def row_stats(self) -> bool:
        return self.token_metrics
