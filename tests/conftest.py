import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without CUDA the impl="triton" tests run in the Triton interpreter. Triton chooses between
# interpreter and compiler when a kernel is defined, its own triton.language helpers included,
# so the choice must be made before anything imports triton: here, before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The C++ kernel's rule (oneDNN or BLAS, keep or recompute logits) is measured once per machine
# and cached under the user's cache dir; the suite runs the unmeasured default instead, so that
# results do not depend on a measurement of a loaded CI machine and nothing is written to the
# home directory (subprocesses inherit it). tests/test_cpu_kernel.py forces each rule and
# exercises the measurement and its cache in a temporary directory.
os.environ.setdefault("SPIN_KERNELS_CPU_RULE", "default")


def available_impls() -> list[str]:
    """The impls that run on CPU tensors in this environment (triton has its own interpreter tests)."""
    from spin_kernels.ops import available_backends

    available = available_backends("cpu")
    return [name for name in ("torch", "cpu") if available[name] is None]


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", available_impls())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
