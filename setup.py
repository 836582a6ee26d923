"""Build script: packages and the optional C++ core.

The Triton kernels live in the top-level folder kernels/ and are reached as `cpo_fast.kernels`
through the symlink cpo_fast/kernels -> ../kernels. kernels/ has no __init__.py on purpose:
from the repository root a regular package named `kernels` would shadow Hugging Face's
`kernels` distribution (a dependency of transformers), while a folder without one never does
(Python prefers a regular package found later on sys.path to a namespace portion).

The C++ extension `cpo_fast._C` needs only a C++17 compiler and pybind11 (no libtorch):
Python passes data pointers, shapes, strides and a dtype enum (`_C.DType`). If it fails to build, the
package still installs and runs on the Triton and reference backends.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

packages = ["cpo_fast", "cpo_fast.cpu", "cpo_fast.ops", "cpo_fast.kernels", "cpo_fast.pipeline",
            "cpo_fast.pipeline.run", "cpo_fast.pipeline.stages", "cpo_fast.pipeline.training",
            "cpo_fast.pipeline.report", "cpo_fast.integrations", "cpo_fast.bench"]

ext_modules: list = []
cmdclass: dict = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("CPO_FAST_NO_EXT") != "1":
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    class OptionalBuildExt(build_ext):
        """Build the C++ core, but let the install succeed without it (reference fallback).

        Set CPO_FAST_REQUIRE_EXT=1 to turn a failed build into an error instead.
        """

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing, no OpenMP, ...
                if os.environ.get("CPO_FAST_REQUIRE_EXT") == "1":
                    raise
                print(f"WARNING: cpo_fast._C was not built ({exc}); CPU tensors will use "
                      "the PyTorch reference path.")

    ext_modules.append(
        Pybind11Extension(
            "cpo_fast._C",
            sources,
            depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
            cxx_std=17,
            # No -march=native and no -ffast-math: the portable build runs anywhere; AVX2+FMA
            # and AVX-512 code is compiled in csrc/kernels_avx2.cpp / kernels_avx512.cpp under
            # target pragmas and picked at run time by CPUID (CPO_FAST_CPU_ISA forces one),
            # and IEEE semantics (-inf logits, NaN) are kept. Contraction lets the wider
            # builds use FMA.
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = OptionalBuildExt

setup(packages=packages, ext_modules=ext_modules, cmdclass=cmdclass)
