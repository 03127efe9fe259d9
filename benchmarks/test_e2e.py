"""pytest-benchmark: one SPIN training step, packed + fused against padded + full logits (and,
in the shared-prompt cases, the shared-prompt layout against packed + fused)."""

from __future__ import annotations

import pytest

from benchmarks.conftest import bench_device, bench_repeats, env_list, sync_after
from benchmarks.e2e import CASE_GROUPS, CASES, DEFAULT_CASES, Step, missing_dependency

DEVICE = bench_device()
NAMES = [n for name in env_list("SPIN_BENCH_E2E", [DEFAULT_CASES[DEVICE.type][0]])
         for n in CASE_GROUPS.get(name, (name,))]


@pytest.mark.parametrize("case_name,variant", [(n, v) for n in NAMES for v in CASES[n].variants])
def test_spin_step(benchmark, case_name, variant):
    why = missing_dependency()
    if why:
        pytest.skip(why)
    step = Step(CASES[case_name], variant, DEVICE)
    benchmark.group = f"e2e {case_name}"
    benchmark.extra_info.update(device=str(DEVICE), tokens=step.tokens)
    benchmark.pedantic(sync_after(step.run, DEVICE), setup=step.zero_grad, rounds=bench_repeats(),
                       warmup_rounds=1, iterations=1)
