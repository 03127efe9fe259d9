"""What the kernel suite measures: lm-head shapes, token layouts, and their inputs.

Names follow docs/anchors.md. A *case* is a head shape (hidden H, vocab V, softcap)
plus a token layout (pairs x 2 sequences x T tokens with a P-token prompt) and a dtype:

* ``cpu-small``   — H=1024, V=32000, 4 pairs x 2 x 512 tokens, 128-token prompt, fp32
  (3,072 counted rows of 4,096), the CPU comparison shape;
* ``tiny``        — a few-millisecond shape for smoke tests;
* ``<head>@<N>``  — a GPU head (zephyr-7b, llama3-8b, llama3-70b, qwen2.5-7b, gemma2-2b) at N
  counted tokens (``4k`` ... ``64k``), bf16: sequences of 1,280 tokens with a 256-token prompt,
  so every sequence has exactly 1,024 counted rows and N / 2,048 pairs. ``<head>`` alone
  means N = 16k.

All sequences of a case have the same length, so padded baselines (Liger) lose nothing to
padding here: the kernel suite compares the head computation only. Counted rows: row t of a
sequence predicts token t+1; rows of the prompt except its last, and the last row of the
sequence, are ignored (``targets == -100``), as the packer does.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Head:
    """An lm-head: hidden size, vocabulary, optional Gemma-2 style logit softcap."""

    name: str
    hidden: int
    vocab: int
    softcap: float | None = None


HEADS: dict[str, Head] = {h.name: h for h in [
    Head("zephyr-7b", 4096, 32000),
    Head("llama3-8b", 4096, 128256),
    Head("llama3-70b", 8192, 128256),
    Head("qwen2.5-7b", 3584, 152064),
    Head("gemma2-2b", 2304, 256000, softcap=30.0),
    Head("cpu-small", 1024, 32000),
    Head("tiny", 64, 1000),
]}

GPU_HEADS = ("llama3-8b", "zephyr-7b", "qwen2.5-7b", "gemma2-2b", "llama3-70b")
GPU_SWEEP = (4096, 8192, 16384, 32768, 65536)
GPU_SEQ_LEN, GPU_PROMPT_LEN = 1280, 256  # 1,024 counted rows per sequence


@dataclass(frozen=True)
class Layout:
    """``pairs`` x 2 sequences of ``seq_len`` tokens, the first ``prompt_len`` being the prompt."""

    pairs: int
    seq_len: int
    prompt_len: int

    @property
    def num_seqs(self) -> int:
        return 2 * self.pairs

    @property
    def rows(self) -> int:
        return self.num_seqs * self.seq_len

    @property
    def counted(self) -> int:
        """Rows with a real target: positions prompt_len-1 .. seq_len-2 of every sequence."""
        return self.num_seqs * max(self.seq_len - self.prompt_len, 0)


@dataclass(frozen=True)
class Case:
    """One benchmark input: a head, a layout and a dtype, under a stable name."""

    name: str
    head: Head
    layout: Layout
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def flops(self, mode: str) -> int:
        """The minimal lm-head work: 2·N·H·V forward, 6·N·H·V forward+backward (N counted rows)."""
        nhv = self.layout.counted * self.head.hidden * self.head.vocab
        return (2 if mode == "fwd" else 6) * nhv

    def describe(self) -> dict:
        return {"name": self.name, "head": asdict(self.head), "layout": asdict(self.layout), "dtype": self.dtype,
                "rows": self.layout.rows, "counted_rows": self.layout.counted}


def _parse_tokens(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kK]?)", text)
    if not m:
        raise ValueError(f"bad token count {text!r} (use e.g. 16k or 16384)")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def _fmt_tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def gpu_case(head: str, counted: int) -> Case:
    """``head`` at ``counted`` counted tokens in the GPU layout (bf16)."""
    per_pair = 2 * (GPU_SEQ_LEN - GPU_PROMPT_LEN)
    if counted % per_pair:
        raise ValueError(f"N must be a multiple of {per_pair} counted tokens, got {counted}")
    return Case(f"{head}@{_fmt_tokens(counted)}", HEADS[head], Layout(counted // per_pair, GPU_SEQ_LEN,
                                                                      GPU_PROMPT_LEN), "bfloat16")


def resolve_case(name: str) -> Case:
    """A case from its name (see the module docstring); raises ValueError for unknown names."""
    if name == "cpu-small":
        return Case(name, HEADS[name], Layout(4, 512, 128), "float32")
    if name == "tiny":
        return Case(name, HEADS[name], Layout(2, 48, 16), "float32")
    head, _, tokens = name.partition("@")
    if head not in GPU_HEADS:
        raise ValueError(f"unknown shape {name!r}: use cpu-small, tiny or <head>[@N] with head in {GPU_HEADS}")
    return gpu_case(head, _parse_tokens(tokens) if tokens else 16384)


@dataclass
class Inputs:
    """Tensors of one case on one device, shared by every contender (built once, same values).

    ``hidden`` and ``weight`` are leaves; ``ref_logps`` are zeros (see contenders.py: this is
    what lets Liger, which cannot take precomputed reference log-probs, do the same work and
    return the same loss). ``seq_id``, ``mask`` and ``seq_grad`` are bookkeeping that a
    training step already holds (not timed).
    """

    case: Case
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    ref_logps: torch.Tensor
    seq_id: torch.Tensor
    mask: torch.Tensor
    seq_grad: torch.Tensor

    @property
    def softcap(self) -> float | None:
        return self.case.head.softcap


def make_inputs(case: Case, device: str | torch.device, seed: int = 0) -> Inputs:
    """Deterministic random inputs for ``case`` (logits have a standard deviation of about 4)."""
    device = torch.device(device)
    lay, head = case.layout, case.head
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(lay.rows, head.hidden, generator=g, device=device).to(case.torch_dtype)
    weight = (torch.randn(head.vocab, head.hidden, generator=g, device=device) * (4.0 / head.hidden ** 0.5))
    weight = weight.to(case.torch_dtype)
    targets = torch.randint(0, head.vocab, (lay.num_seqs, lay.seq_len), generator=g, device=device)
    targets[:, :max(lay.prompt_len - 1, 0)] = IGNORE_INDEX
    targets[:, -1] = IGNORE_INDEX
    targets = targets.reshape(-1)
    cu = torch.arange(0, lay.rows + 1, lay.seq_len, device=device, dtype=torch.int32)
    seq_id = torch.arange(lay.num_seqs, device=device).repeat_interleave(lay.seq_len)
    return Inputs(
        case=case,
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        targets=targets,
        cu_seqlens=cu,
        ref_logps=torch.zeros(lay.num_seqs, device=device),
        seq_id=seq_id,
        mask=targets != IGNORE_INDEX,
        seq_grad=torch.linspace(0.5, 1.5, lay.num_seqs, device=device),
    )
