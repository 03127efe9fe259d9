"""Random packed-batch cases shared by the op tests of every impl; a free port for the
multi-process tests."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import torch

IGNORE = -100


@dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    ref_logps: torch.Tensor
    options: dict = field(default_factory=dict)

    def float64(self) -> "Case":
        def up(t):
            return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

        return Case(up(self.hidden), up(self.weight), up(self.bias), self.targets, self.cu_seqlens,
                    self.ref_logps.double(), dict(self.options))


def make_case(
    lengths: list[int],
    hidden_size: int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float32,
    bias: bool = False,
    prompt_frac: float = 0.3,
    seed: int = 0,
    all_ignored: bool = False,
    scale: float = 1.0,
    cu_dtype: torch.dtype = torch.int32,
) -> Case:
    """Sequences of the given lengths; the first ~prompt_frac of each and its last token are
    ignored (as the packer does), the rest predict random tokens."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    hidden = (torch.randn(n, hidden_size, generator=g) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5 * 4).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g)).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    start = 0
    for length in lengths:
        prompt = int(length * prompt_frac)
        targets[start:start + prompt] = IGNORE
        if length:
            targets[start + length - 1] = IGNORE
        start += length
    if all_ignored:
        targets[:] = IGNORE
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist() if lengths else [0], dtype=cu_dtype)
    ref = torch.randn(len(lengths), generator=g, dtype=torch.float32) * 5 - 20
    return Case(hidden, weight, b, targets, cu, ref)


def random_lengths(num_pairs: int, max_len: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max_len + 1, (2 * num_pairs,), generator=g).tolist()


def grads(outputs: torch.Tensor, inputs: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    present = [t for t in inputs if t is not None]
    got = torch.autograd.grad(outputs, present, allow_unused=True)
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """|actual - expected| <= rtol * (max|expected| + 1e-30), elementwise against the global scale."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale + 1e-12, f"{what}: max error {err:.3e} > {rtol:.1e} x scale {scale:.3e}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def traceable_examples(spec, ref=False):
    """SpinExamples from ``spec`` = [(prompt, real, synthetic) lengths], every token id distinct
    (so each token is traceable through a packed batch); indices 100, 101, ...; with ``ref``,
    ref_logps (-1 - p, -2 - p)."""
    from spin_kernels.packing import SpinExample

    out, token = [], 0
    for p, (lp, lr, ls) in enumerate(spec):
        ids = list(range(token, token + lp + lr + ls))
        token += lp + lr + ls
        out.append(SpinExample(ids[:lp], ids[lp:lp + lr], ids[lp + lr:], index=100 + p,
                               ref_logps=(-1.0 - p, -2.0 - p) if ref else None))
    return out


def cpu_kernels() -> list[str]:
    """Every impl that runs on CPU tensors here, triton in its interpreter (conftest sets
    TRITON_INTERPRET): the op tests' parameter ``kernel`` (conftest's ``impl`` covers the CPU
    impls without triton, whose interpreter runs fp32/fp16 only)."""
    from spin_kernels.ops import available_backends

    available = available_backends("cpu")
    return [name for name in ("torch", "cpu", "triton") if available.get(name, "") is None]
