"""Compile every Triton kernel of spin_kernels for sm80 and sm90 without a GPU.

For each kernel, each autotuning configuration of its family (spin_kernels/triton/config.py),
each input dtype (bf16, fp32) and each variant of its flags and optional tensors (absent: None,
as launched), Triton compiles to a cubin with its own ptxas; the check fails on a compile error,
or when an (architecture, dtype) has no configuration whose shared memory fits the device (the
autotuner would have nothing to run).
It catches what the interpreter cannot: lowering errors, and configurations too large for a
card, before a GPU session spends its minutes on them. What the cubins are like (matrix
instructions, registers, spills, occupancy) is scripts/triton_static_audit.py's report, built
on the same variants.

    python scripts/triton_compile_check.py            # everything (1,296 compilations, ~15 min on 2 cores)
    python scripts/triton_compile_check.py --quick    # first configuration of each, bf16, sm90

Must run without TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's spin_kernels, not an installed one
    sys.path.insert(0, str(ROOT))

SHARED_LIMIT = {9: 232_448, 8: 166_912}  # bytes of shared memory per block: H100/H200, A100
FLOAT_ARGS = ("inv_temp", "softcap", "filter_eps")
# The dtype paths a launch can take: (input dtype, DOT_PRECISION). 16-bit inputs ignore the
# precision; fp32 inputs take "tf32" when torch allows TF32 matmuls, else the exact path
# (spin_kernels.triton.config.dot_precision). "fp32+bf16": a fp32 hidden with a bf16 weight,
# whose products run in fp32 (config.compute_dtype, tiles.matching).
DTYPES = ("bf16", "fp16", "fp32", "fp32-exact", "fp32+bf16")


def dtype_path(name: str) -> tuple[str, str]:
    """(Triton element type, DOT_PRECISION) of a DTYPES entry; "hidden+weight" for mixed inputs."""
    from spin_kernels.triton.config import FP32_EXACT_PRECISION

    return {"bf16": ("bf16", "tf32"), "fp16": ("fp16", "tf32"), "fp32": ("fp32", "tf32"),
            "fp32-exact": ("fp32", FP32_EXACT_PRECISION), "fp32+bf16": ("fp32+bf16", FP32_EXACT_PRECISION)}[name]


# What Triton specialises at launch for contiguous, 16-byte aligned tensors at real sizes (H, V
# and the row strides multiples of 16, as for every model head here): the unit strides become the
# constant 1, the pointers and these ints carry tt.divisibility=16. Without the hints a kernel
# compiles as for a strided, unaligned view: correct, but with narrow (unvectorised) loads.
UNIT_STRIDES = ("stride_hk", "stride_wk", "stride_b")
DIVISIBLE_INTS = ("H", "V", "split_size", "v_lo", "v_hi", "stride_hm", "stride_wv", "stride_du", "stride_dbp",
                  "stride_acc", "stride_dm", "stride_dv")


def pointer_types(dtype: str) -> dict[str, str]:
    """Element type of every pointer argument, by name, for inputs of ``dtype`` ("hidden+weight"
    when they differ: G, ``du_ptr``, is then fp32)."""
    hidden, _, weight = dtype.partition("+")
    weight = weight or hidden
    products = hidden if hidden == weight else "fp32"
    return {"h_ptr": hidden, "dh_ptr": hidden, "w_ptr": weight, "b_ptr": weight, "dw_ptr": weight,
            "du_ptr": products, "y_ptr": "i64", "idx_ptr": "i64", "keep_ptr": "i32", "count_ptr": "i32"}


# An optional tensor's pointer in a variant: ABSENT (launched as None, which Triton specialises
# into a constexpr; the flag the kernel derives from it, flags_from_pointers, follows) or GIVEN.
# ABSENT first, as False before True: a kernel's first combination is every flag off, its last
# every flag on (``variants(flag_extremes=True)``).
ABSENT, GIVEN = None, "tensor"
OPTIONAL = [ABSENT, GIVEN]


def kernels():
    """(kernel, family, int arguments fixed at 1, the arguments to vary) for every kernel. What
    varies is an optional tensor's pointer (ABSENT or GIVEN; a pointer not named is GIVEN) or a
    constexpr flag the launcher sets itself."""
    from spin_kernels.triton.backward import grad_hidden_kernel, grad_weight_kernel, logit_grads_kernel
    from spin_kernels.triton.forward import lse_partials_kernel

    head = {"b_ptr": OPTIONAL, "HAS_SOFTCAP": [False, True], "idx_ptr": [GIVEN]}
    gemm = {"keep_ptr": OPTIONAL, "idx_ptr": [GIVEN]}
    # Triton specialises an int argument equal to 1 into a constant: the runtime flags of the
    # backward's products compile once more in that form, with their constant branches.
    flags_at_one = {"keep_ptr": [ABSENT], "idx_ptr": [GIVEN]}
    return [
        (lse_partials_kernel, "head", {}, {**head, "st_ptr": OPTIONAL}),
        (logit_grads_kernel, "producer", {}, {**head, "keep_ptr": OPTIONAL, "dbp_ptr": [GIVEN], "ent_ptr": OPTIONAL}),
        (grad_hidden_kernel, "gemm", {}, gemm),
        (grad_weight_kernel, "gemm", {}, gemm),
        (grad_hidden_kernel, "gemm", {"first": 1, "last": 1}, flags_at_one),
        (grad_hidden_kernel, "gemm", {"first": 1}, flags_at_one),
        (grad_hidden_kernel, "gemm", {"last": 1}, flags_at_one),
        (grad_weight_kernel, "gemm", {"accumulate": 1}, flags_at_one),
    ]


@dataclass
class Variant:
    """One compilation: a kernel with its constexprs, for one architecture and dtype path."""

    kernel: object  # as launched: the triton.jit function under its heuristics
    family: str
    major: int
    dtype: str  # a DTYPES entry
    config: object  # the triton.Config of the family's candidates
    fixed: dict = field(default_factory=dict)  # int arguments specialised to 1
    args: dict = field(default_factory=dict)  # this variant's optional pointers and constexpr flags
    aligned: bool = True  # the launch-time hints of contiguous, aligned tensors (UNIT_STRIDES ...)

    @property
    def jit(self):
        """The triton.jit function (what triton.compile takes; it does not run heuristics)."""
        import triton

        fn = self.kernel
        while not isinstance(fn, triton.JITFunction):
            fn = fn.fn
        return fn

    @property
    def kernel_name(self) -> str:
        return self.jit.fn.__name__

    @property
    def absent(self) -> dict:
        """The pointers launched as None: constexprs."""
        return {name: None for name, value in self.args.items() if name.endswith("_ptr") and value is ABSENT}

    @property
    def flags(self) -> dict:
        """The constexpr flags: those set by the launcher, then those the kernel's heuristics derive
        from its pointers, as they would at launch."""
        given = {**dict.fromkeys((n for n in self.jit.arg_names if n.endswith("_ptr")), GIVEN), **self.args}
        derived = {flag: rule(given) for flag, rule in getattr(self.kernel, "values", {}).items()}
        return {**{k: v for k, v in self.args.items() if not k.endswith("_ptr")}, **derived}

    @property
    def config_name(self) -> str:
        blocks = " ".join(f"{k}={v}" for k, v in self.config.kwargs.items())
        return f"{blocks} w{self.config.num_warps} s{self.config.num_stages}"

    def constexprs(self) -> dict:
        from spin_kernels.triton.config import _BACKWARD_TILES

        tiles = dict(zip(("TILE_M", "TILE_V"), _BACKWARD_TILES[self.major])) if self.family != "head" else {}
        units = dict.fromkeys(UNIT_STRIDES, 1) if self.aligned else {}
        consts = {**self.config.kwargs, **tiles, **units, **self.fixed, **self.absent, **self.flags,
                  "DOT_PRECISION": dtype_path(self.dtype)[1]}
        return {k: v for k, v in consts.items() if k in self.jit.arg_names}

    def attrs(self, consts: dict) -> dict:
        """tt.divisibility=16 on the pointers and DIVISIBLE_INTS (when ``aligned``), as at launch."""
        if not self.aligned:
            return {}
        return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(self.jit.arg_names)
                if name not in consts and (name.endswith("_ptr") or name in DIVISIBLE_INTS)}

    def compile(self):
        """Triton's compiled kernel (``.asm`` holds ttgir, ptx, cubin; ``.metadata.shared``)."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        consts = self.constexprs()
        types = pointer_types(dtype_path(self.dtype)[0])
        signature = {name: "constexpr" if name in consts else
                     f"*{types.get(name, 'fp32')}" if name.endswith("_ptr") else
                     "fp32" if name in FLOAT_ARGS else "i32" for name in self.jit.arg_names}
        return triton.compile(ASTSource(fn=self.jit, signature=signature, constexprs=consts,
                                        attrs=self.attrs(consts)),
                              target=GPUTarget("cuda", self.major * 10, 32),
                              options={"num_warps": self.config.num_warps, "num_stages": self.config.num_stages})

    def __str__(self) -> str:
        return (f"{self.kernel_name}{self.fixed or ''} sm{self.major}0 {self.dtype} {self.config_name} "
                f"{self.flags}{'' if self.aligned else ' unaligned'}")


def variants(archs: list[int], dtypes: list[str], quick: bool = False, alignments=(True,),
             specialised: bool = True, flag_extremes: bool = False) -> Iterator[Variant]:
    """Every (kernel, architecture, dtype path, candidate configuration, flag variant, alignment).

    ``specialised=False`` leaves out the runtime flags' specialisations at 1; ``flag_extremes``
    keeps only the flag variants with every flag off (every optional tensor absent) or every flag on."""
    from spin_kernels.triton.config import _FAMILIES

    for kernel, family, fixed, varied in kernels():
        if fixed and not specialised:
            continue
        combos = list(itertools.product(*varied.values()))
        if flag_extremes:
            combos = list(dict.fromkeys([combos[0], combos[-1]]))
        for major in archs:
            configs = _FAMILIES[family][major][:1] if quick else _FAMILIES[family][major]
            for cfg, dtype, values, aligned in itertools.product(configs, dtypes, combos, alignments):
                yield Variant(kernel, family, major, dtype, cfg, dict(fixed), dict(zip(varied, values)), aligned)


def refuse_interpreter() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return True
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first configuration of each kernel, bf16, sm90")
    args = ap.parse_args(argv)
    if refuse_interpreter():
        return 2
    import triton

    archs = [9] if args.quick else [9, 8]
    dtypes = ["bf16"] if args.quick else ["bf16", "fp32-exact", "fp32+bf16"]
    failures, fits, compiled = [], {}, 0
    started = time.time()
    # Both the launch-time specialisation of aligned tensors and the generic (strided) form.
    for v in variants(archs, dtypes, args.quick, alignments=(True, False)):
        try:
            out = v.compile()
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{v}: {str(exc).strip()[-300:]}")
            continue
        compiled += 1
        key = (v.kernel_name, v.major, v.dtype, tuple(v.flags.values()), tuple(sorted(v.fixed.items())), v.aligned)
        fits[key] = fits.get(key, 0) + (out.metadata.shared <= SHARED_LIMIT[v.major])
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
