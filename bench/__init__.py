"""Benchmark suite of hyperinf-ext (not part of the default test run; testpaths = ["tests"]).

* ``python -m bench.compare [--quick] [--out bench/RESULTS.md]`` runs every case, prints the ratio
  tables and rewrites ``bench/RESULTS.md``.
* ``python -m pytest bench/ --benchmark-only`` runs the pytest-benchmark modules at modest sizes.

Every module ``bench_<name>.py`` holds a ``section(quick, timer)`` used by ``compare`` and the
pytest-benchmark tests; ``common.py`` holds the timing helper, machine description and baselines.
"""
