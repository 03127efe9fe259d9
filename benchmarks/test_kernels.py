"""pytest-benchmark: the kernel suite's cases (shapes x ops x modes x contenders of the runner)."""

from __future__ import annotations

import functools

import pytest

from benchmarks.conftest import bench_device, bench_repeats, env_list, sync_after
from benchmarks.contenders import Gemm, select
from benchmarks.kernels import ALL_OP_MODES, expand_shape
from benchmarks.shapes import make_inputs, resolve_case

DEVICE = bench_device()
SHAPES = [n for s in env_list("SPIN_BENCH_SHAPES", ["llama3-8b@16k" if DEVICE.type == "cuda" else "cpu-small"])
          for n in expand_shape(s)]
CONTENDERS, UNAVAILABLE = select(DEVICE, env_list("SPIN_BENCH_ONLY", []) or None)


@functools.lru_cache(maxsize=1)
def inputs_for(case_name: str):
    return make_inputs(resolve_case(case_name), DEVICE)


@pytest.mark.parametrize("contender", CONTENDERS, ids=[c.name for c in CONTENDERS])
@pytest.mark.parametrize("op,mode", ALL_OP_MODES, ids=[f"{o}-{m}" for o, m in ALL_OP_MODES])
@pytest.mark.parametrize("case_name", SHAPES)
def test_kernel(benchmark, case_name, op, mode, contender):
    why = contender.unsupported(op, mode)
    if why:
        pytest.skip(why)
    case = resolve_case(case_name)
    try:
        runner = contender.prepare(inputs_for(case_name), op, mode)
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    flops = Gemm().flops(case) if contender.kind == "floor" else case.flops(mode)
    benchmark.group = f"{case_name} {op} {mode}"
    benchmark.extra_info.update(device=str(DEVICE), contender=contender.name, flops=flops, unavailable=UNAVAILABLE)
    benchmark.pedantic(sync_after(runner.run, DEVICE), setup=runner.zero_grad, rounds=bench_repeats(),
                       warmup_rounds=2, iterations=1)
    runner.zero_grad()
