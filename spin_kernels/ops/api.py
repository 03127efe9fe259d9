"""The public fused ops on packed rows: validate once, then call the op's autograd Function.

``linear_logprobs``, ``linear_spin_loss`` and the module ``LinearSPINLoss`` build their options
(``options.py``, validated there) and check the tensors' types, shapes, dtypes and devices
(``validation.check_linear_inputs``) here; the values are checked inside the op, where the
data is (``library.py``). The same code runs in eager mode and under ``torch.compile``.
Layout and math: docs/spin-math.md.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .autograd import LinearLogprobsFunction, LinearSPINLossFunction
from .doc import with_doc
from .objective import spin_metrics, token_metrics
from .options import LogprobsOptions, SpinOptions
from .sharded import Sharding
from .validation import check_linear_inputs


@with_doc
def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    cu_seqlens: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    average: bool = False,
    reduction: str | None = None,
    return_entropy: bool = False,
    impl: str = "auto",
    check_values: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of the targets straight from hidden states, without [N, V] logits.

    Args:
{tensors}
{head_options}
{logprobs_options}

    Returns:
        logps, float32 (float64 for float64 inputs): per sequence [S], the sum over its counted
        rows of log softmax(z)[target] (the mean with reduction="mean"), or per row [N] with
        reduction="none" (0 on rows whose target is ignore_index). With return_entropy,
        (logps, entropy), the entropy of each row's softmax reduced the same way. Both are
        differentiable in hidden, weight and bias.
    """
    opts = LogprobsOptions.checked(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                                   average=average, reduction=reduction, return_entropy=return_entropy, impl=impl,
                                   check_values=check_values)
    if cu_seqlens is None and isinstance(hidden, Tensor):
        cu_seqlens = torch.tensor([0, hidden.shape[0]], device=hidden.device)
    sharding = Sharding.of(hidden, weight, bias, targets=targets, cu_seqlens=cu_seqlens)
    check_linear_inputs(hidden, weight, targets, cu_seqlens, bias)
    logps, entropy = LinearLogprobsFunction.apply(hidden, weight, bias, targets, cu_seqlens, opts, sharding)
    return (logps, entropy) if return_entropy else logps


@with_doc
def linear_spin_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    cu_seqlens: Tensor,
    ref_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    pairs: str = "interleaved",
    token_metrics: bool = False,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    average: bool = False,
    impl: str = "auto",
    check_values: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The SPIN loss of a packed batch of (real, synthetic) pairs, fused with the lm_head.

    Args:
{tensors}
{ref_logps}
{spin_options}
{head_options}

    Returns:
{spin_returns}
    """
    opts = SpinOptions.checked(beta=beta, loss_type=loss_type, pairs=pairs, token_metrics=token_metrics,
                               ignore_index=ignore_index, temperature=temperature, softcap=softcap, average=average,
                               impl=impl, check_values=check_values)
    return _spin_loss(hidden, weight, targets, cu_seqlens, ref_logps, bias, opts)


def _spin_loss(hidden: Tensor, weight: Tensor, targets: Tensor, cu_seqlens: Tensor, ref_logps: Tensor,
               bias: Tensor | None, opts: SpinOptions) -> tuple[Tensor, dict[str, Tensor]]:
    """``linear_spin_loss`` with its options already checked."""
    sharding = Sharding.of(hidden, weight, bias, targets=targets, cu_seqlens=cu_seqlens, ref_logps=ref_logps)
    check_linear_inputs(hidden, weight, targets, cu_seqlens, bias, ref_logps, spin=True)
    if not torch.is_grad_enabled():
        # No backward will come, but a Function's needs_input_grad says only requires_grad:
        # detached inputs tell the op to skip the gradients it would compute in the forward.
        hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()
    loss, seq, seq_stats = LinearSPINLossFunction.apply(hidden, weight, bias, targets, cu_seqlens, ref_logps, opts,
                                                        sharding)
    # seq is in the interleaved order (library.spin_forward); ref_logps in the caller's.
    ref = ref_logps.detach().to(seq.dtype)
    half = ref.shape[0] // 2
    ref_real, ref_synthetic = (ref[0::2], ref[1::2]) if opts.pairs == "interleaved" else (ref[:half], ref[half:])
    metrics = spin_metrics(seq[0::2], seq[1::2], ref_real, ref_synthetic, opts.beta)
    if opts.token_metrics:
        metrics.update(token_metrics(seq_stats))
    return loss, metrics


@with_doc
class LinearSPINLoss(nn.Module):
    """Module form of ``linear_spin_loss``: the options in the constructor, checked there.

    ``forward(hidden [N, H], weight [V, H], targets [N], cu_seqlens [S+1], ref_logps [S],
    bias=None)`` returns ``(loss, metrics)``.

    Args (the constructor's, keyword-only):
{spin_options}
{head_options}
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        pairs: str = "interleaved",
        token_metrics: bool = False,
        ignore_index: int = -100,
        temperature: float = 1.0,
        softcap: float | None = None,
        average: bool = False,
        impl: str = "auto",
        check_values: bool = True,
    ):
        super().__init__()
        self.options = SpinOptions.checked(beta=beta, loss_type=loss_type, pairs=pairs, token_metrics=token_metrics,
                                           ignore_index=ignore_index,
                                           temperature=temperature, softcap=softcap, average=average, impl=impl,
                                           check_values=check_values)

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, cu_seqlens: Tensor, ref_logps: Tensor,
                bias: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return _spin_loss(hidden, weight, targets, cu_seqlens, ref_logps, bias, self.options)

    def extra_repr(self) -> str:
        o = self.options
        return (f"beta={o.beta}, loss_type={o.loss_type!r}, pairs={o.pairs!r}, temperature={o.temperature}, "
                f"softcap={o.softcap}, average={o.average}, impl={o.impl!r}")
