"""pytest-benchmark: one SPIN training step, packed + fused against padded + full logits."""

from __future__ import annotations

import pytest

from benchmarks.conftest import bench_device, bench_repeats, env_list, sync_after
from benchmarks.e2e import CASES, DEFAULT_CASES, VARIANTS, Step, missing_dependency

DEVICE = bench_device()
NAMES = env_list("SPIN_BENCH_E2E", [DEFAULT_CASES[DEVICE.type][0]])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case_name", NAMES)
def test_spin_step(benchmark, case_name, variant):
    why = missing_dependency()
    if why:
        pytest.skip(why)
    step = Step(CASES[case_name], variant, DEVICE)
    benchmark.group = f"e2e {case_name}"
    benchmark.extra_info.update(device=str(DEVICE), tokens=step.tokens)
    benchmark.pedantic(sync_after(step.run, DEVICE), setup=step.zero_grad, rounds=bench_repeats(),
                       warmup_rounds=1, iterations=1)
