"""Top-K and streamed score matrices, in one process, in float64.

Tolerances: top-K values and the streamed matrix are copies of the same float64 numbers as the in-memory
matrix, so they must be equal exactly (the same dot products in the same order); a second pass in another
batch order recomputes the gradients in other batches (their rounding differs: 1e-12 relative).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from persist_child import make_data, tiny_model  # noqa: E402

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.attributor.topk import TopK, TopKScores, topk_of_matrix  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def reference_topk(S: torch.Tensor, k: int):
    """By Python sorting on (−value, index) and (value, index): the definition, independent of topk.py."""
    pos_i, neg_i, pos_v, neg_v = [], [], [], []
    for row in S.tolist():
        by_pos = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        by_neg = sorted(range(len(row)), key=lambda j: (row[j], j))[:k]
        pos_i.append(by_pos), neg_i.append(by_neg)
        pos_v.append([row[j] for j in by_pos]), neg_v.append([row[j] for j in by_neg])
    return (torch.tensor(pos_v, dtype=S.dtype), torch.tensor(pos_i), torch.tensor(neg_v, dtype=S.dtype),
            torch.tensor(neg_i))


def assert_topk(got: TopKScores, S: torch.Tensor, k: int, rtol: float = 0.0) -> None:
    pv, pi, nv, ni = reference_topk(S, k)
    assert torch.equal(got.positive_index, pi) and torch.equal(got.negative_index, ni)
    torch.testing.assert_close(got.positive_values, pv, rtol=rtol, atol=0)
    torch.testing.assert_close(got.negative_values, nv, rtol=rtol, atol=0)


@pytest.mark.parametrize("k", [1, 4, 30])
def test_streamed_topk_with_ties_equals_sorting_the_full_matrix(k):
    g = torch.Generator().manual_seed(3)
    S = torch.randint(-3, 4, (6, 23), generator=g).double()  # 7 distinct values: many ties
    perm = torch.randperm(23, generator=g)
    a, b = TopK(6, k), TopK(6, k)  # two "ranks", each fed its columns in shuffled blocks of uneven size
    for part, cols in ((a, perm[:9]), (b, perm[9:])):
        for chunk in cols.split(4):
            part.update(S[:, chunk], chunk)
    a.merge(b)
    got = a.result()
    assert got.k == min(k, 23) and got.n_train == 23
    assert_topk(got, S, min(k, 23))
    assert_topk(topk_of_matrix(S, k), S, min(k, 23))


def test_topk_rejects_bad_k_and_blocks():
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            TopK(3, k)
    with pytest.raises(ValueError, match=r"must be \[3, 2\]"):
        TopK(3, 2).update(torch.zeros(2, 2), torch.arange(2))


@pytest.fixture(scope="module")
def fitted():
    def batches(data, size, order=None):
        n = data["labels"].shape[0]
        order = torch.arange(n) if order is None else order
        return [{k: v[order[i:i + size]] for k, v in data.items()} for i in range(0, n, size)]

    train, query = make_data(17, 1), make_data(6, 2)
    attr = HyperINF(tiny_model(), progress=False, distributed=False).fit(batches(train, 4))
    qorder = torch.tensor([3, 0, 5, 1, 4, 2])  # rows follow the query index, not the loader order
    return attr, batches(query, 4, qorder), batches(train, 5, torch.randperm(17, generator=torch.Generator().manual_seed(1)))


def test_scores_top_k_equals_top_k_of_the_matrix(fitted):
    attr, queries, _ = fitted
    S = attr.scores(queries)
    got = attr.scores(queries, top_k=5)
    assert isinstance(got, TopKScores)
    assert_topk(got, S, 5)
    with pytest.raises(ValueError, match="top_k"):
        attr.scores(queries, top_k=0)


def test_streamed_matrix_equals_in_memory_and_loads_memory_mapped(fitted, tmp_path):
    attr, queries, shuffled_train = fitted
    S = attr.scores(queries)
    streamed = attr.scores(queries, out=tmp_path / "s")
    assert torch.equal(streamed, S)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    stored = np.load(tmp_path / "s" / meta["scores"], mmap_mode="r")  # meta.json names this run's file
    assert stored.shape == (17, 6)  # training-major: one contiguous row per training example
    assert isinstance(np.load(tmp_path / "s" / meta["scores"], mmap_mode="c"), np.memmap)
    loaded = HyperINF.load_scores(tmp_path / "s")
    assert loaded.shape == S.shape and torch.equal(loaded, S)
    assert meta["n_train"] == 17 and meta["n_query"] == 6 and meta["sign"].startswith("score[q, k]")
    # a second pass over the training set in shuffled batches writes rows out of order: same matrix
    again = attr.scores(queries, shuffled_train, out=tmp_path / "t", top_k=3)
    assert_topk(again, S, 3, rtol=1e-12)  # recomputed gradients: batch-dependent rounding
    torch.testing.assert_close(HyperINF.load_scores(tmp_path / "t"), S, rtol=1e-12, atol=0)


def test_an_unfinished_score_file_is_refused(fitted, tmp_path):
    attr, queries, _ = fitted

    def dying():
        yield from []
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        attr.scores(queries, dying(), out=tmp_path / "s")
    with pytest.raises(ValueError, match="no complete score matrix"):
        HyperINF.load_scores(tmp_path / "s")


def _probe(n_train: int) -> subprocess.Popen:
    # a fixed mmap threshold: every block over 64 KiB is mapped on allocation and unmapped on free, so
    # each call's peak is its own (glibc's adaptive threshold lets a repeat call reuse freed heap)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    return subprocess.Popen([sys.executable, "-m", "bench.memprobe_scores", "--n-train", str(n_train),
                             "--n-query", "800", "--top-k", "10"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs the Linux /proc peak-RSS reset")
def test_topk_peak_memory_does_not_grow_with_n_train():
    """Peak RSS growth of scores(top_k=10) at n_train 300 and 3000 (800 queries), in fresh processes.

    The full matrix grows by 800 × 2700 × 8 B ≈ 16 MB between the two; the top-K may grow by at most a
    quarter of that (it holds 800 × 2 × 10 values and indices whatever n_train is).  The same probe must
    see the full matrix's growth (≥ half its size), or it could not have caught a top-K that kept it.
    """
    procs = {n: _probe(n) for n in (300, 3000)}
    res = {}
    for n, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        res[n] = json.loads(out.strip().splitlines()[-1])
    matrix_growth = res[3000]["matrix_mb"] - res[300]["matrix_mb"]
    assert res[3000]["full_growth_mb"] >= 0.5 * res[3000]["matrix_mb"], res
    assert res[3000]["topk_growth_mb"] - res[300]["topk_growth_mb"] <= 0.25 * matrix_growth, res
