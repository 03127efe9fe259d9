"""The contract between the op layer and a kernel backend.

The op layer (the custom ops' kernels in ``spin_kernels/ops/library.py``) validates inputs,
compacts the counted rows (``CountedRows``), does segment sums and the SPIN epilogue. A backend
only does the vocabulary-sized work on counted rows, given the op's options whole
(``options.HeadOptions``: temperature and softcap form the logits; ``SpinOptions`` adds the
objective's beta, loss_type and average):

* ``rows_forward``  — per-row log-prob and log-sum-exp (2·M·H·V flops) -> ``RowLogprobs``;
  with ``opts.row_stats`` also the per-row statistics (entropy, mean logit, top-1 hit) from the
  same logit tiles, and nothing of them otherwise;
* ``rows_backward`` — gradients from per-row upstream scales (``Upstream``: of the log-probs,
  and of the entropies when they are differentiated), recomputing logits (6·M·H·V) -> ``Grads``;
* ``spin_forward_backward`` — the SPIN loss with its gradients computed in the forward
  -> ``SpinResult``. The default here chains the two above with the shared epilogue (8·M·H·V,
  no host sync); a backend that can hold whole pairs in a tile overrides it with the 6·M·H·V path.

Results are named tuples, read by name: no positional order to get wrong between a backend
and its caller.

Rows: ``hidden [N, H]`` is every row of the batch and ``index [M]`` (ascending) names the
counted ones, whose targets are ``targets [M]`` int64 (``index=None``: hidden is the counted
rows themselves). Gradients for hidden come back shaped like ``hidden``, zero on the rows that
are not counted. A backend that cannot read rows through an index gathers them first
(``counted_rows``) and scatters the gradients back (``to_all_rows``); the C++ kernels read and
write through it. Results are in the accumulation dtype (float32, or float64 for float64 inputs).

Padded rows: a backend whose ``pads_rows(hidden, weight, bias)`` is true is given the padded
layout of ``CountedRows`` (``index`` [N], every row, counted ones first) and ``count``, int32 [1]
on the device: rows at positions >= count are padding, to be skipped without reading count on
the host (the GPU path with no host synchronisation). Other backends are always given
``count=None``.

Registry (``backends/__init__.py``): a backend is registered under a name, the ``impl`` the ops
are called with; ``unavailable_on(device)`` says why it cannot run there (None: it can).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from ..layout import CountedRows
from ..objective import spin_terms

if TYPE_CHECKING:
    from ..options import HeadOptions, SpinOptions


@dataclass(frozen=True)
class Needs:
    """Which gradients the caller wants (skip the matmuls of the others)."""

    hidden: bool = True
    weight: bool = True
    bias: bool = True


STAT_ROWS = ("entropy", "mean_logit", "top1")  # the rows of RowLogprobs.stats


class RowLogprobs(NamedTuple):
    """Per counted row [M], in the accumulation dtype (0 on padding rows)."""

    logp: Tensor  # log softmax(z)[target]
    lse: Tensor  # log Σ_v exp(z_v): what the backward recomputes the softmax from
    # [3, M] when opts.row_stats, else None; rows STAT_ROWS: the entropy −Σ_v p_v log p_v, the
    # mean logit (1/V) Σ_v z_v, and 1.0 where argmax_v z_v (its first maximal index, as
    # torch.argmax) is the target, else 0.0.
    stats: Tensor | None = None


class Upstream(NamedTuple):
    """What a backward gets per counted row [M]: the forward's lse, ∂L/∂logp and, when the
    entropies are differentiated, their values and ∂L/∂entropy (both or neither)."""

    lse: Tensor
    grad: Tensor
    entropy: Tensor | None = None
    grad_entropy: Tensor | None = None


class Grads(NamedTuple):
    """dhidden shaped like hidden, dweight [V, H], dbias [V]; None where not needed."""

    dhidden: Tensor | None
    dweight: Tensor | None
    dbias: Tensor | None


class SpinResult(NamedTuple):
    """The SPIN loss over whole pairs and its gradients for d loss = 1 (None where not needed)."""

    loss: Tensor  # []
    seq_logps: Tensor  # [S]
    dhidden: Tensor | None
    dweight: Tensor | None
    dbias: Tensor | None
    row_stats: Tensor | None = None  # [3, M] as RowLogprobs.stats when opts.row_stats


def counted_rows(hidden: Tensor, index: Tensor | None) -> Tensor:
    """hidden [N, H] -> the counted rows [M, H] (a gathered copy), or hidden itself if no index."""
    return hidden if index is None else hidden[index]


def to_all_rows(grad_rows: Tensor | None, index: Tensor | None, num_rows: int) -> Tensor | None:
    """Gradients of the counted rows [M, H] -> [num_rows, H], zero on the other rows."""
    if grad_rows is None or index is None:
        return grad_rows
    return grad_rows.new_zeros(num_rows, grad_rows.shape[1]).index_copy_(0, index, grad_rows)


def acc_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


class Backend:
    """Base class; subclasses implement rows_forward and rows_backward."""

    name = "base"

    def unavailable_on(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` (a sentence naming it), or None if it can."""
        return None

    def pads_rows(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
        """Whether the op layer should hand this backend the padded row layout for these inputs."""
        return False

    def rows_forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                     opts: HeadOptions, index: Tensor | None = None, count: Tensor | None = None) -> RowLogprobs:
        """hidden [N, H] with index [M] (or [M, H]), weight [V, H], bias [V] | None, targets [M]."""
        raise NotImplementedError

    def rows_backward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                      upstream: Upstream, opts: HeadOptions, needs: Needs, index: Tensor | None = None,
                      count: Tensor | None = None) -> Grads:
        """The gradients of Σ_n grad_n logp_n (+ grad_entropy_n entropy_n) over the counted rows,
        in the accumulation dtype (a backend may return dhidden and dweight in the inputs' dtypes
        when it accumulates in fp32 and rounds at the end, as Triton's does)."""
        raise NotImplementedError

    def spin_forward_backward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: CountedRows,
                              ref_logps: Tensor, opts: SpinOptions, needs: Needs) -> SpinResult:
        """SPIN loss and its gradients (for d loss = 1) over whole pairs.

        hidden [N, H] are all rows (``rows.index`` names the counted ones); ref_logps [S].
        """
        fwd = self.rows_forward(hidden, weight, bias, rows.targets, opts, rows.index, rows.count)
        seq = rows.seq_logps(fwd.logp, opts.average)
        loss, seq_grad = spin_terms(seq, ref_logps, opts.beta, opts.loss_type, max(rows.num_seqs // 2, 1))
        grads = self.rows_backward(hidden, weight, bias, rows.targets,
                                   Upstream(fwd.lse, rows.row_grads(seq_grad, opts.average)), opts, needs, rows.index,
                                   rows.count)
        return SpinResult(loss, seq, *grads, fwd.stats)
