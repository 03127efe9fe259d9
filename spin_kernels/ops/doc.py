"""The argument docs the fused ops share, written once, so that ``help()`` shows every argument.

``with_doc`` fills the ``{tensors}``, ``{ref_logps}``, ``{spin_options}``, ``{head_options}``,
``{logprobs_options}`` and ``{spin_returns}`` fields of a docstring with the parts below (indented for the ``Args:``
and ``Returns:`` sections of a function's docstring).
"""

from __future__ import annotations

TENSORS = """\
        hidden: [N, H] float16/bfloat16/float32/float64, the last hidden states of all tokens of
            all sequences, concatenated (the packed layout of docs/spin-math.md).
        weight: [V, H] float16/bfloat16/float32/float64, the lm_head (may be a view, e.g. tied
            embeddings).
        targets: [N] int32/int64, the token each row predicts (shifted inside its own sequence):
            in [0, V), or ``ignore_index``.
        cu_seqlens: [S+1] int32/int64, 0 = cu[0] <= ... <= cu[S] = N; sequence i owns rows
            cu[i]:cu[i+1].
        bias: None or [V] floating.
        Sharded heads: weight and bias may be DTensors on a 1-D mesh (FSDP2 ``fully_shard``:
            Shard(0); tensor parallelism: Shard(0), Shard(1), Replicate; bias Shard(0) or
            Replicate), hidden a Replicate one; they are gathered for the call and their
            gradients come back as DTensors with their placements, averaged over the mesh
            (ops/sharded.py). Other layouts: TypeError naming the argument and its placement."""

REF_LOGPS = """\
        ref_logps: [S] floating, the opponent's per-sequence log-probs in the same order as the
            sequences (no gradient flows into it). S = 2P sequences form P pairs, laid out as
            ``pairs`` says."""

SPIN_OPTIONS = """\
        beta: > 0, the scale of the margin m = beta * ((logp(y) - ref(y)) - (logp(y') - ref(y'))).
        loss_type: "sigmoid" (log(1 + exp(-m)), the default, the paper's) or "hinge"
            (max(0, 1 - m)).
        pairs: the layout of the pairs among the sequences: "interleaved" (the default:
            sequence 2p is the real response of pair p, 2p+1 its synthetic one; what
            spin_kernels.packing produces) or "halves" (sequences 0..P-1 are the real
            responses, P..2P-1 the synthetic ones in the same pair order: TRL's and Liger's
            chosen-then-rejected concatenation). Read in place, without copying hidden.
        token_metrics: also TRL's per-token metrics, computed in the fused pass (docs/ops.md):
            entropy, logits/real, logits/synthetic, token_accuracy/real,
            token_accuracy/synthetic, and the counted rows tokens/real, tokens/synthetic.
            Off (the default) costs nothing."""

LOGPROBS_OPTIONS = """\
        (cu_seqlens may be None here: one sequence of all N rows.)
        reduction: "sum" (per sequence), "mean" (per sequence, over its counted rows) or "none"
            (per row [N]); None: "mean" if average else "sum".
        return_entropy: also return the entropy of each row's softmax, reduced as the log-probs
            and differentiable as they are (computed in the same pass; off costs nothing)."""

HEAD_OPTIONS = """\
        ignore_index: the target of rows that do not count (prompt tokens, the last token of
            each sequence, padding): no vocabulary work, exactly zero gradient.
        temperature: logits are divided by it (> 0).
        softcap: None, or > 0: z = softcap * tanh(u / softcap) (Gemma-2 style).
        average: mean over counted tokens instead of the sum (0 for a sequence with none).
        impl: "auto" | "torch" | "triton" | "cpu" (README.md, "Implementations").
        check_values: check the values of targets and cu_seqlens, that the counted rows of
            hidden are finite and (the SPIN ops) that ref_logps is finite, in one host
            synchronisation on a GPU. False skips it, for inputs known to be good: impl="triton"
            then runs the whole call (outputs, metrics and the gradients) without one; a bad
            value gives wrong numbers, never a memory error."""

SPIN_RETURNS = """\
        (loss, metrics): loss a float32 scalar (float64 for float64 inputs), the mean over pairs;
        metrics a dict of detached scalars rewards/real, rewards/synthetic, rewards/margin,
        rewards/accuracy, logps/real, logps/synthetic (means over pairs), and with
        token_metrics the token metrics. When gradients are needed they are computed in the
        forward pass."""


def with_doc(obj):
    """Decorator: the object's docstring with its fields filled from the parts above."""
    obj.__doc__ = obj.__doc__.format(tensors=TENSORS, ref_logps=REF_LOGPS, spin_options=SPIN_OPTIONS,
                                     head_options=HEAD_OPTIONS, logprobs_options=LOGPROBS_OPTIONS,
                                     spin_returns=SPIN_RETURNS)
    return obj
