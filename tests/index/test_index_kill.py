"""A build killed (os._exit, no cleanup) at each write step of the index resumes to the index of an
uninterrupted build: the same stored rows bit for bit and the same scores."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from hyperinf_ext import persistence  # noqa: E402
from hyperinf_ext.index import Index, IndexConfig  # noqa: E402
from persist_child import make_data, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys
sys.path.insert(0, {tests!r})
from persist_child import make_data, tiny_model
from hyperinf_ext.index import Index, IndexConfig
data = make_data(14, 1)
batches = [{{k: v[i:i + 2] for k, v in data.items()}} for i in range(0, 14, 2)]
Index.build(tiny_model(), batches, {out!r}, config=IndexConfig(proj_dim=6, rows_per_shard=4), checkpoint_every=2,
            progress=False)
"""


def _build_in_child(out: Path, crash: str | None) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(persistence.CRASH_ENV, None)
    if crash:
        env[persistence.CRASH_ENV] = crash
    code = CHILD.format(tests=str(ROOT / "tests"), out=str(out))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300).returncode


def _rows(idx: Index) -> np.ndarray:
    order = np.argsort(np.concatenate([s.index for s in idx.shards]))
    return np.concatenate([np.asarray(s.values) for s in idx.shards])[order]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "whole"
    assert _build_in_child(out, None) == 0
    return Index.open(out, tiny_model())


# after a shard's files, inside the shard manifest's write, inside the final manifest's write (the fit
# checkpoint's own crash points are covered by tests/persistence)
@pytest.mark.parametrize("crash", ["index_shard_written:2", "index_manifest_tmp:2", "index_meta_tmp:2"])
def test_a_kill_at_any_write_resumes_to_the_same_index(tmp_path, whole, crash):
    out = tmp_path / "idx"
    code = _build_in_child(out, crash)
    assert code == 77, f"the child was not killed at {crash}"
    with pytest.raises(ValueError, match="did not complete|holds no"):
        Index.open(out, tiny_model())
    assert _build_in_child(out, None) == 0
    idx = Index.open(out, tiny_model())
    assert np.array_equal(_rows(idx), _rows(whole))
    query = [{k: v[i:i + 2] for k, v in make_data(4, 2).items()} for i in range(0, 4, 2)]
    assert torch.equal(idx.scores(query), whole.scores(query))
