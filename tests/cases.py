"""Helpers shared by the test modules (no test module imports another): random packed-batch
cases and the float64 check of the op tests of every impl, the device and impl in use, tiny
transformers models of each architecture and the FSDP2 tests' model and micro-batches, a tiny
model and data file for small SPIN runs, a free port for the multi-process tests."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import pytest
import torch

IGNORE = -100
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def impl_unavailable(impl: str, device: torch.device) -> str | None:
    """Why the op ``impl`` cannot run on ``device`` here (the registry's own message), or None."""
    from spin_kernels.ops.backends import resolve_backend

    try:
        resolve_backend(impl, device)
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    return None


def needs_impl(impl: str):
    """Skip (saying why) where the op ``impl`` cannot run on DEVICE."""
    why = impl_unavailable(impl, DEVICE)
    return pytest.mark.skipif(why is not None, reason=why or "")


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


def on_device(case: Case) -> Case:
    """The case's tensors moved to DEVICE (leaves that require grad stay leaves)."""
    def move(t):
        return None if t is None else t.detach().to(DEVICE).requires_grad_(t.requires_grad)

    case.hidden, case.weight, case.bias = move(case.hidden), move(case.weight), move(case.bias)
    case.targets, case.cu_seqlens, case.ref_logps = (case.targets.to(DEVICE), case.cu_seqlens.to(DEVICE),
                                                      case.ref_logps.to(DEVICE))
    return case


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


# --------------------------------------------------------------------------- an op against float64

# rtol of results against the float64 reference: outputs accumulate in fp32; gradients are
# returned in the input dtype, so bf16/fp16 gradients carry their rounding.
RTOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-5, 2e-3), torch.bfloat16: (2e-5, 1e-2),
        torch.float64: (1e-10, 1e-10)}

OPTIONS = [
    {},
    {"bias": True},
    {"temperature": 0.7},
    {"softcap": 2.5},
    {"average": True},
    {"bias": True, "temperature": 1.3, "softcap": 4.0, "average": True},
]


def head_kwargs(case: Case, options: dict) -> dict:
    """The lm_head keyword arguments of ``options`` (an entry of OPTIONS) for ``case``."""
    kw = {k: v for k, v in options.items() if k != "bias"}
    return dict(bias=case.bias, **kw)


def check_logprobs(case: Case, impl: str, options: dict, dtype: torch.dtype) -> None:
    """linear_logprobs(impl=...) of ``case``, forward and backward, against the float64 naive reference."""
    from spin_kernels import linear_logprobs
    from spin_kernels.ops.naive import naive_linear_logprobs

    out = linear_logprobs(case.hidden, case.weight, case.targets, case.cu_seqlens, impl=impl,
                          **head_kwargs(case, options))
    ref_case = case.float64()
    ref = naive_linear_logprobs(ref_case.hidden, ref_case.weight, case.targets, case.cu_seqlens,
                                **head_kwargs(ref_case, options))
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol_out, rtol_grad = RTOL[dtype]
    assert_close(out, ref, rtol_out, "logps")
    upstream = torch.randn(out.shape[0], dtype=torch.float64, device=out.device)
    got = grads((out.double() * upstream).sum(), [case.hidden, case.weight, case.bias])
    want = grads((ref * upstream).sum(), [ref_case.hidden, ref_case.weight, ref_case.bias])
    for name, g, w, x in zip(("hidden", "weight", "bias"), got, want, (case.hidden, case.weight, case.bias)):
        if x is None:
            continue
        assert g.dtype == x.dtype, f"d{name} dtype"
        assert_close(g, w, rtol_grad, f"d{name}")


# --------------------------------------------------------------------------- tiny transformers models

VOCAB = 97
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64}
# {arch: (transformers class prefix, config overrides)}: sliding windows shorter than the
# sequences and strong softcaps, so that both matter.
ARCHS = {
    "llama": ("Llama", {}),
    "mistral": ("Mistral", {"sliding_window": 5}),
    "qwen2": ("Qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "gemma2": ("Gemma2", {"sliding_window": 6, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
                          "query_pre_attn_scalar": 8}),
    "granite": ("Granite", {"logits_scaling": 2.0}),
}
# The oracle's attention: transformers' "eager", its reference implementation of every architecture.
# Not the default one: with transformers 4.54 to 5.17 (4.54.1, 4.57.6 and 5.17.0 tried) Gemma-2
# defaults to "sdpa", whose kernel silently drops attn_logit_softcapping, so "the model alone" would
# be another model than the one configured (9.4e-3 from the packed log-probs in float64).
ORACLE_ATTENTION = "eager"


def model_rtol(arch: str) -> float:
    """The float64 tolerance of a packed result of ``arch`` against transformers alone. "float64"
    models are not float64 throughout in transformers: RMSNorm casts to float32 (Llama, Mistral,
    Qwen2, Granite, Gemma-2) and eager attention takes its softmax in float32. Two computations
    that differ in float64 rounding can therefore differ by float32 rounding after a norm; a leak
    or a wrong window shows up as errors of 1e-2 or more."""
    return {"gemma2": 1e-5}.get(arch, 1e-6)


def make_model(arch: str, seed: int = 0, **overrides):
    """A tiny float64 model of ``arch`` on the oracle's attention; ``overrides`` change its config."""
    import transformers

    prefix, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(**COMMON, **{**extra, **overrides},
                                                      attn_implementation=ORACLE_ATTENTION)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).double()
    with torch.no_grad():  # larger weights than the init, so that attention patterns are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def lora_policy(base):
    """``base`` with random LoRA adapters (peft; the test is skipped without it)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)  # random B: the adapter changes the model
    return peft.get_peft_model(base, config)


def param_grads(model, loss) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, got) if g is not None}


def fsdp_tiny_model(seed: int):
    """The FSDP2 tests' model: a prepared fp32 Llama (V = 96, H = 32, 2 layers, untied lm_head)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from spin_kernels.models import prepare_model

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(seed)
    return prepare_model(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))


def fsdp_micro_batches(share_prompt: bool = False) -> list:
    """The FSDP2 tests' 4 packed micro-batches of 1-3 pairs (for ``fsdp_tiny_model``): rank r gets
    batches r and r+2."""
    from spin_kernels.packing.batch import pack_batch
    from spin_kernels.packing.example import SpinExample

    g = torch.Generator().manual_seed(123)

    def ids(n):
        return torch.randint(3, 96, (n,), generator=g).tolist()

    batches, index = [], 0
    for pairs in (2, 1, 3, 2):
        exs = []
        for _ in range(pairs):
            lp, lr, ls = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((2, 6), (2, 9), (2, 9)))
            ref = (-torch.rand(2, generator=g) * 20 - 10).tolist()
            exs.append(SpinExample(prompt_ids=ids(lp), real_ids=ids(lr), synthetic_ids=ids(ls), ref_logps=ref,
                                   index=index))
            index += 1
        batches.append(pack_batch(exs, share_prompt=share_prompt))
    return batches


def tiny_model_and_data(tmp, rows: int, seed: int = 1, layers: int = 1) -> tuple[str, str]:
    """A tiny Llama (``layers`` decoder layers) saved in ``tmp/sft`` and ``rows`` Markov-task rows in
    ``tmp/d.jsonl``: the inputs of a small SPIN run on CPU, as (model directory, data file)."""
    import json

    from spin_kernels.demo.task import MarkovTask
    from spin_kernels.demo.tiny import save_tiny_model

    model = save_tiny_model(str(tmp / "sft"), layers=layers)
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MarkovTask().sample(rows, seed=seed)))
    return model, str(data)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_kernels() -> list[str]:
    """Every impl that runs on CPU tensors here, triton in its interpreter (conftest sets
    TRITON_INTERPRET): the op tests' parameter ``kernel`` (conftest's ``impl`` covers the CPU
    impls without triton, whose interpreter runs fp32/fp16 only)."""
    from spin_kernels.ops import available_backends

    available = available_backends("cpu")
    return [name for name in ("torch", "cpu", "triton") if available.get(name, "") is None]
