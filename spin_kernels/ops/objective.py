"""The SPIN objective on per-sequence log-probabilities (docs/spin-math.md).

Everything here works on small per-pair tensors ([P] or [S] = [2P]) and is the one home of
the loss formulas: the public ``spin_loss`` and every fused path (torch, C++ epilogue tests,
Triton) use these functions so that the loss, its gradient and the metrics agree by
construction.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_TYPES = ("sigmoid", "hinge")


def check_loss_options(beta: float, loss_type: str) -> None:
    """Raise ValueError unless ``beta > 0`` (finite) and ``loss_type`` is known."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    if not (beta > 0 and beta < float("inf")):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def pair_losses(margin: Tensor, loss_type: str) -> Tensor:
    """Per-pair loss l(m): sigmoid -> log(1 + exp(-m)), hinge -> max(0, 1 - m). Shape [P]."""
    if loss_type == "sigmoid":
        return -torch.nn.functional.logsigmoid(margin)
    return torch.relu(1.0 - margin)


def pair_loss_slopes(margin: Tensor, loss_type: str) -> Tensor:
    """dl/dm per pair, shape [P]: sigmoid -> -sigmoid(-m), hinge -> -1 where m < 1, else 0."""
    if loss_type == "sigmoid":
        return -torch.sigmoid(-margin)
    return -(margin < 1.0).to(margin.dtype)


def spin_metrics(
    policy_real: Tensor, policy_synthetic: Tensor, ref_real: Tensor, ref_synthetic: Tensor, beta: float
) -> dict[str, Tensor]:
    """The SPIN metrics, each a detached scalar tensor (mean over pairs; 0 for no pair), float32
    (float64 when the policy log-probs are float64)."""
    dtype = torch.promote_types(policy_real.dtype, torch.float32)
    with torch.no_grad():
        reward_real = beta * (policy_real.detach().to(dtype) - ref_real.detach().to(dtype))
        reward_syn = beta * (policy_synthetic.detach().to(dtype) - ref_synthetic.detach().to(dtype))
        margin = reward_real - reward_syn

        def mean(x: Tensor) -> Tensor:
            return x.to(dtype).mean() if x.numel() else x.new_zeros((), dtype=dtype)

        return {
            "rewards/real": mean(reward_real),
            "rewards/synthetic": mean(reward_syn),
            "rewards/margin": mean(margin),
            "rewards/accuracy": mean(margin > 0),
            "logps/real": mean(policy_real.detach()),
            "logps/synthetic": mean(policy_synthetic.detach()),
        }


def token_metrics(seq_stats: Tensor) -> dict[str, Tensor]:
    """TRL's per-token metrics from the fused pass's per-sequence sums (docs/ops.md).

    Args:
        seq_stats: [4, S], sequences in interleaved pairs (2p real, 2p+1 synthetic); rows: the
            counted rows of each sequence, and the sums over them of the entropy, of the mean
            logit and of the top-1 hits (``library.spin_forward``).

    Returns:
        Detached scalars (float32, float64 for float64 sums), token-weighted means, 0 where there
        is no counted row: ``entropy`` (all sequences), ``logits/real``, ``logits/synthetic``,
        ``token_accuracy/real``, ``token_accuracy/synthetic``; and ``tokens/real``,
        ``tokens/synthetic``, the counted rows, to weight the means when gathering them.
    """
    dtype = torch.promote_types(seq_stats.dtype, torch.float32)
    with torch.no_grad():
        tokens, entropy, mean_logit, top1 = seq_stats.detach().to(dtype)
        out = {"entropy": entropy.sum() / tokens.sum().clamp(min=1)}
        for kind, part in (("real", slice(0, None, 2)), ("synthetic", slice(1, None, 2))):
            count = tokens[part].sum()
            out[f"logits/{kind}"] = mean_logit[part].sum() / count.clamp(min=1)
            out[f"token_accuracy/{kind}"] = top1[part].sum() / count.clamp(min=1)
            out[f"tokens/{kind}"] = count
        return out


def spin_loss(
    policy_real_logps: Tensor,
    policy_synthetic_logps: Tensor,
    ref_real_logps: Tensor,
    ref_synthetic_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> tuple[Tensor, dict[str, Tensor]]:
    """SPIN loss from per-sequence log-probabilities (plain autograd).

    Args:
        policy_real_logps, policy_synthetic_logps: [P] floating, log p_theta of the real and the
            synthetic response of each pair (gradients flow into these).
        ref_real_logps, ref_synthetic_logps: [P] floating, the opponent's log-probs (detached).
        beta: > 0, the scale of the margin.
        loss_type: "sigmoid" (log(1 + exp(-m)), the paper's) or "hinge" (max(0, 1 - m)).

    Returns:
        (loss, metrics): loss is a scalar (mean over pairs, 0 when P == 0) in the promoted dtype
        of the policy log-probs (at least float32); metrics is a dict of detached scalar tensors
        rewards/real, rewards/synthetic, rewards/margin, rewards/accuracy, logps/real,
        logps/synthetic.
    """
    check_loss_options(beta, loss_type)
    tensors = {
        "policy_real_logps": policy_real_logps,
        "policy_synthetic_logps": policy_synthetic_logps,
        "ref_real_logps": ref_real_logps,
        "ref_synthetic_logps": ref_synthetic_logps,
    }
    shape = policy_real_logps.shape if isinstance(policy_real_logps, Tensor) else None
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.dim() != 1 or t.shape != shape:
            raise ValueError(f"{name} must be 1-D of the same shape [P] as policy_real_logps {tuple(shape)}, "
                             f"got {tuple(t.shape)}")
        if t.device != policy_real_logps.device:
            raise ValueError(f"{name} is on {t.device}, policy_real_logps on {policy_real_logps.device}")
    dtype = torch.promote_types(policy_real_logps.dtype, torch.float32)
    pol_r, pol_s = policy_real_logps.to(dtype), policy_synthetic_logps.to(dtype)
    ref_r, ref_s = ref_real_logps.detach().to(dtype), ref_synthetic_logps.detach().to(dtype)
    margin = beta * ((pol_r - ref_r) - (pol_s - ref_s))
    losses = pair_losses(margin, loss_type)
    loss = losses.mean() if losses.numel() else losses.sum()
    return loss, spin_metrics(pol_r, pol_s, ref_r, ref_s, beta)


def spin_terms(
    seq_logps: Tensor, ref_logps: Tensor, beta: float, loss_type: str, num_pairs: int
) -> tuple[Tensor, Tensor]:
    """Loss contribution and per-sequence gradient of a group of whole pairs.

    Args:
        seq_logps: [2Q] policy log-probs of Q pairs, interleaved (real, synthetic).
        ref_logps: [2Q] the reference log-probs in the same order.
        num_pairs: P, the number of pairs of the whole batch (the loss is a mean over P).

    Returns:
        (loss_sum, grad): loss_sum is a scalar, sum over the Q pairs of l(m) / P; grad [2Q] is
        dLoss/dseq_logps (real: beta * l'(m) / P, synthetic: -beta * l'(m) / P).
    """
    pol = seq_logps.view(-1, 2)
    ref = ref_logps.to(seq_logps.dtype).view(-1, 2)
    margin = beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    loss_sum = pair_losses(margin, loss_type).sum() / num_pairs
    slope = pair_loss_slopes(margin, loss_type) * (beta / num_pairs)
    grad = torch.stack([slope, -slope], dim=1).reshape(-1)
    return loss_sum, grad
