"""Run the fused SPIN loss on CPU on a realistic shape and print loss, timings and peak memory."""

from __future__ import annotations

import argparse
import resource
import time

import torch

from spin_kernels import linear_spin_loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spin-kernels ops-demo", description=__doc__)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--impl", default="auto")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    s, t = 2 * args.pairs, args.seq_len
    n = s * t
    hidden = torch.randn(n, args.hidden, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden) / args.hidden**0.5).requires_grad_()
    targets = torch.randint(0, args.vocab, (n,))
    for i in range(s):
        targets[i * t:i * t + args.prompt_len] = -100
        targets[(i + 1) * t - 1] = -100
    cu = torch.arange(0, n + 1, t, dtype=torch.int32)
    ref = -torch.rand(s) * 100 - 3000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss, metrics = linear_spin_loss(hidden, weight, targets, cu, ref, impl=args.impl)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"linear_spin_loss on CPU: {args.pairs} pairs x 2 x {t} tokens (prompt {args.prompt_len}), "
          f"H={args.hidden}, V={args.vocab}, fp32, impl={args.impl}")
    print(f"loss {loss.item():.6f}  " + "  ".join(f"{k} {v.item():.4f}" for k, v in metrics.items()))
    print(f"forward+grads {t1 - t0:.3f} s, backward (rescale) {t2 - t1:.3f} s, "
          f"peak RSS growth {(rss1 - rss0) / 1024:.0f} MiB (full logits would be {n * args.vocab * 4 / 2**20:.0f} MiB)")
    return 0
