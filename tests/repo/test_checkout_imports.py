"""The checkout root shadows no installed distribution (issue #20).

transformers ≥ 5.25 imports Hugging Face's ``kernels`` package whenever it loads a model.  Python
started in the checkout root (``python``, ``python -m pytest``, a notebook) puts the root first on
``sys.path``; a top-level package there with an installed distribution's name would be found first.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What Python started in the root can import as a top-level module: every .py file and every folder
# with an __init__.py.  A folder without one (kernels/, tests/, scripts/, csrc/) is at most a namespace
# portion, which never wins over a regular package installed anywhere on sys.path.
def _root_importables() -> dict[str, Path]:
    names = {}
    for p in ROOT.iterdir():
        if p.name.startswith(".") or p.name in {"build", "dist"}:
            continue
        if p.is_file() and p.suffix == ".py":
            names[p.stem] = p
        elif p.is_dir() and (p / "__init__.py").is_file() and p.name.isidentifier():
            names[p.name] = p
    return names


def test_kernels_folder_is_not_a_top_level_package():
    assert (ROOT / "kernels" / "gfim.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "an __init__.py in kernels/ would make the folder the top-level module `kernels`, "
        "shadowing Hugging Face's package (kernels/README.md)"
    )


def test_no_root_name_is_an_installed_distributions_top_level():
    # packages_distributions maps import names to the distributions that install them (top_level.txt
    # or RECORD); hyperinf-ext itself is the one allowed owner of its own names.
    owners = md.packages_distributions()
    clashes = {
        name: sorted(set(owners[name]) - {"hyperinf-ext", "hyperinf_ext"})
        for name in _root_importables()
        if name in owners and set(owners[name]) - {"hyperinf-ext", "hyperinf_ext"}
    }
    assert not clashes, f"top-level names of the checkout also installed by: {clashes}"


def test_root_importables_are_known():
    # A new top-level package or script is a new name that may clash later: list it here on purpose.
    assert set(_root_importables()) <= {"setup", "bench", "hyperinf_ext"}, sorted(_root_importables())


def test_python_in_checkout_root_loads_a_model_with_hf_kernels():
    """The issue's reproduction: Python started in the root imports transformers, loads a model from a
    folder and imports HF's ``kernels`` normally, while hyperinf_ext.kernels is the checkout's folder."""
    pytest.importorskip("transformers")
    try:
        md.distribution("kernels")
    except md.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5.25)")
    model_dir = pytest.importorskip("hyperinf_ext.app.data.packaged").default_model_path()
    code = textwrap.dedent(
        f"""
        import os, sys
        assert sys.path[0] in ("", os.getcwd()), sys.path[:2]
        import transformers
        model = transformers.AutoModel.from_pretrained({str(model_dir)!r})
        import kernels
        print("HF_KERNELS", os.path.realpath(kernels.__file__))
        import hyperinf_ext.kernels as ours
        print("OURS", os.path.realpath(list(ours.__path__)[0]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line.startswith(("HF_", "OURS")))
    hf = Path(lines["HF_KERNELS"])
    assert hf.parent.name == "kernels" and hf.parent != ROOT / "kernels", hf
    assert "site-packages" in hf.parts or "dist-packages" in hf.parts, hf
    # Python started in the root imports the checkout's hyperinf_ext, whose kernels are the root's folder.
    assert Path(lines["OURS"]) == ROOT / "kernels", lines["OURS"]


def test_installed_package_outside_the_root_keeps_one_kernels_path(tmp_path):
    """From another folder (the editable or regular install is what Python finds): ``kernels`` is never
    the repository's folder, and ``hyperinf_ext.kernels`` is the one home of the kernel files."""
    code = textwrap.dedent(
        """
        import importlib.util, os
        import hyperinf_ext.kernels as ours
        print("OURS", os.path.realpath(list(ours.__path__)[0]))
        spec = importlib.util.find_spec("kernels")
        print("TOP", "none" if spec is None else os.path.realpath(spec.origin or list(spec.submodule_search_locations)[0]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    if run.returncode != 0 and "No module named 'hyperinf_ext'" in run.stderr:
        pytest.skip("hyperinf-ext is not installed in this environment (checkout-only run)")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    ours = Path(lines["OURS"])
    assert (ours / "gfim.py").is_file() and (ours == ROOT / "kernels" or (ours / "__init__.py").is_file()), ours
    assert lines["TOP"] == "none" or not Path(lines["TOP"]).is_relative_to(ROOT / "kernels"), lines["TOP"]
