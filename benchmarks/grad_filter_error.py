"""Error of the backward's gradient filter (impl="triton", grad_filter) against the exact gradient.

The filter skips the matmuls of a (rows × vocab) tile when every |onehot − softmax| in it is
below a threshold. What it drops is bounded by the softmax mass of the skipped tiles, so the
error depends on how peaked the model's distributions are: this script sweeps the logit scale
(the std of the logits) and reports, per threshold, the relative max error of ∂hidden and
∂weight against the unfiltered kernels, and the fraction of (row, vocab-block) pairs whose
softmax is entirely below the threshold. Runs on CUDA, or on CPU in the Triton interpreter
(tiny shapes, fp32; the interpreter's bf16 is unreliable, so bf16's threshold is applied to
fp32 inputs there).

    TRITON_INTERPRET=1 python benchmarks/grad_filter_error.py --out benchmarks/results/
"""

from __future__ import annotations

import json

import torch

try:  # run as a script (python benchmarks/grad_filter_error.py) or as a module
    from kernel_study import study_device, study_parser, write_study
except ImportError:
    from .kernel_study import study_device, study_parser, write_study


def main(argv=None) -> int:
    p = study_parser(__doc__, rows=96, hidden=32, vocab=1024)
    p.add_argument("--scales", default="1,4,8,16", help="logit standard deviations to sweep")
    p.add_argument("--thresholds", default="bf16:0.000244140625,fp16:0.000030517578125")
    args = p.parse_args(argv)
    device = study_device("grad_filter_error")
    if device is None:
        return 2
    cuda = device.type == "cuda"
    from spin_kernels.triton.backward import rows_grads
    from spin_kernels.triton.config import INTERPRETER_BLOCKS
    from spin_kernels.triton.forward import rows_logprobs

    g = torch.Generator().manual_seed(0)
    m, h, v = args.rows, args.hidden, args.vocab
    block_v = INTERPRETER_BLOCKS["BLOCK_V"]
    thresholds = {k: float(x) for k, x in (t.split(":") for t in args.thresholds.split(","))}
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        hidden = torch.randn(m, h, generator=g).to(device)
        weight = (torch.randn(v, h, generator=g) * scale / h**0.5).to(device)
        # Targets drawn from the model's own distribution, as for sampled (synthetic) text.
        probs = torch.softmax(hidden.double() @ weight.double().t(), dim=1)
        targets = torch.multinomial(probs.cpu().float(), 1, generator=g).squeeze(1).to(device)
        _, lse, _ = rows_logprobs(hidden, weight, None, targets, 1.0, None)
        grad = torch.ones(m, device=device)
        exact = rows_grads(hidden, weight, None, targets, lse, grad, 1.0, None, True, True, False)
        for name, eps in thresholds.items():
            got = rows_grads(hidden, weight, None, targets, lse, grad, 1.0, None, True, True, False, filter_eps=eps)
            err = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got[:2], exact[:2])]
            blocks = probs.view(m, -1, block_v).amax(2) if (v % block_v == 0 and not cuda) else None
            below = None if blocks is None else (blocks < eps).double().mean().item()
            mass = (probs * (probs < eps)).sum(1).mean().item()
            row = {"logit_std": scale, "threshold": name, "eps": eps, "rel_err_dhidden": err[0],
                   "rel_err_dweight": err[1], "row_blocks_below": below, "mean_mass_below": mass}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_study(args.out, "grad_filter_error", device,
                {"shape": {"M": m, "H": h, "V": v}, "dtype": "float32",
                 "blocks": INTERPRETER_BLOCKS if not cuda else "autotuned", "rows": rows}, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
