"""Quick tuning of the C++ CPU kernel (impl="cpu") on the cpu-small SPIN shape.

Not the official benchmark (``python -m benchmarks``): a knob sweep for csrc/. For each
configuration (store bytes, vocab tile, row tile, engine; or ``rule``: what ``impl="cpu"`` runs,
this machine's measured rule) it times ``linear_spin_loss`` forward+backward (median and
minimum of --repeats, after one warm-up, configurations alternated round by round) next to
the GEMM floor of both engines measured in the same process, and, with --memory, the peak RSS
growth of one warm run in a fresh process (VmHWM - VmRSS, as benchmarks/memprobe.py does).

    python -m benchmarks.cpu_kernel_tuning --threads 2 --configs rule,0:512:256,0:512:256:blas,94M:512:256 --memory
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

import torch

from spin_kernels.ops import as_impl, linear_spin_loss
from spin_kernels.ops.backends.cpu_backend import CpuFused, default_gemm
from spin_kernels.ops.backends.cpu_rule import cpu_model
from spin_kernels.ops.backends.torch_chunked import TorchChunked

IGNORE = -100


def make_inputs(pairs=4, seq_len=512, prompt=128, hidden=1024, vocab=32000, seed=0, dtype=torch.float32):
    """The cpu-small layout of docs/anchors.md: 2·pairs sequences of seq_len tokens,
    the first prompt-1 and the last target ignored (3072 counted rows by default)."""
    g = torch.Generator().manual_seed(seed)
    n_seq = 2 * pairs
    h = torch.randn(n_seq * seq_len, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * (4.0 / hidden**0.5)).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (n_seq, seq_len), generator=g)
    y[:, :prompt - 1] = IGNORE
    y[:, -1] = IGNORE
    cu = torch.arange(0, n_seq * seq_len + 1, seq_len, dtype=torch.int32)
    return h, w, y.reshape(-1), cu, torch.zeros(n_seq)


def parse_config(text: str) -> dict:
    """"store:vocab_tile:row_tile[:gemm]", e.g. "0:512:256" or "94M:512:256:blas"; "rule": {}
    (CpuFused's defaults: the measured rule)."""
    if text == "rule":
        return {}
    store, vt, rt, *gemm = text.split(":")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}
    store_bytes = int(float(store[:-1]) * mult[store[-1]]) if store[-1] in mult else int(store)
    return {"store_bytes": store_bytes, "vocab_tile": int(vt), "row_tile": int(rt),
            "gemm": gemm[0] if gemm else "auto"}


def step(inputs, backend) -> None:
    h, w, y, cu, ref = inputs
    loss, _ = linear_spin_loss(h, w, y, cu, ref, ignore_index=IGNORE, check_values=False, impl=as_impl(backend))
    loss.backward()


CLOCK = time.perf_counter


def timed(fn, repeats: int) -> float:
    return statistics.median(timed_rounds({"": fn}, repeats)[""])


def timed_rounds(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Every fn once to warm up, then ``repeats`` rounds of each in turn: a drift of a shared
    machine hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = CLOCK()
            fn()
            times[name].append(CLOCK() - t0)
            gc.collect()
    return times


def peak_extra_mib(config: dict, threads: int) -> float:
    """Peak RSS growth of one warm fwd+bwd in a fresh process."""
    code = f"""
import gc, json, torch
from benchmarks.cpu_kernel_tuning import make_inputs, step
from spin_kernels.ops.backends.cpu_backend import CpuFused, default_gemm
from spin_kernels.ops.backends.cpu_rule import cpu_model
from spin_kernels.ops.backends.torch_chunked import TorchChunked
torch.set_num_threads({threads})
inp = make_inputs(); backend = CpuFused(**{config!r})
def kib(f):
    return int(next(l for l in open('/proc/self/status') if l.startswith(f + ':')).split()[1])
step(inp, backend); inp[0].grad = inp[1].grad = None; gc.collect()
base = kib('VmRSS'); open('/proc/self/clear_refs', 'w').write('5')
step(inp, backend)
print(json.dumps((kib('VmHWM') - base) / 1024))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default="0:512:256", help="store:vocab_tile:row_tile[:gemm], comma-separated")
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS growth (fresh process each)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process CPU clock: on a machine shared with other jobs this "
                         "counts the work done rather than the waiting (includes spin-waits)")
    ap.add_argument("--compare-torch", action="store_true", help="also time impl='torch' (the chunked path)")
    ap.add_argument("--pairs", type=int, default=4, help="pairs in the batch (cpu-small: 4)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    inputs = make_inputs(pairs=args.pairs)
    counted = int((inputs[2] != IGNORE).sum())
    h, w = inputs[0].detach(), inputs[1].detach()
    a = h[:counted]
    work = 2 * counted * h.shape[1] * w.shape[0]
    products = {"torch.mm": lambda: torch.mm(a, w.t())}
    if default_gemm() == "onednn":
        products["onednn"] = lambda: torch.ops.spin_kernels_cpu.matmul(a, w.t(), "onednn")
    gemm_times = timed_rounds(products, args.repeats)
    rates = {name: work / min(t) for name, t in gemm_times.items()}
    best = max(rates, key=rates.get)
    floor_s = 3 * work / rates[best]
    clock = "CPU" if args.cpu_time else "wall"
    rule = CpuFused().rule()
    print(f"{cpu_model()}, cpu-small layout with {args.pairs} pairs, fp32, {args.threads} threads, {clock} time "
          f"(minimum of {args.repeats}), N counted={counted}: GEMM "
          + ", ".join(f"{n} {r / 1e9:.0f} GFLOP/s" for n, r in rates.items())
          + f"; floor 6NHV at {best}'s rate = {floor_s:.3f} s; rule: {rule.describe()}", flush=True)
    runs = {text: CpuFused(**parse_config(text)) for text in args.configs.split(",")}
    if args.compare_torch:
        runs["impl=torch"] = TorchChunked()

    def run(backend):
        def once():
            step(inputs, backend)
            inputs[0].grad = inputs[1].grad = None
        return once

    times = timed_rounds({text: run(backend) for text, backend in runs.items()}, args.repeats)
    for text, backend in runs.items():
        t = min(times[text])
        line = (f"{text:>16}: min {t:.3f} s = {t / floor_s:.3f} x floor, median {statistics.median(times[text]):.3f} s"
                + (f" (gemm={backend.gemm}, store_bytes={backend.store_bytes})" if isinstance(backend, CpuFused) else ""))
        if args.memory and isinstance(backend, CpuFused):
            line += f", peak extra {peak_extra_mib(parse_config(text), args.threads):.0f} MiB"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
