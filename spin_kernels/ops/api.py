"""The public fused ops: validate, pick a backend, call the autograd Function.

Layout (../shared/docs/spin-math.md): ``hidden [N, H]`` last hidden states of all tokens of
all sequences, concatenated; ``weight [V, H]`` the lm_head; ``targets [N]`` the token each row
predicts (shifted inside its own sequence) or ``ignore_index``; ``cu_seqlens [S+1]`` with
sequence i owning rows ``cu[i]:cu[i+1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .autograd import LinearLogprobsFunction, LinearSPINLossFunction
from .backends import HeadSpec, resolve_backend
from .objective import check_loss_options, spin_metrics
from .validation import check_head_options, check_linear_inputs


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    cu_seqlens: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    average: bool = False,
    impl: str = "auto",
    check_values: bool = True,
) -> Tensor:
    """Per-sequence log-probabilities straight from hidden states, without [N, V] logits.

    Args:
        hidden: [N, H] float16/bfloat16/float32/float64.
        weight: [V, H] the lm_head (may be a view, e.g. tied embeddings).
        targets: [N] int32/int64, values in [0, V) or ``ignore_index``.
        cu_seqlens: [S+1] int32/int64, 0 = cu[0] <= ... <= cu[S] = N.
        bias: optional [V].
        temperature: logits are divided by it (> 0).
        softcap: if set, z = softcap * tanh(u / softcap) (Gemma-2 style).
        average: mean over counted tokens instead of the sum (0 for a sequence with none).
        impl: "auto" | "torch" | "triton" | "cpu".
        check_values: check the values of targets and cu_seqlens, and that the counted rows of
            hidden are finite (one host synchronisation on a GPU). False skips it, for inputs
            known to be good: on the Triton path the call then never waits for the GPU; a bad
            value gives wrong numbers, never a memory error.

    Returns:
        [S] float32 (float64 for float64 inputs): sum over counted rows of log softmax(z)[target].
    """
    if torch.compiler.is_compiling():  # one opaque custom op; it validates when it runs
        from .library import linear_logprobs_via_library

        return linear_logprobs_via_library(hidden, weight, targets, cu_seqlens, bias, ignore_index, temperature,
                                           softcap, average, impl, check_values)
    check_head_options(ignore_index, temperature, softcap, average, impl)
    check_linear_inputs(hidden, weight, targets, cu_seqlens, bias, ignore_index, check_values)
    backend = resolve_backend(impl, hidden.device)
    spec = HeadSpec(float(temperature), None if softcap is None else float(softcap))
    return LinearLogprobsFunction.apply(hidden, weight, bias, targets, cu_seqlens, ignore_index, spec, average, backend)


def linear_spin_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    cu_seqlens: Tensor,
    ref_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    average: bool = False,
    impl: str = "auto",
    check_values: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The SPIN loss of a packed batch of (real, synthetic) pairs, fused with the lm_head.

    Sequences are interleaved pairs: sequence 2p is the real response of pair p, 2p+1 its
    synthetic one. Arguments as in ``linear_logprobs``, plus:

    Args:
        ref_logps: [S] floating, the opponent's per-sequence log-probs in the same order
            (no gradient flows into it).
        beta: > 0; loss_type: "sigmoid" (default, the paper's) or "hinge".
        check_values: as in ``linear_logprobs``, and ref_logps must be finite (in the same single
            synchronisation); with False and impl="triton" the whole call (loss, metrics and the
            gradients it computes) runs without a host synchronisation.

    Returns:
        (loss, metrics): loss a float32 scalar (mean over pairs); metrics a dict of detached
        scalars rewards/real, rewards/synthetic, rewards/margin, rewards/accuracy, logps/real,
        logps/synthetic. When gradients are needed they are computed in the forward pass.
    """
    if torch.compiler.is_compiling():  # one opaque custom op; it validates when it runs
        from .library import linear_spin_loss_via_library

        loss, seq = linear_spin_loss_via_library(hidden, weight, targets, cu_seqlens, ref_logps, bias, ignore_index,
                                                 temperature, softcap, average, beta, loss_type, impl,
                                                 check_values)
    else:
        check_loss_options(beta, loss_type)
        check_head_options(ignore_index, temperature, softcap, average, impl)
        check_linear_inputs(hidden, weight, targets, cu_seqlens, bias, ignore_index, check_values, ref_logps,
                            spin=True)
        backend = resolve_backend(impl, hidden.device)
        spec = HeadSpec(float(temperature), None if softcap is None else float(softcap))
        loss, seq = LinearSPINLossFunction.apply(
            hidden, weight, bias, targets, cu_seqlens, ref_logps, ignore_index, spec, average, float(beta),
            loss_type, backend)
    ref = ref_logps.detach().to(seq.dtype)
    return loss, spin_metrics(seq[0::2], seq[1::2], ref[0::2], ref[1::2], float(beta))


class LinearSPINLoss(nn.Module):
    """Module form of ``linear_spin_loss``: options in the constructor.

    ``forward(hidden [N, H], weight [V, H], targets [N], cu_seqlens [S+1], ref_logps [S])``
    returns ``(loss, metrics)``.
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        ignore_index: int = -100,
        temperature: float = 1.0,
        softcap: float | None = None,
        average: bool = False,
        impl: str = "auto",
        check_values: bool = True,
    ):
        super().__init__()
        check_loss_options(beta, loss_type)
        check_head_options(ignore_index, temperature, softcap, average, impl)
        self.beta, self.loss_type, self.ignore_index = beta, loss_type, ignore_index
        self.temperature, self.softcap, self.average, self.impl = temperature, softcap, average, impl
        self.check_values = check_values

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, cu_seqlens: Tensor, ref_logps: Tensor,
                bias: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return linear_spin_loss(
            hidden, weight, targets, cu_seqlens, ref_logps, beta=self.beta, loss_type=self.loss_type, bias=bias,
            ignore_index=self.ignore_index, temperature=self.temperature, softcap=self.softcap,
            average=self.average, impl=self.impl, check_values=self.check_values)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, temperature={self.temperature}, "
                f"softcap={self.softcap}, average={self.average}, impl={self.impl!r}")

