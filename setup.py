"""Build script: the Python package, the Triton kernels (mapped to ``hyperinf_ext.kernels``) and the
C++ CPU ops (``hyperinf_ext._C``, registered as ``torch.ops.hyperinf.*``).

Install with ``pip install --no-build-isolation .`` after ``pip install torch==2.13.0``.
Set ``HYPERINF_NO_EXT=1`` to skip the C++ extension (the package then runs on its other backends).
"""
import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# Every package under hyperinf_ext/ (found, so a new subpackage cannot be left out of a wheel), plus
# the Triton kernels mapped into it.
PACKAGES = find_packages(include=["hyperinf_ext", "hyperinf_ext.*"]) + ["hyperinf_ext.kernels"]
# kernels/ lives at the top of the repository (design card) but installs inside the package: the
# top-level name `kernels` belongs to Hugging Face's package, which transformers imports.  The folder has
# no __init__.py, so it never shadows that package from a checkout (kernels/README.md); the installed
# subpackage gets the one below.  A source checkout or an editable install gets the same package from
# hyperinf_ext/__init__.py's _map_source_kernels.
PACKAGE_DIR = {"hyperinf_ext": "hyperinf_ext", "hyperinf_ext.kernels": "kernels"}
KERNELS_INIT = '''"""Triton kernels, their tile configurations and the ahead-of-time compilation helper.

Installed from the repository's kernels/ folder (see its README.md); importing needs triton.
"""
'''


class BuildPy(build_py):
    """build_py that gives the installed ``hyperinf_ext.kernels`` its ``__init__.py``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable: the package comes from the checkout (hyperinf_ext._map_source_kernels)
        target = os.path.join(self.build_lib, "hyperinf_ext", "kernels", "__init__.py")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write(KERNELS_INIT)

    def check_package(self, package, package_dir):
        if package == "hyperinf_ext.kernels":
            return None  # no __init__.py in the source folder, on purpose (written by run)
        return super().check_package(package, package_dir)


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
cmdclass["build_py"] = BuildPy
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
