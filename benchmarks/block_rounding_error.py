"""Error of the Triton backward's row blocks: ∂W rounded to its dtype once per block.

The backward keeps its scratch memory within ``workspace_bytes`` by walking the rows in blocks
when their fp32 ∂hidden does not fit half of it; ∂W is then summed across blocks in the weight's
dtype, one rounding per block instead of one in all. This script measures what that costs: the
relative max error of ∂W and ∂hidden against the float64 reference, for one block (the whole
batch) and for many, next to the floor (the float64 gradient rounded once to the dtype). Runs on
CUDA (bf16 and fp16), or on CPU in the Triton interpreter (fp16 only: the interpreter's bf16 is
unreliable).

    TRITON_INTERPRET=1 python benchmarks/block_rounding_error.py --out benchmarks/results/
"""

from __future__ import annotations

import json

import torch

try:  # run as a script (python benchmarks/block_rounding_error.py) or as a module
    from kernel_study import study_device, study_parser, write_study
except ImportError:
    from .kernel_study import study_device, study_parser, write_study


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def main(argv=None) -> int:
    p = study_parser(__doc__, rows=512, hidden=32, vocab=256)
    p.add_argument("--blocks", default="1,2,4,8,16,32", help="numbers of row blocks to compare")
    args = p.parse_args(argv)
    device = study_device("block_rounding_error")
    if device is None:
        return 2
    cuda = device.type == "cuda"
    from spin_kernels.triton.backward import rows_grads, workspace_shape
    from spin_kernels.triton.config import backward_tiles
    from spin_kernels.triton.forward import rows_logprobs

    m, h, v = args.rows, args.hidden, args.vocab
    tile_m, tile_v = backward_tiles(device)
    g = torch.Generator().manual_seed(0)
    hidden64 = torch.randn(m, h, generator=g, dtype=torch.float64)
    weight64 = torch.randn(v, h, generator=g, dtype=torch.float64) * 4 / h**0.5
    targets = torch.randint(0, v, (m,), generator=g)
    upstream = torch.randn(m, generator=g, dtype=torch.float64)
    rows = []
    for dtype in [torch.float16] + ([torch.bfloat16] if cuda else []):
        hidden, weight = hidden64.to(dtype), weight64.to(dtype)
        # The reference: float64 on the inputs as rounded to the dtype.
        h_ref, w_ref = hidden.double().requires_grad_(), weight.double().requires_grad_()
        logp = torch.log_softmax(h_ref @ w_ref.t(), dim=1).gather(1, targets[:, None]).squeeze(1)
        dh_ref, dw_ref = torch.autograd.grad((logp * upstream).sum(), [h_ref, w_ref])
        floor = {"dweight": rel_err(dw_ref.to(dtype), dw_ref), "dhidden": rel_err(dh_ref.to(dtype), dh_ref)}
        args_dev = [t.to(device) for t in (hidden, weight, targets)]
        _, lse, _ = rows_logprobs(args_dev[0], args_dev[1], None, args_dev[2], 1.0, None)
        for blocks in (int(b) for b in args.blocks.split(",")):
            block_rows = -(-m // blocks // tile_m) * tile_m
            # The budget whose half is the fp32 ∂h of block_rows rows, unless that is the whole batch.
            budget = 2 * 4 * h * block_rows if block_rows < m else 2**30
            got_rows, _ = workspace_shape(m, v, h, hidden.element_size(), tile_m, tile_v, budget)
            dh, dw, _ = rows_grads(args_dev[0], args_dev[1], None, args_dev[2], lse,
                                   upstream.float().to(device), 1.0, None, True, True, False,
                                   workspace_bytes=budget)
            row = {"dtype": str(dtype).replace("torch.", ""), "blocks": -(-m // got_rows), "block_rows": got_rows,
                   "rel_err_dweight": rel_err(dw.cpu(), dw_ref), "rel_err_dhidden": rel_err(dh.cpu(), dh_ref),
                   "floor_dweight": floor["dweight"], "floor_dhidden": floor["dhidden"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_study(args.out, "block_rounding_error", device, {"shape": {"M": m, "H": h, "V": v}, "rows": rows}, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
