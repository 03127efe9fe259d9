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


#: Every op impl; a test taking the ``impl`` fixture runs once per impl, on CPU tensors, and is
#: reported as skipped, with the reason, where an impl cannot run here.
IMPLS = ("torch", "cpu", "triton")


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    from cases import impl_unavailable

    name = request.param
    if name == "triton" and not torch.cuda.is_available():
        pytest.skip("impl=triton on CPU runs in the Triton interpreter: tests/test_triton_kernels.py and "
                    "tests/test_padded_rows.py test it on interpreter-sized cases (and bf16 only on CUDA)")
    why = impl_unavailable(name, torch.device("cpu"))
    if why:
        pytest.skip(why)
    return name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
