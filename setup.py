"""Build script: the Python package, the Triton kernels (mapped to ``hyperinf_ext.kernels``) and the
C++ CPU ops (``hyperinf_ext._C``, registered as ``torch.ops.hyperinf.*``).

Install with ``pip install --no-build-isolation .`` after ``pip install torch==2.13.0``.
Set ``HYPERINF_NO_EXT=1`` to skip the C++ extension (the package then runs on its other backends).
"""
import glob
import os

from setuptools import find_packages, setup

# Every package under hyperinf_ext/ (found, so a new subpackage cannot be left out of a wheel), plus
# the Triton kernels mapped into it.
PACKAGES = find_packages(include=["hyperinf_ext", "hyperinf_ext.*"]) + ["hyperinf_ext.kernels"]
# kernels/ lives at the top of the repository (design card) but installs inside the package: the
# top-level name `kernels` is taken on PyPI.  Editable installs map it through setuptools' finder; a
# source checkout without install gets the same name from hyperinf_ext/__init__.py's _map_source_kernels.
PACKAGE_DIR = {"hyperinf_ext": "hyperinf_ext", "hyperinf_ext.kernels": "kernels"}


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("HYPERINF_NO_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        "hyperinf_ext._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++20", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
