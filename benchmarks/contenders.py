"""Who the kernel suite measures: our impls and the baselines, all on the same ``Inputs``.

Ops: ``logprobs`` (per-sequence log-probs, [S]) and ``spin_loss`` (the SPIN loss of
interleaved pairs, a scalar). Modes: ``fwd`` (inputs without gradients, under no_grad: the
reference pass) and ``fwd+bwd`` (forward, then backward into hidden and weight; for logprobs the
upstream gradient is the fixed ``Inputs.seq_grad``).

Contenders:

* ``ours:<impl>`` — ``spin_kernels.ops.linear_logprobs / linear_spin_loss(impl=...)`` for every
  registered impl that runs on the device (torch, cpu, triton).
* ``ours:<impl>+metrics`` — the same with the per-token statistics computed in the fused pass
  (``linear_spin_loss(token_metrics=True)``; ``linear_logprobs(return_entropy=True)``, the
  entropy not differentiated): what they cost over ``ours:<impl>``. Run only when named in
  ``--only`` (e.g. ``--only cpu,cpu+metrics``).
* ``naive`` — full [N, V] logits of every row (prompt rows too) from a matmul in the input dtype,
  cast to fp32, log_softmax, gather, segment sums: the TRL / official-SPIN computation. (Same as
  ``spin_kernels.ops.naive`` in fp32; in bf16 that oracle multiplies in fp32, which no trainer
  does, so the baseline here keeps the matmul in bf16 as the model's lm_head would.)
* ``liger`` — ``LigerFusedLinearDPOLoss(compiled=True, chunk_size=1, use_ref_model=False)`` on
  the padded layout it requires ([2P, T, H], real sequences first, synthetic second, built
  outside the timed region). Liger cannot take precomputed reference log-probs; our ops take
  them as an input. To give it the same work, every contender gets reference log-probs of
  zero, which is what Liger computes with when ``use_ref_model=False``: the same loss, the same
  gradients, the policy head only. (A live reference inside Liger, ``use_ref_model=True``,
  would add a 2·N·H·V no-grad forward that the others do not do.) Liger has no log-prob op: for
  ``logprobs`` / ``fwd`` its no-grad DPO forward returns the same per-sequence log-probs; it
  has no ``logprobs`` / ``fwd+bwd``.
* ``cce`` — Cut Cross-Entropy ``linear_cross_entropy(e, c, targets, reduction="none")``
  (``impl="cce"`` on CUDA, ``"torch_compile"`` on CPU) over all rows (ignored rows skipped by
  CCE), per-token log-probs multiplied by the counted mask, then a segment sum.
* ``trl`` — TRL's ``ChunkedLogProbFunction`` (trl/kernels/chunked_logprob.py; vocab chunk
  32768, token tile 4096) on the counted rows, then a segment sum.
* ``gemm`` — not a contender: the plain matmul [M, H] x [H, V] in the case dtype, timed in the
  same rounds, whose rate turns work into the "GEMM floor".

For the SPIN loss, baselines that give per-sequence log-probs go through
``spin_kernels.ops.spin_loss`` (the one home of the loss formula).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

import torch
from torch import Tensor

from .shapes import Case, Inputs

OPS = ("spin_loss", "logprobs")
MODES = ("fwd+bwd", "fwd")
GEMM_MAX_ROWS = 16384  # the floor GEMM is timed on at most this many rows (its rate is what counts)
TRL_VOCAB_CHUNK = 32768


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _segment_sum(values: Tensor, seq_id: Tensor, num_seqs: int) -> Tensor:
    return torch.zeros(num_seqs, dtype=torch.float32, device=values.device).index_add(0, seq_id, values.float())


def _spin_from_seq(seq: Tensor, inp: Inputs) -> Tensor:
    from spin_kernels.ops import spin_loss

    ref = inp.ref_logps
    return spin_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=0.1)[0]


class Runner:
    """A prepared (contender, inputs, op, mode): ``run()`` does the timed work once.

    ``run()`` returns the op output (detached); ``zero_grad()`` drops gradients of the
    previous run (not timed); ``grads()`` gives (d hidden [N, H] in packed order, d weight).
    """

    def __init__(self, inp: Inputs, op: str, mode: str, forward: Callable[[Tensor, Tensor], Tensor],
                 hidden: Tensor | None = None):
        self.inp, self.op, self.mode, self.forward = inp, op, mode, forward
        grad = mode == "fwd+bwd"
        base = inp.hidden if hidden is None else hidden
        self.hidden = base if grad else base.detach()
        self.weight = inp.weight if grad else inp.weight.detach()

    def run(self) -> Tensor:
        if self.mode == "fwd":
            with torch.no_grad():
                return self.forward(self.hidden, self.weight)
        out = self.forward(self.hidden, self.weight)
        scalar = out if self.op == "spin_loss" else (out * self.inp.seq_grad).sum()
        scalar.backward()
        return out.detach()

    def zero_grad(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None

    def grads(self) -> tuple[Tensor | None, Tensor | None]:
        return self.hidden.grad, self.weight.grad


class Contender:
    """Base: a named way of computing the ops; subclasses set ``forward_for``."""

    name = "base"
    kind = "baseline"  # "ours" | "baseline" | "floor"
    by_default = True  # selected without --only

    def unavailable(self, device: torch.device, dry_run: bool = False) -> str | None:
        """None if it runs on ``device``, else why not. ``dry_run``: the device is the CPU standing
        in for CUDA (benchmarks/dryrun.py): what a CUDA run selects, where the CPU can run it."""
        return None

    def unsupported(self, op: str, mode: str) -> str | None:
        """None if it does (op, mode), else why not."""
        return None

    def version(self) -> str | None:
        return None

    def forward_for(self, inp: Inputs, op: str) -> Callable[[Tensor, Tensor], Tensor]:
        raise NotImplementedError

    def prepare(self, inp: Inputs, op: str, mode: str) -> Runner:
        return Runner(inp, op, mode, self.forward_for(inp, op))


class Ours(Contender):
    kind = "ours"

    def __init__(self, impl: str, metrics: bool = False):
        self.impl, self.metrics = impl, metrics
        self.name = f"ours:{impl}+metrics" if metrics else f"ours:{impl}"
        self.by_default = not metrics

    def unavailable(self, device, dry_run=False):
        from spin_kernels.ops import available_backends
        from spin_kernels.triton.config import interpreting

        if self.impl == "triton" and device.type != "cuda" and not (dry_run and interpreting()):
            return "triton runs on CUDA only (the interpreter is not a benchmark)"
        if self.impl == "cpu" and (device.type != "cpu" or dry_run):
            return "the C++ impl runs on CPU only"
        return available_backends(device).get(self.impl, "not registered")

    def version(self):
        import spin_kernels

        return spin_kernels.__version__

    def forward_for(self, inp, op):
        from spin_kernels.ops import linear_logprobs, linear_spin_loss

        kw = {"softcap": inp.softcap, "impl": self.impl}
        if op == "logprobs":
            if self.metrics:
                return lambda h, w: linear_logprobs(h, w, inp.targets, inp.cu_seqlens, return_entropy=True, **kw)[0]
            return lambda h, w: linear_logprobs(h, w, inp.targets, inp.cu_seqlens, **kw)
        return lambda h, w: linear_spin_loss(h, w, inp.targets, inp.cu_seqlens, inp.ref_logps, beta=0.1,
                                             token_metrics=self.metrics, **kw)[0]


def full_logits_seq_logps(h: Tensor, w: Tensor, inp: Inputs) -> Tensor:
    """The TRL / official-SPIN computation: logits of every row in the input dtype (what the
    model's lm_head returns), cast to fp32, softcap, log_softmax, gather, masked segment sums."""
    logits = (h @ w.t()).float()
    if inp.softcap is not None:
        logits = inp.softcap * torch.tanh(logits / inp.softcap)
    logp = logits.log_softmax(-1).gather(1, inp.targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return _segment_sum(logp * inp.mask, inp.seq_id, inp.case.layout.num_seqs)


class Naive(Contender):
    name = "naive"

    def forward_for(self, inp, op):
        def forward(h, w):
            seq = full_logits_seq_logps(h, w, inp)
            return seq if op == "logprobs" else _spin_from_seq(seq, inp)

        return forward


class Liger(Contender):
    name = "liger"

    def unavailable(self, device, dry_run=False):
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: F401
        except Exception as exc:  # noqa: BLE001 — ImportError, or a broken install on another torch
            return f"liger-kernel does not import ({type(exc).__name__}: {exc})"
        return None

    def unsupported(self, op, mode):
        if op == "logprobs" and mode == "fwd+bwd":
            return "Liger has no log-prob op with a backward (only the DPO loss)"
        return None

    def version(self):
        return _version("liger-kernel")

    def prepare(self, inp, op, mode):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        if inp.softcap is not None:
            raise NotImplementedError("LigerFusedLinearDPOLoss has no logit softcap")
        _allow_recompiles()
        lay = inp.case.layout
        loss_fn = LigerFusedLinearDPOLoss(beta=0.1, compiled=True, use_ref_model=False, average_log_prob=False,
                                          chunk_size=1, loss_type="sigmoid")
        x_pad = _to_padded(inp.hidden.detach(), lay.pairs, lay.seq_len).requires_grad_(mode == "fwd+bwd")
        t_pad = _to_padded(inp.targets, lay.pairs, lay.seq_len)

        def forward(x, w):
            loss, aux = loss_fn(w, x, t_pad)
            if op == "spin_loss":
                return loss
            return torch.stack([aux[0], aux[1]], dim=1).reshape(-1)  # (real, synthetic) interleaved

        return _PaddedRunner(inp, op, mode, forward, x_pad)


def _allow_recompiles(limit: int = 64) -> None:
    """A run visits many shapes; past dynamo's default limit (8) Liger would silently fall back
    to eager mode and look slower than it is."""
    import torch._dynamo

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), limit))


def _to_padded(packed: Tensor, pairs: int, seq_len: int) -> Tensor:
    """Packed interleaved pairs [2P·T, ...] -> Liger's [2P, T, ...]: all real first, then synthetic."""
    rest = packed.shape[1:]
    return packed.reshape(pairs, 2, seq_len, *rest).transpose(0, 1).reshape(2 * pairs, seq_len, *rest).contiguous()


def _from_padded(padded: Tensor, pairs: int) -> Tensor:
    rest = padded.shape[2:]
    seq_len = padded.shape[1]
    return padded.reshape(2, pairs, seq_len, *rest).transpose(0, 1).reshape(2 * pairs * seq_len, *rest)


class _PaddedRunner(Runner):
    """A Runner whose hidden leaf is in Liger's padded layout; grads map back to packed order."""

    def grads(self):
        dh = self.hidden.grad
        return (None if dh is None else _from_padded(dh, self.inp.case.layout.pairs)), self.weight.grad


class CCE(Contender):
    name = "cce"

    def unavailable(self, device, dry_run=False):
        try:
            from cut_cross_entropy import linear_cross_entropy  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"cut-cross-entropy does not import ({type(exc).__name__}: {exc})"
        return None

    def version(self):
        return _version("cut-cross-entropy")

    def forward_for(self, inp, op):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if inp.hidden.device.type == "cuda" else "torch_compile"
        maskf = inp.mask.float()
        num_seqs = inp.case.layout.num_seqs

        def forward(h, w):
            tok = linear_cross_entropy(h, w, inp.targets, softcap=inp.softcap, reduction="none", impl=impl)
            # multiply by the mask before summing: a bare .sum() of CCE's "none" output breaks its backward
            seq = _segment_sum(-(tok.float() * maskf), inp.seq_id, num_seqs)
            return seq if op == "logprobs" else _spin_from_seq(seq, inp)

        return forward


class TRL(Contender):
    name = "trl"

    def unavailable(self, device, dry_run=False):
        try:
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"trl's chunked log-prob kernel does not import ({type(exc).__name__}: {exc})"
        return None

    def version(self):
        return _version("trl")

    def forward_for(self, inp, op):
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        index = inp.mask.nonzero().squeeze(1)
        targets, seq_id = inp.targets[index], inp.seq_id[index]
        num_seqs = inp.case.layout.num_seqs

        def forward(h, w):
            logp = ChunkedLogProbFunction.apply(h[index], w, None, targets, 1.0, TRL_VOCAB_CHUNK, inp.softcap, 1.0,
                                                ())[0]
            seq = _segment_sum(logp, seq_id, num_seqs)
            return seq if op == "logprobs" else _spin_from_seq(seq, inp)

        return forward


class Gemm(Contender):
    """The GEMM floor: [M, H] x [H, V] -> [M, V] in the case dtype, M = min(N counted, 16384)."""

    name = "gemm"
    kind = "floor"

    @staticmethod
    def rows(case: Case) -> int:
        return max(1, min(case.layout.counted, GEMM_MAX_ROWS))

    def flops(self, case: Case) -> int:
        return 2 * self.rows(case) * case.head.hidden * case.head.vocab

    def prepare(self, inp, op, mode):
        a = inp.hidden.detach()[: self.rows(inp.case)]
        b = inp.weight.detach()

        def forward(h, w):
            torch.mm(a, b.t())
            return a.new_zeros(())

        return Runner(inp, op, "fwd", forward)


class GemmOneDnn(Gemm):
    """The same product through oneDNN, the engine impl="cpu" uses (CPU only): not the floor of
    the tables (that is torch.mm), shown next to it so that the kernel's own rate is visible."""

    name = "gemm:onednn"

    def unavailable(self, device, dry_run=False):
        if device.type != "cpu" or dry_run:
            return "CPU only"
        try:
            from spin_kernels.ops.backends.cpu_backend import default_gemm
        except ImportError as exc:
            return f"the C++ extension is not built ({exc})"
        return None if default_gemm() == "onednn" else "this torch does not export oneDNN's matmul"

    def prepare(self, inp, op, mode):
        a = inp.hidden.detach()[: self.rows(inp.case)]
        b = inp.weight.detach()

        def forward(h, w):
            torch.ops.spin_kernels_cpu.matmul(a, b.t(), "onednn")
            return a.new_zeros(())

        return Runner(inp, op, "fwd", forward)


def all_contenders(device: torch.device) -> list[Contender]:
    """Every contender in table order (ours first, the floor last), available or not."""
    from spin_kernels.ops import available_backends

    impls = [i for i in ("triton", "cpu", "torch") if i in available_backends(device)]
    return [*(Ours(i) for i in impls), *(Ours(i, metrics=True) for i in impls), Naive(), Liger(), CCE(), TRL(),
            Gemm(), GemmOneDnn()]


def select(device: torch.device, only: list[str] | None = None,
           dry_run: bool = False) -> tuple[list[Contender], dict[str, str]]:
    """(available contenders, {name: why skipped}); ``only`` restricts by name (gemm always kept);
    ``dry_run``: CUDA's contenders, on the CPU (see ``Contender.unavailable``)."""
    chosen, skipped = [], {}
    for c in all_contenders(device):
        named = only and (c.name in only or c.name.split(":")[-1] in only)
        if c.kind != "floor" and not named and (only or not c.by_default):
            continue
        why = c.unavailable(device, dry_run)
        if why:
            skipped[c.name] = why
        else:
            chosen.append(c)
    return chosen, skipped
