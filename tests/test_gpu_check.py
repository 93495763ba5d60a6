"""The GPU check's dry mode (issue #15): `bash scripts/gpu_check.sh --dry` on the CPU.

Runs every section of ``python -m bench.gpu`` with the Triton interpreter and tiny sizes, so the
check that will first run on a GPU cannot rot, and checks what it writes: both result files, every
section present and not failed, the measured numbers finite.  No timing is asserted (dry-run
timings mean nothing).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("tests", "gfim", "schulz", "inverse", "attributor")


def _numbers(x, path=""):
    """(path, value) of every int/float inside x (bools excluded)."""
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_out")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_dry_run_writes_its_files(dry_run):
    assert {p.name for p in dry_run.iterdir()} >= {"GPU_RESULTS.md", "gpu_results.json", "gpu_check.log"}
    assert not list(dry_run.glob("*.tmp"))


def test_every_section_ran(dry_run):
    doc = json.loads((dry_run / "gpu_results.json").read_text())
    assert doc["meta"]["mode"].startswith("dry") and "finished" in doc["meta"]
    assert {"torch", "triton", "install", "cpp_ext"} <= set(doc["meta"]["machine"])
    assert set(doc["sections"]) == set(SECTIONS)
    for name, sec in doc["sections"].items():
        assert sec["status"] == "ok", (name, sec.get("error"), sec["skipped"])
        assert sec["rows"], name
        for t in sec["targets"]:
            assert set(t) == {"name", "met", "value"} and isinstance(t["met"], bool), (name, t)


def test_measured_numbers_are_finite(dry_run):
    doc = json.loads((dry_run / "gpu_results.json").read_text())
    secs = doc["sections"]
    for name in SECTIONS:
        for path, v in _numbers(secs[name]["rows"], name):
            assert math.isfinite(v), path
        for r in secs[name]["rows"]:
            assert not [k for k in r if k.endswith("_error")], (name, r)
    assert secs["tests"]["rows"][0]["passed"] >= 1 and secs["tests"]["rows"][0].get("failed", 0) == 0
    for r in secs["gfim"]["rows"]:
        assert {"ours_s", "cublas_s", "loop_s", "rate_vs_cublas"} <= set(r), r
    assert {r["dtype"] for r in secs["gfim"]["rows"]} == {"fp32", "tf32", "bf16"}
    # The interpreter runs the TMA kernel too, so its timing path is exercised.
    assert all("ours_tma_s" in r for r in secs["gfim"]["rows"] if r["dtype"] == "bf16")
    for r in secs["schulz"]["rows"]:
        assert {"ours_s", "cublas_s", "ratio"} <= set(r), r
    for r in secs["inverse"]["rows"]:
        assert {"ours_s", "cholesky_s", "inv_s", "iterations_max"} <= set(r), r
    attr = secs["attributor"]["rows"][0]
    # On the CPU the attributor itself must run; its stages and the device-side components are timed.
    assert "attributor_error" not in attr, attr.get("attributor_error")
    assert attr["scores_finite"] and attr["forward_backward_s"] > 0
    assert {"gradients", "gfim", "prepare"} <= set(attr["attributor_stages_s"])
    comp = attr["components"]
    assert comp["gfim_finite"] and comp["inverse_finite"]


def test_markdown_has_every_section_and_the_targets(dry_run):
    md = (dry_run / "GPU_RESULTS.md").read_text()
    assert "## Targets (issue #15)" in md
    for name in SECTIONS:
        assert f"## {name} — ok" in md, name
    assert "python -m bench.gpu" in md and "--dry" in md


def test_without_a_gpu_the_full_check_installs_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full check would run")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nothing installed" in proc.stdout
    assert not (tmp_path / "gpu_results.json").exists()
