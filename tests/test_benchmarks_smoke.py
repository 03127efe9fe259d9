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


@pytest.mark.skipif(missing_dependency() is not None, reason="packing/models helpers not importable")
def test_e2e_shared_prompt_case_writes_its_own_tagged_files(tmp_path):
    folder = _run(tmp_path, "--suite", "e2e", "--e2e-cases", "micro-shared", "--tag", "shared")
    assert not (folder / "e2e.json").exists()
    record = json.loads((folder / "e2e-shared.json").read_text())
    packed, shared = record["cases"]
    assert (packed["variant"], shared["variant"]) == ("packed-fused", "packed-shared")
    assert packed["status"] == shared["status"] == "ok", record["cases"]
    assert packed["baseline"] and not shared["baseline"]
    assert packed["tokens"] == shared["tokens"] and shared["layout_tokens"] < packed["layout_tokens"]
    assert abs(packed["loss"] - shared["loss"]) < 1e-5
    assert len(shared["cpu_times_s"]) == len(shared["times_s"]) == 2 and shared["cpu_median_s"] > 0
    assert any("Tokens per pair on the UltraChat sample" in n for n in record["notes"])
    assert "| packed-shared |" in (folder / "e2e-shared.md").read_text() and (folder / "e2e-shared.png").exists()


def test_iteration_suite_splits_one_small_iteration(tmp_path):
    folder = _run(tmp_path / "out", "--suite", "iteration", "--work-dir", str(tmp_path / "work"), "--prompts", "6",
                  "--max-new-tokens", "6", "--sft-steps", "1")
    record = json.loads((folder / "iteration.json").read_text())
    assert [c["case"] for c in record["cases"]] == ["before", "after"]
    for case in record["cases"]:
        assert case["status"] == "ok", case
        stages = case["stages"]
        assert list(stages) == ["generate", "reference", "train", "other"]
        assert abs(sum(s["share"] for s in stages.values()) - 1) < 1e-9
        assert stages["generate"]["prompts"] == stages["reference"]["pairs"] == 6
        assert stages["train"]["steps"] == 1 and stages["train"]["tokens"] == stages["reference"]["tokens"] > 0
    assert record["cases"][1]["generation"]["backend"] == "continuous"
    before = record["cases"][0]["generation"]  # the options in force: the planner's time check reads the batch size
    assert (before["backend"], before["generation_batch_size"], before["generation_seeding"]) == ("hf", 16, "batch")
    assert "**before → after**" in (folder / "iteration.md").read_text()


def test_generation_suite_per_example_contenders_sample_the_same_rows(tmp_path, monkeypatch):
    from benchmarks import generation

    small = dict(generation.CASES["ultrachat-random"], prompts=6, max_new_tokens=5)
    monkeypatch.setitem(generation.CASES, "ultrachat-random", small)
    folder = _run(tmp_path / "out", "--suite", "generation", "--work-dir", str(tmp_path / "work"), "--generation-cases",
                  "ultrachat-random", "--only", "hf-sorted,continuous")
    record = json.loads((folder / "generation.json").read_text())
    by = {c["contender"]: c for c in record["cases"]}
    assert set(by) == {"hf", "hf-sorted", "continuous-16", "continuous-32", "continuous-64"}
    assert all(c["status"] == "ok" and c["prompts"] == 6 for c in by.values()), record["cases"]
    assert len({by[n]["rows_digest"] for n in ("hf-sorted", "continuous-16", "continuous-32", "continuous-64")}) == 1
    assert by["hf"]["speedup"] == 1.0 and all(c["speedup"] > 0 for c in by.values())
    assert "| continuous-32 |" in (folder / "generation.md").read_text()


def test_cpu_memory_probe_runs_in_a_subprocess():
    probe = cpu_peak_extra("tiny", "naive", "spin_loss", "fwd+bwd", threads=1, timeout_s=120)
    assert probe["status"] == "ok", probe
    assert probe["peak_extra_bytes"] >= 0 and probe["mem_method"]


@pytest.mark.slow
def test_gpu_session_dry_run_takes_every_path_of_the_gpu_call(tmp_path):
    """``bash benchmarks/gpu_session.sh --dry-run``: the GPU call's commands on CPU (the test
    invocation collects, the whole CUDA plan runs at miniature sizes with Triton interpreted, both
    e2e cases run), and OUT holds exactly what the device tool brings back."""
    import os
    import re
    import subprocess

    from benchmarks.kernels import gpu_plan

    out = tmp_path / "out"
    # A generous kernel budget: a loaded CI machine must not skip groups of the plan.
    env = dict(os.environ, PYTHON=sys.executable, SPIN_BENCH_KERNEL_BUDGET_S="3600", SPIN_BENCH_E2E_BUDGET_S="3600")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--dry-run", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    log = (out / "run_gpu.log").read_text() if (out / "run_gpu.log").exists() else ""
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "tests rc=0, benchmarks rc=0, layout rc=0" in log
    assert re.search(r"^\d+ tests collected", log, flags=re.M), log[:2000]

    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert folder.name.startswith("dry-run-cpu-")
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    expected = ["run_gpu.log"] + [f"{folder.name}/{n}" for n in
                                  ("e2e.json", "e2e.md", "e2e.png", "kernels-sweep.png", "kernels.json", "kernels.md",
                                   "kernels.png")]
    assert written == sorted(expected)

    kernels = json.loads((folder / "kernels.json").read_text())
    assert kernels["settings"]["dry_run"] and "DRY RUN" in (folder / "kernels.md").read_text()
    plan = [(g.case, g.op, g.mode) for g in gpu_plan()]
    assert list(dict.fromkeys((r["case"], r["op"], r["mode"]) for r in kernels["cases"])) == plan
    names = {r["contender"] for r in kernels["cases"]}
    assert {"ours:triton", "ours:torch", "naive", "gemm"} <= names and not names & {"ours:cpu", "gemm:onednn"}
    for r in kernels["cases"]:
        assert r["status"] == "ok" or (r["status"] == "n/a" and r["contender"] == "liger"), r
        if r["status"] == "ok" and r["kind"] != "floor":
            assert r["peak_extra_bytes"] > 0 and "dry run" in r["mem_method"]

    e2e = json.loads((folder / "e2e.json").read_text())
    assert [(r["case"], r["variant"]) for r in e2e["cases"]] == [
        (c, v) for c in ("llama-1b", "llama-1b-live") for v in ("padded-full-logits", "packed-fused")]
    assert all(r["status"] == "ok" for r in e2e["cases"]), e2e["cases"]
    for padded, packed in zip(e2e["cases"][0::2], e2e["cases"][1::2]):
        assert abs(padded["loss"] - packed["loss"]) < 2e-2  # bf16 models: the two attention paths round apart
