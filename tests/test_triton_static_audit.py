"""scripts/triton_static_audit.py's own logic (no compilation): reading ptxas and SASS, the
occupancy estimate, the verdicts, and one report file shared by Triton versions."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import triton_static_audit as audit  # noqa: E402

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'grad_weight_kernel' for 'sm_80'
ptxas info    : Function properties for grad_weight_kernel
    112 bytes stack frame, 132 bytes spill stores, 128 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 112 bytes cumulative stack size, 464 bytes cmem[0]
"""
SASS = """
        /*0f10*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0f20*/               @P0 LDGSTS.E.BYPASS.128 [R3], desc[UR6][R4.64] ;
        /*0f30*/              @!P1 FFMA R2, R3, R4, R5 ;
        /*0f40*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
"""


def test_ptxas_report_and_sass_are_read():
    assert audit._ptxas_report(PTXAS_LOG) == {"regs": 255, "stack": 112, "spill_stores": 132, "spill_loads": 128}
    with pytest.raises(RuntimeError, match="no ptxas"):
        audit._ptxas_report("ptxas info    : 0 bytes gmem")
    ops = Counter(audit._SASS_OP.findall(SASS))
    assert ops == Counter({"HGMMA": 2, "LDGSTS": 1, "FFMA": 1})


@pytest.mark.parametrize("major,warps,regs,shared,want", [
    (9, 8, 255, 128 * 1024, (1, "regs")),   # 256 registers x 256 threads: one block fills the file
    (9, 4, 128, 96 * 1024, (2, "smem")),    # 2 x (96 KiB + 1 KiB) fit 228 KiB, 3 do not
    (9, 4, 64, 8 * 1024, (8, "regs")),      # 64 x 128 = 8,192 registers a block: 8 blocks
    (8, 8, 100, 160 * 1024, (1, "smem")),   # 104 (rounded up to 8) x 256 threads: 2 by registers, 1 by smem
])
def test_occupancy_estimate(major, warps, regs, shared, want):
    assert audit.occupancy(major, warps, regs, shared) == want


def _row(**kw):
    base = {"kernel": "k", "major": 9, "dtype": "bf16", "config": "c", "warps": 8, "variant": "v", "regs": 100,
            "stack": 0, "spill_stores": 0, "spill_loads": 0, "shared": 1024, "fits": True, "mma": "wgmma",
            "async_loads": 3, "blocks": 2, "limiter": "regs"}
    return {**base, **kw}


def test_rows_aggregate_to_the_worst_variant_and_a_verdict():
    rows = audit.aggregate([_row(), _row(regs=200, spill_stores=8, blocks=1, async_loads=0),
                            _row(config="d"), _row(config="e", mma="mma"), _row(config="f", dtype="fp32-exact")])
    by = {(r["config"], r["dtype"]): r for r in rows}
    worst = by[("c", "bf16")]
    assert (worst["variants"], worst["regs"], worst["spill"], worst["blocks"]) == (2, 200, 8, 1)
    assert worst["async"] == [True, False] and audit._cell_async(worst["async"]) == "1 of 2 variants"
    assert not worst["clean"] and by[("d", "bf16")]["clean"]
    assert not by[("e", "bf16")]["clean"]  # mma on sm90: not Hopper's wgmma
    assert by[("f", "fp32-exact")]["expected"] == audit.expected_mma(9, "fp32-exact")


def test_report_keeps_other_versions_sections(tmp_path):
    path = tmp_path / "audit.md"
    audit.write_report(path, "3.6.0", "## Triton 3.6.0\n\nold 3.6\n")
    audit.write_report(path, "3.9.0", "## Triton 3.9.0\n\nfirst 3.9\n")
    audit.write_report(path, "3.9.0", "## Triton 3.9.0\n\nsecond 3.9\n")
    text = path.read_text()
    assert text.startswith(audit.PREAMBLE)
    assert text.index("## Triton 3.9.0") < text.index("## Triton 3.6.0")
    assert "second 3.9" in text and "first 3.9" not in text and "old 3.6" in text
