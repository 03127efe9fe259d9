"""Compile every Triton kernel of spin_kernels for sm80 and sm90 without a GPU.

For each kernel, each autotuning configuration of its family (spin_kernels/triton/config.py),
each input dtype (bf16, fp32) and each variant of its flags, Triton compiles to a cubin with its
own ptxas; the check fails on a compile error, or when an (architecture, dtype) has no
configuration whose shared memory fits the device (the autotuner would have nothing to run).
It catches what the interpreter cannot: lowering errors, and configurations too large for a
card, before a GPU session spends its minutes on them.

    python scripts/triton_compile_check.py            # everything (~3 min on 2 cores)
    python scripts/triton_compile_check.py --quick    # first configuration of each, bf16, sm90

Must run without TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

SHARED_LIMIT = {9: 232_448, 8: 166_912}  # bytes of shared memory per block: H100/H200, A100
FLOAT_ARGS = ("inv_temp", "softcap", "filter_eps")


def pointer_types(dtype: str) -> dict[str, str]:
    """Element type of every pointer argument, by name, for inputs of ``dtype``."""
    return {"h_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "du_ptr": dtype, "dw_ptr": dtype, "dh_ptr": dtype, "y_ptr": "i64",
            "idx_ptr": "i64", "keep_ptr": "i32", "count_ptr": "i32"}


def kernels():
    """(kernel, family, fixed constexprs, flags to vary) for every kernel."""
    from spin_kernels.triton.backward import grad_hidden_kernel, grad_weight_kernel, logit_grads_kernel
    from spin_kernels.triton.forward import lse_partials_kernel

    head = {"HAS_BIAS": [False, True], "HAS_SOFTCAP": [False, True], "HAS_INDEX": [True]}
    gemm = {"FILTER": [False, True], "HAS_INDEX": [True]}
    # Triton specialises an int argument equal to 1 into a constant: the runtime flags of the
    # backward's products compile once more in that form, with their constant branches.
    flags_at_one = {"FILTER": [False], "HAS_INDEX": [True]}
    return [
        (lse_partials_kernel, "head", {}, head),
        (logit_grads_kernel, "producer", {}, {**head, "FILTER": [False, True], "COMPUTE_DB": [True]}),
        (grad_hidden_kernel, "gemm", {}, gemm),
        (grad_weight_kernel, "gemm", {}, gemm),
        (grad_hidden_kernel, "gemm", {"first": 1, "last": 1}, flags_at_one),
        (grad_hidden_kernel, "gemm", {"first": 1}, flags_at_one),
        (grad_hidden_kernel, "gemm", {"last": 1}, flags_at_one),
        (grad_weight_kernel, "gemm", {"accumulate": 1}, flags_at_one),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first configuration of each kernel, bf16, sm90")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spin_kernels.triton.config import _BACKWARD_TILES, _FAMILIES

    archs = [9] if args.quick else [9, 8]
    dtypes = ["bf16"] if args.quick else ["bf16", "fp32"]
    failures, fits, compiled = [], {}, 0
    started = time.time()
    for kernel, family, fixed, flags in kernels():
        for major in archs:
            configs = _FAMILIES[family][major][:1] if args.quick else _FAMILIES[family][major]
            tiles = dict(zip(("TILE_M", "TILE_V"), _BACKWARD_TILES[major])) if family != "head" else {}
            for cfg, dtype in itertools.product(configs, dtypes):
                for values in itertools.product(*flags.values()):
                    consts = {**cfg.kwargs, **tiles, **fixed, **dict(zip(flags, values)),
                              "DOT_PRECISION": "tf32" if dtype == "bf16" else "ieee"}
                    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
                    types = pointer_types(dtype)
                    signature = {name: "constexpr" if name in consts else
                                 f"*{types.get(name, 'fp32')}" if name.endswith("_ptr") else
                                 "fp32" if name in FLOAT_ARGS else "i32" for name in kernel.arg_names}
                    name = f"{kernel.fn.__name__}{fixed or ''} sm{major}0 {dtype} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
                    try:
                        out = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts),
                                             target=GPUTarget("cuda", major * 10, 32),
                                             options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
                    except Exception as exc:  # noqa: BLE001
                        failures.append(f"{name} {dict(zip(flags, values))}: {str(exc).strip()[-300:]}")
                        continue
                    compiled += 1
                    key = (kernel.fn.__name__, major, dtype, values, tuple(sorted(fixed.items())))
                    fits[key] = fits.get(key, 0) + (out.metadata.shared <= SHARED_LIMIT[major])
    nothing_fits = [key for key, n in fits.items() if n == 0]
    print(f"triton {triton.__version__}: {compiled} compiled in {time.time() - started:.0f} s, "
          f"{len(failures)} failed, {len(nothing_fits)} variants with no configuration that fits")
    for line in failures:
        print("FAILED", line)
    for key in nothing_fits:
        print("NO CONFIGURATION FITS", key)
    return 1 if failures or nothing_fits else 0


if __name__ == "__main__":
    sys.exit(main())
