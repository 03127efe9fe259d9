"""Static audit of the Triton kernels for sm90 and sm80, without a GPU.

Compiles every kernel × dtype path × autotuning candidate × flag variant (the variants of
scripts/triton_compile_check.py, plus fp16 and fp32 with TF32) with the installed Triton and its
own ptxas, and reads what a GPU run cannot be asked before it starts:

* the matrix instructions ``tl.dot`` became, from the cubin's SASS (cuobjdump): ``wgmma``
  (HGMMA, Hopper's warpgroup MMA), ``mma`` (HMMA, the sm80 tensor-core path; on sm90 the slower
  one) or ``FMA`` (no tensor core at all);
* whether global loads are asynchronous (cp.async: LDGSTS, or TMA: UTMALDG), i.e. pipelined;
* registers per thread and spills (ptxas -v: spill stores + loads, stack frame);
* shared memory per block (Triton's metadata) and whether it fits the card;
* the estimated occupancy: resident blocks (and warps) per SM from registers, shared memory
  and warps, with what limits it.

Rows are per (kernel, architecture, dtype path, configuration), the worst over the flag
variants. Writes (or updates) one section per Triton version in the Markdown report, so runs
under several Triton versions share one file:

    python scripts/triton_static_audit.py                       # -> benchmarks/results/triton-static-audit.md
    python scripts/triton_static_audit.py --jobs 2 --archs 90   # sm90 only, two compiler processes

Must run without TRITON_INTERPRET. Compiles into a fresh cache folder (ptxas's report is only
printed when it runs), so a full audit takes as long as the compilations: ~10-20 min on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_compile_check as check  # noqa: E402  (puts the checkout first on sys.path)

ROOT = check.ROOT
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "triton-static-audit.md"
# Per SM: registers, shared memory, resident warps and blocks (H100/H200; A100). The driver
# reserves 1 KiB of shared memory per resident block.
SM = {9: {"regs": 65536, "smem": 233_472, "warps": 64, "blocks": 32},
      8: {"regs": 65536, "smem": 167_936, "warps": 64, "blocks": 32}}
BLOCK_RESERVED_SMEM = 1024
TENSOR_OPS = {"HGMMA": "wgmma", "HMMA": "mma"}
ASYNC_LOADS = ("LDGSTS", "UTMALDG", "UBLKCP")
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)")


def expected_mma(major: int, dtype: str) -> str:
    """What tl.dot should become: tensor cores everywhere, except the exact fp32 path when it is
    "ieee" (by design: full fp32 products on the FMA units, as torch without TF32)."""
    from spin_kernels.triton.config import FP32_EXACT_PRECISION

    if dtype == "fp32-exact" and FP32_EXACT_PRECISION == "ieee":
        return "FMA"
    return "wgmma" if major >= 9 else "mma"


def occupancy(major: int, warps: int, regs: int, shared: int) -> tuple[int, str]:
    """(resident blocks per SM, the limiting resource), the CUDA occupancy calculator's rules:
    registers are allocated per warp in units of 256 (8 per thread)."""
    sm = SM[major]
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    limits = {"regs": sm["regs"] // per_warp // warps,
              "smem": sm["smem"] // (shared + BLOCK_RESERVED_SMEM),
              "warps": sm["warps"] // warps,
              "blocks": sm["blocks"]}
    blocks = min(limits.values())
    return blocks, next(k for k, v in limits.items() if v == blocks)


def _ptxas_report(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise RuntimeError(f"no ptxas -v report in the compile log (cache hit?):\n{log[-500:]}")
    stack, stores, loads = (int(x) for x in spills.groups())
    return {"regs": int(regs.group(1)), "stack": stack, "spill_stores": stores, "spill_loads": loads}


def _sass_ops(cubin: bytes) -> Counter:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    return Counter(_SASS_OP.findall(sass))


def ptxas_versions(archs: list[int]) -> str:
    """The ptxas release Triton uses for each architecture (Triton 3.9 has a second one for sm90+)."""
    from triton.backends.nvidia.compiler import get_ptxas_version

    found = []
    for major in archs:
        release = re.search(r"release ([\d.]+)", get_ptxas_version(major * 10))
        found.append(f"{release.group(1) if release else '?'} (sm{major}0)")
    return ", ".join(found)


def selected(spec: dict) -> list:
    """The variants an audit compiles (see main's options)."""
    every = check.variants(spec["archs"], spec["dtypes"], specialised=spec["all"], flag_extremes=not spec["all"])
    return [v for v in every if not spec["kernels"] or v.kernel_name in spec["kernels"]]


def audit_variant(job: tuple[dict, int]) -> dict:
    """Compile variant ``index`` of ``selected(spec)`` and read its cubin (runs in a worker)."""
    spec, index = job
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report
    v = selected(spec)[index]
    row = {"kernel": v.kernel_name, "major": v.major, "dtype": v.dtype, "config": v.config_name,
           "warps": v.config.num_warps, "variant": str(v)}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = v.compile()
    except Exception as exc:  # noqa: BLE001 — a failed compile is a finding, not a crash
        return {**row, "error": str(exc).strip().splitlines()[-1][:300]}
    ops = _sass_ops(compiled.asm["cubin"])
    tensor = [name for op, name in TENSOR_OPS.items() if ops[op]]
    shared = compiled.metadata.shared
    report = _ptxas_report(log.getvalue())
    fits = shared <= check.SHARED_LIMIT[v.major]
    blocks, limiter = occupancy(v.major, v.config.num_warps, report["regs"], shared) if fits else (0, "smem")
    return {**row, **report, "shared": shared, "fits": fits, "mma": tensor[0] if tensor else "FMA",
            "async_loads": sum(ops[op] for op in ASYNC_LOADS), "blocks": blocks, "limiter": limiter}


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (kernel, arch, dtype, config): the worst over its flag variants."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kernel"], r["major"], r["dtype"], r["config"])
        a = out.setdefault(key, {**{k: r[k] for k in ("kernel", "major", "dtype", "config", "warps")},
                                 "variants": 0, "errors": [], "regs": 0, "spill": 0, "stack": 0, "shared": 0,
                                 "mma": set(), "async": [], "blocks": None, "limiter": ""})
        a["variants"] += 1
        if "error" in r:
            a["errors"].append(f"{r['variant']}: {r['error']}")
            continue
        a["regs"] = max(a["regs"], r["regs"])
        a["spill"] = max(a["spill"], r["spill_stores"] + r["spill_loads"])
        a["stack"] = max(a["stack"], r["stack"])
        a["shared"] = max(a["shared"], r["shared"])
        a["mma"].add(r["mma"])
        a["async"].append(r["async_loads"] > 0)
        if a["blocks"] is None or r["blocks"] < a["blocks"]:
            a["blocks"], a["limiter"] = r["blocks"], r["limiter"]
    for a in out.values():
        a["fits"] = a["shared"] <= check.SHARED_LIMIT[a["major"]]
        a["expected"] = expected_mma(a["major"], a["dtype"])
        a["clean"] = (not a["errors"] and a["fits"] and a["spill"] == 0 and a["mma"] == {a["expected"]})
    return list(out.values())


def _cell_async(values: list[bool]) -> str:
    return "yes" if all(values) else "no" if not any(values) else f"{sum(values)} of {len(values)} variants"


def render_section(version: str, ptxas: str, command: str, seconds: float, rows: list[dict]) -> str:
    """The Markdown section of one Triton version: its findings, then the full table."""
    lines = [f"## Triton {version}", "",
             f"`{command}` · ptxas {ptxas} · {datetime.date.today().isoformat()} · {seconds:.0f} s on "
             f"{os.cpu_count()} cores · {sum(r['variants'] for r in rows)} compilations", ""]
    lines += ["### Findings", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["major"], r["dtype"]), []).append(r)
    for (kernel, major, dtype), rs in groups.items():
        clean = [r for r in rs if r["clean"]]
        issues = []
        spilling = [r for r in rs if r["spill"] and r["fits"]]
        if spilling:
            issues.append(f"{len(spilling)} spill")
        wrong = [r for r in rs if r["fits"] and r["mma"] != {r["expected"]}]
        if wrong:
            got = sorted(set().union(*(r["mma"] for r in wrong)))
            issues.append(f"{len(wrong)} lower to {'/'.join(got)} instead of {r['expected']}")
        unfit = [r for r in rs if not r["fits"]]
        if unfit:
            issues.append(f"{len(unfit)} exceed shared memory")
        errors = sum(len(r["errors"]) for r in rs)
        if errors:
            issues.append(f"{errors} compile errors")
        mark = "**no clean configuration**" if not clean else f"{len(clean)} of {len(rs)} clean"
        lines.append(f"- `{kernel}` sm{major}0 {dtype}: {mark}" + (f" ({'; '.join(issues)})" if issues else ""))
    lines += ["", "### Table", "",
              "| kernel | arch | dtype | config | tl.dot → | async loads | regs | spill B | stack B | smem KiB | "
              "fits | blocks/SM (warps) | limit | clean |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["errors"] and not r["mma"]:
            lines.append(f"| {r['kernel']} | sm{r['major']}0 | {r['dtype']} | {r['config']} | compile error: "
                         f"{r['errors'][0][-120:]} |" + " |" * 9)
            continue
        mma = "/".join(sorted(r["mma"]))
        mma = mma if r["mma"] == {r["expected"]} else f"**{mma}**"
        occ = f"{r['blocks']} ({r['blocks'] * r['warps']})" if r["fits"] else "–"
        lines.append(f"| {r['kernel']} | sm{r['major']}0 | {r['dtype']} | {r['config']} | {mma} | "
                     f"{_cell_async(r['async'])} | {r['regs']} | {r['spill'] or 0} | {r['stack']} | "
                     f"{r['shared'] / 1024:.0f} | {'yes' if r['fits'] else '**no**'} | {occ} | "
                     f"{r['limiter'] if r['fits'] else ''} | {'yes' if r['clean'] else '**no**'} |")
    return "\n".join(lines) + "\n"


PREAMBLE = """# Static audit of the Triton kernels (sm90, sm80)

Written by `scripts/triton_static_audit.py` (one section per Triton version; each run replaces
its own version's section): the Triton of the Python that runs it, CI's 3.9 from the project's
venv, the GPU machine's 3.6 from a venv with `triton==3.6.0` (scripts/test_transformers_versions.sh
makes one). No GPU: Triton compiles each kernel × dtype path × autotuning candidate × flag
variant to a cubin with its own ptxas; the figures are read from that cubin. The seconds in a
section's header are wall-clock time on a shared 2-core machine.

- **tl.dot →** the matrix instructions in the SASS: `wgmma` (HGMMA, Hopper's warpgroup MMA),
  `mma` (HMMA: the sm80 tensor-core path, on sm90 the slower one), `FMA` (no tensor core).
  Expected: `wgmma` on sm90, `mma` on sm80; `FMA` only for `fp32-exact` while it is "ieee"
  (full fp32 products, as torch without TF32). Bold: not the expected one.
- **dtype**: the inputs' dtype and `tl.dot`'s precision: `bf16`, `fp16`, `fp32` (TF32, when
  torch allows TF32 matmuls), `fp32-exact` (fp32 without TF32:
  `spin_kernels.triton.config.FP32_EXACT_PRECISION`), `fp32+bf16` (a fp32 hidden with a bf16
  weight: the products in fp32, `config.compute_dtype`).
- **async loads**: global→shared copies are cp.async (LDGSTS) or TMA (UTMALDG): the software
  pipeline (`num_stages`) is in place; `no`: plain loads, the K loop is not pipelined; `k of n
  variants`: only some flag variants are.
- **regs** per thread, **spill B** (spill stores + loads) and **stack B** (stack frame) from
  ptxas -v; **smem** Triton's shared memory per block; **fits**: ≤ 227 KiB (sm90), 163 KiB (sm80).
- **blocks/SM (warps)**: resident blocks per SM, and their warps, from registers (allocated per
  warp in units of 256), shared memory (+1 KiB per block) and warps (64 per SM); **limit** the
  resource that bounds it. An estimate of occupancy, not a measurement.
- Compiled as launched on contiguous, 16-byte aligned tensors at real sizes (unit strides
  constant, `tt.divisibility=16` on pointers, H, V and row strides: Triton's own launch-time
  specialisation; `UNIT_STRIDES`, `DIVISIBLE_INTS` in scripts/triton_compile_check.py).
- Rows are the worst over the kernel's flag variants (by default every flag off and every flag
  on: bias, softcap, gradient filter; `--all-variants` adds the rest and the runtime flags
  specialised to 1). **clean**: fits, no spill, the expected tl.dot lowering.
"""


def write_report(path: Path, version: str, section: str) -> None:
    """Replace (or add) the section of ``version`` in ``path``, keeping other versions' sections."""
    sections = {}
    if path.exists():
        text = path.read_text()
        for part in re.split(r"^(?=## Triton )", text, flags=re.M)[1:]:
            sections[part.splitlines()[0].removeprefix("## Triton ").strip()] = part.rstrip() + "\n"
    sections[version] = section

    def order(v: str):
        return [int(x) if x.isdigit() else 0 for x in re.split(r"[.+]", v)]

    body = "\n".join(sections[v] for v in sorted(sections, key=order, reverse=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PREAMBLE + "\n" + body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown report (default %(default)s)")
    ap.add_argument("--archs", default="90,80", help="compute capabilities, e.g. 90 or 90,80")
    ap.add_argument("--dtypes", default=",".join(check.DTYPES), help=f"among {','.join(check.DTYPES)}")
    ap.add_argument("--kernels", default="", help="only these kernels (comma-separated names)")
    ap.add_argument("--all-variants", action="store_true",
                    help="every flag variant and the runtime flags' specialisations at 1 (default: flags all "
                         "off and all on, the generic runtime flags)")
    ap.add_argument("--jobs", type=int, default=1, help="compiler processes")
    args = ap.parse_args(argv)
    if check.refuse_interpreter():
        return 2
    archs = [int(a) // 10 for a in args.archs.split(",")]
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = set(dtypes) - set(check.DTYPES)
    if unknown:
        ap.error(f"unknown dtypes {sorted(unknown)}")
    # ptxas reports only when it runs: compile into a fresh cache (workers inherit it).
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-audit-")
    import triton

    spec = {"archs": archs, "dtypes": dtypes, "all": args.all_variants,
            "kernels": [k for k in args.kernels.split(",") if k]}
    started = time.time()
    jobs = [(spec, i) for i in range(len(selected(spec)))]
    results = []

    def progress(result: dict) -> None:
        results.append(result)
        if len(results) % 25 == 0 or len(results) == len(jobs):
            print(f"[audit] {len(results)}/{len(jobs)} compiled, {time.time() - started:.0f} s", file=sys.stderr,
                  flush=True)

    if args.jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(audit_variant, jobs, chunksize=4):
                progress(result)
    else:
        for job in jobs:
            progress(audit_variant(job))
    seconds = time.time() - started
    shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    rows = aggregate(results)
    command = "python scripts/triton_static_audit.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = render_section(triton.__version__, ptxas_versions(archs), command.strip(), seconds, rows)
    write_report(args.out, triton.__version__, section)
    print(section.split("### Table")[0])
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
