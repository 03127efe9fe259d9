"""GPU benchmark: ``linear_spin_loss`` forward+backward against the GEMM floor and the peers.

One process, one device, one shape (default: llama3-8b head, H=4096, V=128256, N=16,384 counted
tokens, bf16). Reports, each as the median of --repeats timed runs after warm-up:

* floor: 8·N·H·V flops at the bf16 matmul rate measured in this run (torch.mm at the same H);
* spin_kernels impl="triton" (and impl="torch" with --with-torch);
* Liger ``LigerFusedLinearDPOLoss`` (use_ref_model=False: it cannot take precomputed
  reference log-probs, so this is the same policy-side work);
* CCE ``linear_cross_entropy(reduction="none")`` × mask + per-sequence sums + the SPIN loss;

and the peak memory beyond the inputs and the gradients in the parameters' dtype.

    python benchmarks/bench_triton_spin.py --out benchmarks/results/  # writes <card>-llama3-8b.json

Needs CUDA; exits with a message otherwise (no GPU figure is claimed without a GPU run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

SHAPES = {"zephyr-7b": (4096, 32000), "llama3-8b": (4096, 128256), "llama3-70b": (8192, 128256),
          "qwen2.5-7b": (3584, 152064), "gemma2-2b": (2304, 256000)}


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() in ms (CUDA events, after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_mib(fn, necessary_bytes: int) -> float:
    """Peak allocated during fn() beyond what was allocated before and the gradients' size."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base - necessary_bytes) / 2**20


def matmul_tflops(h: int, v: int, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(4096, h, device="cuda", dtype=dtype)
    b = torch.randn(v, h, device="cuda", dtype=dtype)
    ms = timed(lambda: torch.mm(a, b.t()), repeats)
    return 2 * 4096 * h * v / (ms * 1e-3) / 1e12


def make_batch(n_seq: int, seq_len: int, h: int, v: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    n = n_seq * seq_len
    hidden = (torch.randn(n, h, device="cuda", generator=g) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets.view(n_seq, seq_len)[:, -1] = -100  # the last token of each sequence predicts nothing
    cu = torch.arange(0, n + 1, seq_len, device="cuda", dtype=torch.int32)
    ref = torch.randn(n_seq, device="cuda", generator=g) - 100.0
    return hidden, weight, targets, cu, ref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=16384, help="N, tokens of the batch (all but one per sequence counted)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peers", default="liger,cce", help="comma list among liger, cce, torch ('' for none)")
    p.add_argument("--out", default=None, help="folder for <card>-<shape>-N<tokens>.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_spin: no CUDA device; no GPU figure without a GPU run", file=sys.stderr)
        return 2
    from spin_kernels import linear_spin_loss

    h, v = SHAPES[args.shape]
    dtype = torch.bfloat16
    n_seq = max(2, args.tokens // args.seq_len // 2 * 2)
    hidden, weight, targets, cu, ref = make_batch(n_seq, args.seq_len, h, v, dtype)
    counted = int((targets != -100).sum())
    grads_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    card = torch.cuda.get_device_name()
    rate = matmul_tflops(h, v, dtype, args.repeats)
    floor_ms = 8 * counted * h * v / (rate * 1e12) * 1e3
    results = {"card": card, "shape": args.shape, "H": h, "V": v, "N_tokens": hidden.shape[0], "N_counted": counted,
               "dtype": "bfloat16", "matmul_tflops": round(rate, 1), "floor_8NHV_ms": round(floor_ms, 2),
               "torch": torch.__version__, "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": {}}

    def ours(impl, check_values=True):
        def step():
            hidden.grad = weight.grad = None
            loss, _ = linear_spin_loss(hidden, weight, targets, cu, ref, beta=0.1, impl=impl,
                                       check_values=check_values)
            loss.backward()
        return step

    # "-unchecked": no value checks, so no host synchronisation anywhere in the step.
    runs = {"spin_kernels-triton": ours("triton"), "spin_kernels-triton-unchecked": ours("triton", False)}
    peers = [x for x in args.peers.split(",") if x]
    if "torch" in peers:
        runs["spin_kernels-torch"] = ours("torch")
    if "liger" in peers:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False)
        # Liger takes padded [2B, T, H] with every chosen sequence first: reorder the pairs.
        order = torch.cat([torch.arange(0, n_seq, 2), torch.arange(1, n_seq, 2)]).cuda()
        y_liger = targets.view(n_seq, args.seq_len)[order]

        def liger_step():
            hidden.grad = weight.grad = None
            x = hidden.view(n_seq, args.seq_len, h)[order]
            loss = liger(weight, x, y_liger)[0]
            loss.backward()
        runs["liger-dpo"] = liger_step
    if "cce" in peers:
        from cut_cross_entropy import linear_cross_entropy

        from spin_kernels.ops.layout import segment_sum
        from spin_kernels.ops.objective import spin_terms

        mask = (targets != -100).float()

        def cce_step():
            hidden.grad = weight.grad = None
            nll = linear_cross_entropy(hidden, weight, targets, reduction="none")
            seq = segment_sum(-(nll.float() * mask), cu.long())  # mask first: see anchors.md
            loss, _ = spin_terms(seq, ref, 0.1, "sigmoid", n_seq // 2)
            loss.backward()
        runs["cce+segment-sum"] = cce_step

    for name, step in runs.items():
        try:
            ms = timed(step, args.repeats)
            mib = peak_extra_mib(step, grads_bytes)
        except torch.cuda.OutOfMemoryError as exc:
            results["runs"][name] = {"error": f"out of memory: {exc}"[:200]}
            torch.cuda.empty_cache()
            continue
        results["runs"][name] = {"ms": round(ms, 2), "x_floor": round(ms / floor_ms, 3), "extra_mib": round(mib, 1)}
        print(f"{name:24s} {ms:9.2f} ms  {ms / floor_ms:5.2f}x floor  {mib:9.1f} MiB extra", flush=True)
    print(json.dumps(results, indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        slug = card.replace(" ", "_").replace("/", "_")
        path = os.path.join(args.out, f"{slug}-{args.shape}-N{hidden.shape[0]}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
