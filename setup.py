"""Build and install spin_kernels.

The C++/OpenMP CPU kernels in csrc/ are compiled here (torch.utils.cpp_extension) so that the
first use never triggers a compile. Install with ``pip install --no-build-isolation .``
(the extension builds against the torch already installed). If no compiler is available the
install still succeeds without the extension; impl="auto" then falls back to impl="torch".
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("SPIN_KERNELS_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("spin_kernels: torch not importable at build time; skipping the C++ extension", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Builds csrc/; a failed build leaves a working pure-Python install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # no compiler, missing headers...
                print(f"spin_kernels: C++ extension not built ({exc}); impl='cpu' will be unavailable",
                      file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                print(f"spin_kernels: C++ extension not built ({exc}); impl='cpu' will be unavailable",
                      file=sys.stderr)

    # Threads come from ATen's at::parallel_for, a header template whose `omp parallel` is compiled
    # into this extension: without -fopenmp it silently runs serially. The libgomp it links is
    # the one torch already loaded (same soname), so MKL and ATen share one thread pool. Hot loops
    # are compiled for several x86-64 levels (target_clones in csrc/), so no -march flag is
    # needed; SPIN_KERNELS_NATIVE=1 tunes everything for the build machine.
    flags = ["-O3", "-fopenmp"]
    if os.environ.get("SPIN_KERNELS_NATIVE") == "1":
        flags.append("-march=native")
    ext = CppExtension(
        "spin_kernels._C",
        sources,
        extra_compile_args={"cxx": flags},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="spin_kernels",
    version="0.1.0",
    description="Fused kernels and a packed trainer for SPIN (Self-Play Fine-Tuning)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["spin_kernels", "spin_kernels.*"]),
    package_data={"spin_kernels": ["data/*", "data/**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        # Models are loaded and built with dtype= (torch_dtype= before 4.56); in 4.56.0 and 4.56.1
        # get_decoder() of a causal LM returns None (transformers issue 40815, fixed in 4.56.2),
        # and the packed forward hooks the decoder. scripts/test_transformers_versions.sh runs the
        # model tests on this lowest version and on the GPU machine's.
        "transformers>=4.56.2",
        "safetensors",
        "tokenizers",
        "pyyaml",
        "tqdm",
        "xxhash",  # digests of model weights (provenance of a run's rows)
    ],
    extras_require={
        "gpu": ["flash-attn"],
        "bench": ["pytest-benchmark", "liger-kernel", "cut-cross-entropy", "trl", "matplotlib"],
        # datasets (Parquet / `datasets` input of the trainer), peft (LoRA) and bitsandbytes (the
        # 4-bit QLoRA base) are exercised by the tests.
        "dev": ["pytest", "hypothesis", "ruff", "pytest-benchmark", "matplotlib", "datasets", "peft", "bitsandbytes"],
        "lora": ["peft"],
        "qlora": ["peft", "bitsandbytes"],
        # spin_kernels.integrations.trl (SPINTrainer): tested with TRL 1.16 (its DPOTrainer internals)
        "trl": ["trl>=1.16,<1.17", "datasets"],
        "vllm": ["vllm"],
    },
    entry_points={"console_scripts": ["spin-kernels = spin_kernels.cli:main"]},
)
