"""The benchmark runner works end to end on tiny shapes (no timing is asserted).

Runs ``python -m benchmarks run`` in-process on the ``tiny`` kernel case and the ``micro`` e2e
case, and one CPU memory probe in a subprocess; checks what was written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.__main__ import main
from benchmarks.e2e import missing_dependency
from benchmarks.measure import cpu_peak_extra


def _run(tmp_path: Path, *args: str) -> Path:
    assert main(["run", "--device", "cpu", "--threads", "1", "--warmup", "1", "--repeats", "2", "--no-memory",
                 "--out", str(tmp_path), *args]) == 0
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert folder.name.startswith("cpu-") and folder.name.endswith("-1threads")
    return folder


def test_kernel_runner_writes_json_table_and_plot(tmp_path):
    folder = _run(tmp_path, "--suite", "kernels", "--shapes", "tiny", "--only", "torch,naive",
                  "--ops", "spin_loss,logprobs", "--modes", "fwd+bwd")
    record = json.loads((folder / "kernels.json").read_text())
    assert record["env"]["versions"]["torch"] and record["env"]["device_type"] == "cpu"
    assert "commit" in record["env"]["git"]
    by = {(r["op"], r["contender"]): r for r in record["cases"]}
    for op in ("spin_loss", "logprobs"):
        for name in ("ours:torch", "naive", "gemm"):
            r = by[(op, name)]
            assert r["status"] == "ok", r
            assert len(r["times_s"]) == 2 and r["median_s"] > 0
        assert by[(op, "naive")]["check_ref"] == "ours:torch"
        assert max(by[(op, "naive")]["rel_err"].values()) < 1e-4
        assert by[(op, "ours:torch")]["of_floor"] > 0
    table = (folder / "kernels.md").read_text()
    assert "## tiny · spin_loss · fwd+bwd" in table and "vs naive" in table
    assert (folder / "kernels.png").stat().st_size > 0


@pytest.mark.skipif(missing_dependency() is not None, reason="packing/models helpers not importable")
def test_e2e_runner_losses_agree(tmp_path):
    folder = _run(tmp_path, "--suite", "e2e", "--e2e-cases", "micro")
    record = json.loads((folder / "e2e.json").read_text())
    padded, packed = record["cases"]
    assert padded["status"] == packed["status"] == "ok", record["cases"]
    assert padded["tokens"] == packed["tokens"] > 0
    assert abs(padded["loss"] - packed["loss"]) < 1e-4
    assert (folder / "e2e.md").exists() and (folder / "e2e.png").exists()


def test_cpu_memory_probe_runs_in_a_subprocess():
    probe = cpu_peak_extra("tiny", "naive", "spin_loss", "fwd+bwd", threads=1, timeout_s=120)
    assert probe["status"] == "ok", probe
    assert probe["peak_extra_bytes"] >= 0 and probe["mem_method"]
