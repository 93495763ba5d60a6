"""pytest set-up for the benchmark modules: ``python -m pytest bench/ --benchmark-only``.

The modules are named ``bench_*.py`` (not ``test_*.py``), so the default test run (testpaths =
["tests"]) never sees them; this hook collects them when bench/ is given on the command line.
Triton is not put into interpreter mode here (it is never timed on CPU).
"""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
