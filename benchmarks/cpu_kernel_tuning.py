"""Quick tuning of the C++ CPU kernel (impl="cpu") on the cpu-small SPIN shape.

Not the official benchmark (``python -m benchmarks``): a knob sweep for csrc/. For each
configuration (store bytes, vocab tile, row tile) it times ``linear_spin_loss`` forward+backward
(median of --repeats, after one warm-up) next to the GEMM floor measured in the same process,
and, with --memory, the peak RSS growth of one warm run in a fresh process (VmHWM - VmRSS, as
benchmarks/memprobe.py does).

    python -m benchmarks.cpu_kernel_tuning --threads 2 --configs 0:512:256,0:512:256:blas,94M:512:256 --memory
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

from spin_kernels.ops.autograd import LinearSPINLossFunction
from spin_kernels.ops.backends.cpu_backend import CpuFused
from spin_kernels.ops.backends.torch_chunked import TorchChunked
from spin_kernels.ops.options import SpinOptions

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
    """"store:vocab_tile:row_tile[:gemm]", e.g. "0:512:256" or "94M:512:256:blas"."""
    store, vt, rt, *gemm = text.split(":")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}
    store_bytes = int(float(store[:-1]) * mult[store[-1]]) if store[-1] in mult else int(store)
    return {"store_bytes": store_bytes, "vocab_tile": int(vt), "row_tile": int(rt),
            "gemm": gemm[0] if gemm else "auto"}


def step(inputs, backend) -> None:
    h, w, y, cu, ref = inputs
    loss, _ = LinearSPINLossFunction.apply(h, w, None, y, cu, ref, SpinOptions(IGNORE, check_values=False), backend)
    loss.backward()


CLOCK = time.perf_counter


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def peak_extra_mib(config: dict, threads: int) -> float:
    """Peak RSS growth of one warm fwd+bwd in a fresh process."""
    code = f"""
import gc, json, torch
from benchmarks.cpu_kernel_tuning import make_inputs, step
from spin_kernels.ops.backends.cpu_backend import CpuFused
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
    gemm_s = timed(lambda: torch.mm(a, w.t()), args.repeats)
    rate = 2 * counted * h.shape[1] * w.shape[0] / gemm_s
    floor_s = 6 * counted * h.shape[1] * w.shape[0] / rate
    clock = "CPU" if args.cpu_time else "wall"
    print(f"cpu-small layout with {args.pairs} pairs, fp32, {args.threads} threads, {clock} time, "
          f"N counted={counted}: GEMM {rate / 1e9:.0f} GFLOP/s, floor 6NHV = {floor_s:.3f} s")
    runs = [(text, CpuFused(**parse_config(text))) for text in args.configs.split(",")]
    if args.compare_torch:
        runs.append(("impl=torch", TorchChunked()))
    for text, backend in runs:

        def run(backend=backend):
            step(inputs, backend)
            inputs[0].grad = inputs[1].grad = None

        t = timed(run, args.repeats)
        gc.collect()
        line = f"{text:>16}: {t:.3f} s = {t / floor_s:.3f} x floor"
        if args.memory and isinstance(backend, CpuFused):
            line += f", peak extra {peak_extra_mib(parse_config(text), args.threads):.0f} MiB"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
