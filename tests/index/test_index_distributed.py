"""An index built by two torchrun ranks (each writing its own shard folder) answers as one built in one process.

The stored gradients are float32 roundings of the same float64 gradients and the GFIM sums differ only in
summation order, so the scores agree to 1e-6 relative to the largest score (measured: ~1e-9).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "distributed"))

from test_distributed import _results, _torchrun  # noqa: E402
from dist_worker import N_QUERY, N_TRAIN, all_batches  # noqa: E402
from persist_child import make_data, tiny_model  # noqa: E402

from hyperinf_ext.index import Index, IndexConfig  # noqa: E402


def test_two_ranks_build_the_index_one_process_would(tmp_path):
    proc = _torchrun("index", tmp_path)
    res = _results(tmp_path, proc.stdout + proc.stderr)
    assert [r["n_train"] for r in res] == [N_TRAIN, N_TRAIN]
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["shards"] == ["shards/rank-000", "shards/rank-001"] and meta["complete"]
    two = Index.open(tmp_path / "idx", tiny_model())
    one = Index.build(tiny_model(), all_batches(make_data(N_TRAIN, 1)), tmp_path / "one",
                      config=IndexConfig(proj_dim=0), progress=False)
    query = [{k: v[i:i + 2] for k, v in make_data(N_QUERY, 2).items()} for i in range(0, N_QUERY, 2)]
    S1, S2 = one.scores(query), two.scores(query)
    assert float((S1 - S2).abs().max()) <= 1e-6 * float(S1.abs().max())
    torch.testing.assert_close(two.self_scores(), one.self_scores(), rtol=1e-6, atol=0)
