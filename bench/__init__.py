"""Benchmark suite of hyperinf-ext (not part of the default test run; testpaths = ["tests"]).

* ``python -m bench.compare [--quick] [--out bench/RESULTS.md]`` runs every case, prints the ratio
  tables and rewrites ``bench/RESULTS.md``.
* ``python -m pytest bench/ --benchmark-only`` runs the pytest-benchmark modules at modest sizes.

Every module ``bench_<name>.py`` holds a ``section(quick, timer)`` used by ``compare`` and the
pytest-benchmark tests; ``timing.py`` holds the timing helper, machine description and formatting,
``inputs.py`` the synthetic inputs and pipeline setup, ``baselines.py`` the baselines and references.
"""
import os

# Every benchmark runs offline, whichever bench module is imported first (before transformers is).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
