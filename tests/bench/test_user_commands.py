"""bench/user_commands.py's reading of an audit's outputs: the per-column metrics of the combined signal's parts
are those of the ranked file's columns against the planted lines (exact: the same float64 arithmetic)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from bench import user_commands as uc
from hyperinf_ext.app.tasks.metrics import found_at, rank_average, roc_auc


def test_column_metrics_read_every_score_column(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    texts = [f"review {i}" for i in range(n)]
    train = tmp_path / "train.csv"
    with open(train, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([t, "pos"] for t in texts)
    flipped = [2 + i for i in range(0, n, 5)]  # file lines (the header is line 1)
    influence, self_ = rng.normal(size=n), rng.normal(size=n)
    influence[[line - 2 for line in flipped]] += 1.5
    combined = rank_average(influence, self_)
    order = np.argsort(-combined, kind="stable")
    out = tmp_path / "out"
    out.mkdir()
    ranked = out / "ranked.csv"
    with open(ranked, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "rank", "influence_score", "self_influence", "combined_score"])
        w.writerows([texts[i], "pos", r + 1, repr(float(influence[i])), repr(float(self_[i])), repr(float(combined[i]))]
                    for r, i in enumerate(order))
    columns = ["influence_score", "self_influence", "combined_score"]
    (out / "summary.json").write_text(json.dumps({"signal": "combined_score", "columns": columns, "train": str(train),
                                                  "outputs": {"ranked": str(ranked)}}))
    got = uc.column_metrics(out, flipped)
    planted = np.isin(np.arange(n) + 2, flipped)
    for column, values in zip(columns, (influence, self_, combined)):
        assert got[column]["auc"] == pytest.approx(roc_auc(values, planted), abs=1e-12)
        assert got[column]["found_at_10"] == pytest.approx(found_at(values, planted, 0.1), abs=1e-12)
    assert got["influence_score"]["auc"] > 0.8 > got["self_influence"]["auc"]  # the planted rows stand out in one
