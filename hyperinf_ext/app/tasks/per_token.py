"""``--per-token`` of ``attribute`` and ``audit``: each kept pair's score split over its tokens.

For a causal LM an example's loss is the mean over its response tokens, so its LoRA gradient, and with it
every influence score, is a sum of per-token terms (``HyperINF.token_scores``, docs/api.md "Per-token
attribution").  Only the kept examples are run again, token by token: ``attribute`` the top-k pairs of
every query (both sides: the query's tokens and the training example's), ``audit`` its N most suspicious
training examples (the training side).  Memory is O(kept examples × their length).

Outputs: ``tokens.jsonl``, one record per pair (the examples' file lines, the score shown in the other
outputs, ``token_score`` = the score the shares sum to, and per side every token as text with its share,
``null`` for tokens the loss does not predict), and heatmap sections for ``report.html``.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .html_report import TokenHeatmap
from .token_view import token_view, views

__all__ = ["PER_TOKEN_COUNT", "check_per_token", "attribute_token_records", "audit_token_records",
           "write_tokens_jsonl", "token_heatmap", "shares_note"]

PER_TOKEN_COUNT = 20
"""``audit --per-token``: the most suspicious examples whose scores are split over their tokens."""


def check_per_token(causal: bool, model: Any, count: int | None = None) -> None:
    """``--per-token`` needs a causal LM (a classifier's label has no tokens); ``--per-token-count`` ≥ 1.

    Raises:
        ValueError: one line naming the option.
    """
    if not causal:
        raise ValueError(f"--per-token: needs a causal LM (--model smollm2 or a causal-LM folder); --model "
                         f"{model or 'minilm'} is a classifier, whose label has no tokens to split a score over")
    if count is not None and count < 1:
        raise ValueError(f"--per-token-count must be >= 1, got {count}")


def _side(view: Any) -> dict[str, Any]:
    return {"tokens": view.tokens, "shares": view.shares}


def attribute_token_records(attr: Any, query_loader: Any, train_loader: Any, kept: Any, tokenizer: Any,
                            train: Any, query: Any, mix_queries: float = 0.0,
                            mix_with: Any = None) -> list[dict[str, Any]]:
    """Per (query, kept training example) of the top-k ``kept`` (a ``TopKScores``): both sides' shares.

    ``score`` is the pair's score in attribution.jsonl, ``token_score`` the score recomputed with the
    tokens, which each side's shares sum to (equal to ``score`` up to float rounding).  ``mix_queries``:
    the scores were mixed with the GFIM of every query of ``query_loader`` (``mix_with``: their gradients
    when already computed, ``attr.query_gradients``)."""
    listed: dict[tuple[int, int], tuple[str, float]] = {}
    for side, values, index in (("harmful", kept.positive_values, kept.positive_index),
                                ("helpful", kept.negative_values, kept.negative_index)):
        for q in range(index.shape[0]):
            for v, k in zip(values[q].tolist(), index[q].tolist()):
                if 0 <= int(k) < kept.n_train:
                    listed.setdefault((q, int(k)), (side, float(v)))
    pairs = attr.token_scores(query_loader, train_loader, pairs=kept, side="both", **_mixing(mix_queries, query_loader if mix_with is None else mix_with))
    records = []
    for a in pairs:
        side, score = listed[(a.query_index, a.train_index)]
        v = views(a, tokenizer)
        records.append({"query_line": query.row(a.query_index), "train_line": train.row(a.train_index),
                        "side": side, "score": score, "token_score": float(a.score),
                        "query": _side(v["query"]), "train": _side(v["train"])})
    return records


def audit_token_records(attr: Any, train_loader: Any, target_loader: Any | None, n_target: int,
                        top: Sequence[int], scores: np.ndarray, train: Any, tokenizer: Any,
                        mix_queries: float = 0.0) -> list[dict[str, Any]]:
    """The training-side shares of the ``top`` examples (positions, rank order) of an audit.

    With a target (``target_loader``): the score is the influence on the target's MEAN loss.  It is linear
    in the query gradient (−⟨H⁻¹·mean_q ∇L_q, g_k⟩), so its token shares are the mean over the target's
    queries of the per-query token shares, and they sum to ``influence_score``.  Without one the score is
    the self-influence g_k·H⁻¹·g_k ≥ 0, the pair (k, k); ``token_scores`` follows the sign of ``scores``
    (−⟨g̃_k, g_k⟩ = −self-influence), so its shares are negated here to sum to ``self_influence``.
    ``mix_queries``: the target's GFIM was mixed into the curvature (with a target only).
    """
    top = [int(k) for k in top]
    if target_loader is not None:
        pairs = attr.token_scores(target_loader, train_loader, pairs={q: top for q in range(n_target)},
                                  side="train", **_mixing(mix_queries, target_loader))
        by_k: dict[int, list[Any]] = {}
        for a in pairs:
            by_k.setdefault(a.train_index, []).append(a)
        averaged = {}
        for k, group in by_k.items():
            shares = torch.stack([a.train.shares.double() for a in group]).mean(0)
            score = float(np.mean([a.score for a in group]))
            averaged[k] = replace(group[0], query_index=-1, score=score, train=replace(group[0].train, shares=shares))
        against = f"the mean loss of the {n_target} target examples"
    else:
        pairs = attr.token_scores(train_loader, train_loader, pairs=[(k, k) for k in top], side="train")
        # token_scores: −⟨g̃_k, g_k⟩ (the sign of scores); self-influence is +g_k·H⁻¹·g_k
        averaged = {a.train_index: replace(a, score=-a.score, train=replace(a.train, shares=-a.train.shares))
                    for a in pairs}
        against = "itself (self-influence)"
    records = []
    for rank, k in enumerate(top):
        a = averaged[k]
        records.append({"rank": rank + 1, "train_line": train.row(k), "against": against, "score": float(scores[k]),
                        "token_score": float(a.score), "train": _side(token_view(a, tokenizer, "train"))})
    return records


def _mixing(mix_queries: float, queries: Any) -> dict[str, Any]:
    """``token_scores``' mixing arguments: the whole query set is the one whose GFIM was mixed in."""
    return {"mix_queries": float(mix_queries), "mix_with": queries} if mix_queries else {}


def write_tokens_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """``tokens.jsonl``: one JSON object per pair (UTF-8, non-ASCII kept)."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def shares_note(records: Sequence[dict[str, Any]]) -> str:
    """How closely the shares add up to the scores shown (float rounding of the per-token passes)."""
    worst = 0.0
    for rec in records:
        for side in ("train", "query"):
            if side in rec:
                shares = [s for s in rec[side]["shares"] if s is not None]
                top = max((abs(s) for s in shares), default=0.0)
                worst = max(worst, abs(sum(shares) - rec["token_score"]) / top if top else 0.0)
    return (f"Each example's shares sum to its score (largest difference {worst:.1e} of the largest share: "
            "float rounding of the per-token backward passes); prompt and template tokens, which the loss does "
            "not predict, have no share.")


def token_heatmap(title: str, items: Sequence[tuple[str, dict[str, Any]]], note: str = "") -> TokenHeatmap:
    """A heatmap of ``(label, {"tokens", "shares"})`` items; unscored tokens (prompt, template) are drawn blank."""
    return TokenHeatmap(title, [(label, side["tokens"], [0.0 if s is None else s for s in side["shares"]])
                                for label, side in items], note=note)
