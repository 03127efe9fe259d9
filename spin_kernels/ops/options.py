"""The scalar options of the fused ops, validated once and then carried whole.

``api.py`` builds them with ``checked`` (the one place their values are validated); the autograd
Functions of ``autograd.py`` carry them; the custom ops of ``library.py`` take them as scalars
(a ``torch.library`` op takes only tensors and scalars), ``scalars()`` in field order, and
rebuild them unchecked; the backends (``backends/``) take them whole.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .objective import check_loss_options
from .validation import check_head_options, check_pairs


@dataclass(frozen=True)
class HeadOptions:
    """How the lm_head's logits are formed and summed, and how the op runs (``doc.HEAD_ARGS``).

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

    def scalars(self) -> tuple:
        """The fields in order: the custom ops' scalar arguments."""
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class SpinOptions(HeadOptions):
    """HeadOptions and the SPIN objective's: ``beta``, ``loss_type`` and the layout of the pairs,
    ``pairs`` (``doc.SPIN_OPTIONS``)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    pairs: str = "interleaved"

    def _validated(self):
        check_loss_options(self.beta, self.loss_type)  # first, as the SPIN ops always have
        check_pairs(self.pairs)
        return replace(super()._validated(), beta=float(self.beta))
