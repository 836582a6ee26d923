"""Build script: packages (kernels/ installs as cpo_fast.kernels) and the optional C++ core.

The C++ extension `cpo_fast._C` needs only a C++17 compiler and pybind11 (no libtorch):
Python passes data pointers, shapes, strides and dtype codes. If it fails to build, the
package still installs and runs on the Triton and reference backends.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

packages = ["cpo_fast", "cpo_fast.ops", "cpo_fast.kernels", "cpo_fast.pipeline"]
package_dir = {"cpo_fast.kernels": "kernels"}

ext_modules: list = []
cmdclass: dict = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("CPO_FAST_NO_EXT") != "1":
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext_modules.append(
        Pybind11Extension(
            "cpo_fast._C",
            sources,
            cxx_std=17,
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = build_ext

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
