"""Benchmark suites of spin_kernels: the fused lm-head ops (kernels) and one SPIN step (e2e).

One home for every case: ``shapes`` (what is measured), ``contenders`` (who is measured: our
impls and the baselines), ``measure`` (how: timing, memory, the GEMM floor). The runner
(``python -m benchmarks run ...``) and the pytest-benchmark suites (``benchmarks/test_*.py``)
both build on these. See benchmarks/README.md.
"""
