"""scripts/versions.py: the resolved versions, compared with and recorded as the known-good set."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("hyperinf_versions_script", ROOT / "scripts" / "versions.py")
versions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(versions)


def test_changes_name_every_added_removed_and_moved_distribution():
    known = {"torch": "2.13.0", "transformers": "5.24.0", "gone": "1.0"}
    now = {"torch": "2.13.0", "transformers": "5.25.0", "kernels": "0.19.1"}
    assert versions.changes(now, known) == [
        "gone 1.0 → (absent)", "kernels (absent) → 0.19.1", "transformers 5.24.0 → 5.25.0"]
    assert versions.changes(now, dict(now)) == []
    text = versions.report(now, known)
    assert "3 changed since the last known-good set" in text and "transformers 5.24.0 → 5.25.0" in text


def test_record_then_read_round_trips_as_a_pip_constraints_file(tmp_path):
    path = tmp_path / "known-good.txt"
    now = {"numpy": "2.4.6", "torch": "2.13.0"}
    versions.record(now, path)
    assert versions.read_known_good(path) == now
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines == ["numpy==2.4.6", "torch==2.13.0"]  # what pip's -c takes


def test_this_environment_resolves_without_local_labels_and_without_itself():
    now = versions.resolved()
    assert "torch" in now and "+" not in now["torch"]
    assert "hyperinf-ext" not in now


def test_the_committed_known_good_set_pins_torch_and_transformers():
    known = versions.read_known_good()
    assert known.get("torch", "").startswith("2.13."), known.get("torch")
    assert "transformers" in known and "kernels" in known


def test_the_script_prints_the_versions_line():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "versions.py")], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.startswith("[versions] python ") and "torch " in out


def test_package_version_has_one_value():
    import re

    from hyperinf_ext.version import __version__

    declared = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert __version__ == declared, (__version__, declared)
