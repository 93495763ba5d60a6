"""What the LDS of bench/lds.py is worth (issue #25): noise ceiling, shared-structure baselines, margin,
pooled paired intervals over seeds, and the pre-registered default on its reporting seeds.

* Noise ceiling.  Subset models retrained on the same members with other training seeds
  (``--retrain-seeds``): per query, the Spearman correlation across subsets between the losses of two
  retrains (test-retest), averaged over retrain pairs and queries, with a bootstrap interval over subsets
  and queries.  Under "measured = expected + independent noise", a perfect predictor of the expected
  loss reaches about √ρ against one retrain and √ρ_R against the mean of R retrains, ρ_R = Rρ/(1+(R−1)ρ)
  (Spearman–Brown; a normal-theory guide, not a bound).  Every method's LDS is also computed against
  the retrain-AVERAGED losses.
* Shared structure.  Losses of one subset model move together across queries (a subset that trains
  better lowers every loss).  Baselines that know only that: the query-averaged prediction (a method's
  predicted [M, Q] averaged over queries, used for every query), the same-label member count (for a
  query of label y, minus the number of the subset's members labelled y) and, as an oracle of the shared
  part, the subset's measured mean loss over the other queries.  Mean-removed LDS subtracts each subset's
  mean loss over queries from the measured losses before the per-query Spearman (what is left is
  query-specific); "both centred" subtracts the prediction's subset mean too.
* Margin (the LLM): the per-query answer margin log p(correct) − log p(wrong) (a subset record's
  "val_margin"); the prediction is of the loss, which the margin moves against, so LDS on margin is the
  Spearman of the prediction with −margin.  On the 2-class classifier the cross-entropy is a decreasing
  function of the logit margin, so there LDS on margin equals LDS on loss and is not reported.
* Pooled paired intervals: the difference of two methods' LDS on the same models, resampling subsets and
  queries within each seed (the same draw for both methods) and averaging the per-seed differences over
  seeds; two-sided 95% percentile interval and a two-sided bootstrap p.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bench.lds import matrices, split_labels, subset_members, subset_table
from hyperinf_ext.app.tasks.metrics import bootstrap_ci, column_spearman, lds

LEVEL = 0.95
MIN_CEILING_SUBSETS = 8
"""Leading subsets every retrain must cover before a seed's ceiling is shown: a Spearman across fewer subsets
is mostly noise (across 2 it is ±1); a run still filling it is reported as in progress."""
SplitFn = Callable[[dict], tuple[np.ndarray, np.ndarray]]


# ------------------------------------------------------------------------------ statistics


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def retest_per_query(losses: np.ndarray) -> np.ndarray:
    """``losses`` [R ≥ 2, M, Q] (retrain, subset, query) → [Q]: per query, the Spearman correlation across
    subsets between two retrains' losses, averaged over the R(R−1)/2 pairs."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 3 or losses.shape[0] < 2 or losses.shape[1] < 2:
        raise ValueError(f"retest_correlation: needs [retrains >= 2, subsets >= 2, queries], got {losses.shape}")
    pairs = [column_spearman(losses[a], losses[b]) for a in range(len(losses)) for b in range(a + 1, len(losses))]
    with np.errstate(invalid="ignore"):
        stacked = np.vstack(pairs)
        ok = np.isfinite(stacked).any(axis=0)
        out = np.full(stacked.shape[1], np.nan)
        out[ok] = np.nanmean(stacked[:, ok], axis=0)
    return out


def retest_correlation(losses: np.ndarray) -> float:
    """Test-retest correlation averaged over queries (see :func:`retest_per_query`)."""
    return _nanmean(retest_per_query(losses))


def retest_interval(losses: np.ndarray, *, n_boot: int = 1000, level: float = LEVEL, seed: int = 0
                         ) -> tuple[float, float]:
    """Bootstrap interval of :func:`retest_correlation`, resampling subsets and queries."""
    losses = np.asarray(losses, dtype=np.float64)
    return bootstrap_ci(lambda s, q: retest_correlation(losses[:, s][:, :, q]), losses.shape[1:], n_boot=n_boot,
                        level=level, seed=seed)


def spearman_brown(rho: float, r: int) -> float:
    """Reliability of the mean of ``r`` retrains from the single-retrain reliability ``rho``."""
    return r * rho / (1 + (r - 1) * rho) if math.isfinite(rho) and 1 + (r - 1) * rho > 0 else float("nan")


def query_averaged(predicted: np.ndarray) -> np.ndarray:
    """Each subset's prediction averaged over queries, the same for every query: [M, Q] → [M, Q]."""
    p = np.asarray(predicted, dtype=np.float64)
    return np.repeat(p.mean(axis=1, keepdims=True), p.shape[1], axis=1)


def zscore_columns(a: np.ndarray) -> np.ndarray:
    """Each query's column standardised across subsets (mean 0, SD 1; a constant column stays 0)."""
    a = np.asarray(a, dtype=np.float64)
    c = a - a.mean(axis=0)
    sd = c.std(axis=0)
    return c / np.where(sd > 0, sd, 1.0)


def _group_means(a: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Per (subset, query): the subset's mean of ``a`` over the queries of the same group (all queries
    when ``groups`` is None)."""
    if groups is None:
        return np.repeat(a.mean(axis=1, keepdims=True), a.shape[1], axis=1)
    groups = np.asarray(groups)
    out = np.empty_like(a)
    for g in np.unique(groups):
        cols = groups == g
        out[:, cols] = a[:, cols].mean(axis=1, keepdims=True)
    return out


def mean_removed(measured: np.ndarray, *, standardize: bool = False, groups: np.ndarray | None = None) -> np.ndarray:
    """Each subset's (row's) mean over queries subtracted from the measured values: the query-specific part.

    ``standardize``: first z-score every query's column across subsets, so every query weighs alike in the
    mean (raw losses: a few high-loss queries dominate it, and a query with small losses then correlates
    with minus the others' mean).  ``groups`` [Q]: subtract the mean over the queries of the same group
    (e.g. the same label) instead of over all queries."""
    m = np.asarray(measured, dtype=np.float64)
    if standardize:
        m = zscore_columns(m)
    return m - _group_means(m, groups)


def label_averaged(predicted: np.ndarray, val_labels: np.ndarray) -> np.ndarray:
    """Each subset's prediction averaged over the queries of the same label, used for each of them."""
    return _group_means(np.asarray(predicted, dtype=np.float64), np.asarray(val_labels))


def loo_subset_mean(measured: np.ndarray, *, standardize: bool = True, groups: np.ndarray | None = None
                    ) -> np.ndarray:
    """Per (subset, query): the subset's mean measured value over the OTHER queries (of the same group when
    ``groups`` is given; z-scored per query first when ``standardize``): an oracle of the shared part that
    never sees the query itself."""
    m = zscore_columns(measured) if standardize else np.asarray(measured, dtype=np.float64)
    if m.shape[1] < 2:
        raise ValueError("loo_subset_mean: needs >= 2 queries")
    g = np.zeros(m.shape[1], dtype=int) if groups is None else np.asarray(groups)
    out = np.zeros_like(m)
    for v in np.unique(g):
        cols = g == v
        n = int(cols.sum())
        if n > 1:
            out[:, cols] = (m[:, cols].sum(axis=1, keepdims=True) - m[:, cols]) / (n - 1)
    return out


def same_label_prediction(members: Sequence[np.ndarray], train_labels: np.ndarray, val_labels: np.ndarray
                          ) -> np.ndarray:
    """[M, Q]: minus the number of subset members whose label is the query's (more same-label training
    examples → lower loss; the sign of a prediction of the loss)."""
    train_labels, val_labels = np.asarray(train_labels), np.asarray(val_labels)
    classes = np.unique(np.concatenate([train_labels, val_labels]))
    counts = np.stack([[np.sum(train_labels[m] == c) for c in classes] for m in members]).astype(np.float64)
    col = np.searchsorted(classes, val_labels)
    return -counts[:, col]


def pooled_paired(items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *, n_boot: int = 1000,
                  level: float = LEVEL, seed: int = 0) -> dict:
    """Pooled paired difference LDS(a) − LDS(b) over seeds.

    ``items``: per seed (a, b, measured), all [M_s, Q_s] (M_s, Q_s may differ between seeds).  Each
    resample draws, within every seed, subsets and queries with replacement (one draw for both methods)
    and averages the per-seed differences over seeds.  Returns {"diff" (the mean of the per-seed
    differences), "lo", "hi" (two-sided ``level`` percentile interval), "p" (two-sided bootstrap p:
    twice the smaller share of resamples on either side of 0, at least 1/(n_boot+1)), "per_seed": [...]}.
    """
    if not items:
        raise ValueError("pooled_paired: no seeds")
    per_seed = [lds(a, m) - lds(b, m) for a, b, m in items]
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for k in range(n_boot):
        d = []
        for a, b, m in items:
            s = rng.integers(0, a.shape[0], size=a.shape[0])
            q = rng.integers(0, a.shape[1], size=a.shape[1])
            ix = np.ix_(s, q)
            d.append(_nanmean(column_spearman(a[ix], m[ix])) - _nanmean(column_spearman(b[ix], m[ix])))
        vals[k] = np.mean(d)
    vals = vals[np.isfinite(vals)]
    diff = float(np.mean(per_seed))
    if vals.size == 0:
        return {"diff": diff, "lo": float("nan"), "hi": float("nan"), "p": float("nan"), "per_seed": per_seed}
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    p = min(1.0, 2 * min(np.mean(vals <= 0), np.mean(vals >= 0)))
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "p": max(p, 1 / (vals.size + 1)), "per_seed": per_seed}


# ------------------------------------------------------------------------------ records → matrices


def retrain_losses(records: Sequence[Mapping], key: dict, field: str = "val_loss"
                   ) -> tuple[list[int], list[int], np.ndarray] | None:
    """(retrains, leading subsets, ``field`` [R, M, Q]) of one seed: every retrain recorded for at least two
    subsets, over the leading subsets 0..M−1 that have all of them (None when R < 2 or M < 2)."""
    ids = sorted({int(r.get("retrain", 0)) for r in records if r["kind"] == "subset" and r["config"] == key
                  and r.get(field) is not None})
    tables = {t: subset_table(list(records), key, field, t) for t in ids}
    ids = [t for t in ids if len(tables[t]) >= 2]
    if len(ids) < 2:
        return None
    m = 0
    while all(m in tables[t] for t in ids):
        m += 1
    if m < 2:
        return None
    return ids, list(range(m)), np.asarray([[tables[t][j] for j in range(m)] for t in ids], dtype=np.float64)


def _interval(p: np.ndarray, m: np.ndarray, n_boot: int) -> tuple[float, float]:
    return bootstrap_ci(lambda s, q: lds(p[np.ix_(s, q)], m[np.ix_(s, q)]), p.shape, n_boot=n_boot, level=LEVEL,
                        seed=0)


def _f(x: float, sign: bool = False) -> str:
    return "—" if x is None or not math.isfinite(x) else (f"{x:+.3f}" if sign else f"{x:.3f}")


def _ci(v: float, lo: float, hi: float) -> str:
    return f"{_f(v)} [{_f(lo)}, {_f(hi)}]"


def _configs(records: Sequence[Mapping]) -> list[dict]:
    keys: list[dict] = []
    for r in records:
        if r["kind"] in ("subset", "scores") and r["config"] not in keys:
            keys.append(r["config"])
    return keys


def _present(records: Sequence[Mapping], key: dict, labels: Sequence[str], n_subsets: int | None,
             **kw) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for label in labels:
        pm = matrices(list(records), key, label, n_subsets, **kw)
        if pm is not None:
            out[label] = pm
    return out


def _runs_command(key: dict, extra: str) -> str:
    model = " --model smollm2" if key.get("model") else ""
    return f"python -m bench.lds{model} --seeds {key['seed']}{extra}"


def _seconds_per_subset(records: Sequence[Mapping], key: dict) -> float:
    secs = [r["seconds"] for r in records if r["kind"] == "subset" and r["config"] == key and "seconds" in r]
    return statistics.mean(secs) if secs else float("nan")


# ------------------------------------------------------------------------------ sections


def ceiling_section(records: Sequence[Mapping], labels: Sequence[str], n_subsets: int | None, n_boot: int,
                    field: str = "val_loss", ref: str | None = None) -> list[str]:
    """Test-retest of the retrained subset models per seed, and every method's LDS against each retrain and
    against the retrain mean; with ``ref``, also ``ref`` − method against the retrain mean (paired, as in
    :func:`pooled_paired` on that one seed): the comparison with the least retraining noise in it."""
    what = "loss" if field == "val_loss" else "margin"
    lines = [f"## Noise ceiling: subset models retrained ({what})", "",
             "Each subset model retrained on the same members from the same initial adapter with other training "
             "seeds (loader shuffle and dropout; bench/lds.py `--retrain-seeds`). Test-retest = per query, the "
             "Spearman correlation across subsets between two retrains' losses, averaged over retrain pairs and "
             f"queries ({int(LEVEL * 100)}% bootstrap over subsets and queries). √ρ and √ρ_R (Spearman–Brown, R "
             "retrains averaged) are what a perfect predictor of the expected loss would reach under "
             "independent noise: a guide, not a bound."
             + (f" The last column: {ref} − method against the retrain mean, paired bootstrap over subsets and "
                "queries." if ref else ""), ""]
    found = False
    for key in _configs(records):
        rl = retrain_losses(records, key, field)
        if rl is None:
            continue
        found = True
        ids, subs, L = rl
        if len(subs) < MIN_CEILING_SUBSETS:
            lines += [f"### Seed {key['seed']}: in progress", "",
                      f"Retrains {', '.join(map(str, ids))} cover the leading {len(subs)} subsets; the ceiling is "
                      f"shown from {MIN_CEILING_SUBSETS}. The command that completes it:", "", "```",
                      fill_command(records, key), "```", ""]
            continue
        if field != "val_loss":
            L = -L  # the prediction is of the loss; the margin moves against it
        per_q = retest_per_query(L)
        rho = _nanmean(per_q)
        lo, hi = retest_interval(L, n_boot=n_boot)
        R = len(ids)
        lines += [f"### Seed {key['seed']}: {R} retrains ({', '.join(map(str, ids))}) × {len(subs)} subsets × "
                  f"{L.shape[2]} queries", "",
                  f"- test-retest ρ = {_ci(rho, lo, hi)}; per-query SD {np.nanstd(per_q):.3f}, "
                  f"range {np.nanmin(per_q):.3f} … {np.nanmax(per_q):.3f}",
                  f"- ceiling guide: √ρ = {_f(math.sqrt(rho) if rho > 0 else float('nan'))} against one retrain; "
                  f"√ρ_{R} = {_f(math.sqrt(spearman_brown(rho, R)) if rho > 0 else float('nan'))} against the "
                  f"mean of {R}", "",
                  "| method | LDS vs retrain 0 (these subsets) | LDS vs each retrain | LDS vs the retrain mean "
                  f"[{int(LEVEL * 100)}% interval] |" + (f" {ref} − method, vs the retrain mean [interval] |"
                                                         if ref else ""),
                  "|---|---|---|---|" + ("---|" if ref else "")]
        avg = L.mean(axis=0)
        present = _present(records, key, labels, n_subsets)
        p_ref = present[ref][0] if ref in present else None
        for label, (p, _) in present.items():
            k = min(p.shape[0], len(subs))
            if k < 2:
                continue
            each = [lds(p[:k], L[i, :k]) for i in range(R)]
            a_lo, a_hi = _interval(p[:k], avg[:k], n_boot)
            row = (f"| {label} | {_f(each[0])} | {', '.join(_f(v) for v in each)} | "
                   f"{_ci(lds(p[:k], avg[:k]), a_lo, a_hi)} |")
            if ref:
                kk = min(k, p_ref.shape[0]) if p_ref is not None else 0
                if label == ref or kk < 2:
                    row += " — |"
                else:
                    d = pooled_paired([(p_ref[:kk], p[:kk], avg[:kk])], n_boot=n_boot)
                    row += f" {_f(d['diff'], True)} [{_f(d['lo'], True)}, {_f(d['hi'], True)}] |"
            lines.append(row)
        lines.append("")
    if not found:
        lines += [f"No seed has retrained subset models{'' if what == 'loss' else ' with margins'} yet. Fill it with "
                  "(16 subsets × retrains 0, 1, 2; the models already recorded are kept):", "", "```"]
        for key in _configs(records)[:1]:
            lines.append(fill_command(records, key))
        lines += ["```", ""]
    return lines


def fill_command(records: Sequence[Mapping], key: dict, subsets: int = 16, retrains: Sequence[int] = (0, 1, 2)) -> str:
    """The command that adds the noise-ceiling models to seed ``key``, with its time from the records."""
    have = {(r["subset"], int(r.get("retrain", 0))) for r in records if r["kind"] == "subset" and r["config"] == key}
    missing = sum((j, t) not in have for j in range(subsets) for t in retrains)
    sec = _seconds_per_subset(records, key)
    scored = [r["n_subsets"] for r in records if r["kind"] == "scores" and r["config"] == key]
    rescore = " + the full model and score sets again (more subsets than scored)" if scored and max(scored) < subsets else ""
    cost = f", about {missing * sec / 60:.0f} min at {sec:.0f} s each" if math.isfinite(sec) else ""
    return (f"{_runs_command(key, f' --subsets {subsets} --retrain-seeds ' + ','.join(map(str, retrains)))}"
            f"   # {missing} models{cost}{rescore}")


def _labels_for(records: Sequence[Mapping], key: dict, split: SplitFn | None) -> tuple[tuple | None, str]:
    labs = split_labels(list(records), key)
    if labs is not None:
        return labs, "split record"
    if split is None:
        return None, f"no split record: `{_runs_command(key, ' --split-only')}`"
    try:
        return split(key), "split rebuilt from the config"
    except Exception as exc:  # noqa: BLE001 - a report never fails on a baseline
        return None, f"could not rebuild the split ({type(exc).__name__})"


def shared_section(records: Sequence[Mapping], labels: Sequence[str], n_subsets: int | None, n_boot: int,
                   ref: str | None, split: SplitFn | None = None, field: str = "val_loss",
                   retrain: int = 0) -> list[str]:
    """Baselines that know only the shared structure, and every method's mean-removed LDS, per seed."""
    what = "loss" if field == "val_loss" else "margin"
    lines = [f"## Shared structure: baselines and mean-removed LDS ({what})", "",
             "A subset that trains better moves every query's loss, so part of an LDS can be which subsets train "
             "better rather than which examples matter for which query. Columns: *query-averaged* = the method's "
             "prediction averaged over all queries, used for every query; *label-averaged* = averaged over the "
             f"queries of the same label. *Mean-removed*: each subset's mean {what} over queries subtracted from "
             "the measured values before the per-query Spearman, on the raw values (as issue #25 states it; a few "
             "high-loss queries dominate that mean) and on per-query z-scores (every query weighs alike); "
             "*within label*: the mean over the queries of the same label (z-scores). Baseline rows: the same-label "
             "member count (for a query labelled y, minus the subset's members labelled y) and an oracle of the "
             "shared part: the subset's measured mean (z-scores) over the other queries, all or of the same label."
             + ("" if field == "val_loss" else " Margin: correlated with −margin (the prediction is of the loss)."),
             ""]
    found = False
    for key in _configs(records):
        mats = _present(records, key, labels, n_subsets, field=field, retrain=retrain)
        if not mats:
            continue
        found = True
        sign = 1.0 if field == "val_loss" else -1.0
        M = max(p.shape[0] for p, _ in mats.values())
        table = subset_table(list(records), key, field, retrain)
        m_full = sign * np.asarray([table[j] for j in range(M)], dtype=np.float64)
        Q = m_full.shape[1]
        labs, source = _labels_for(records, key, split)
        vl = None if labs is None else np.asarray(labs[1])
        lines += [f"### Seed {key['seed']}: {M} subsets × {Q} queries" + (f" (retrain {retrain})" if retrain else "")
                  + ("" if labs is not None else f"; label columns: {source}"), "",
                  "| method | LDS | query-averaged | label-averaged | mean-removed (raw) | mean-removed (z) | "
                  "within label (z) |", "|---|---|---|---|---|---|---|"]

        def variants(p: np.ndarray, m: np.ndarray, own: bool = True) -> list[float]:
            return [lds(p, m),
                    lds(query_averaged(p), m) if own else float("nan"),
                    lds(label_averaged(p, vl), m) if own and vl is not None else float("nan"),
                    lds(p, mean_removed(m)),
                    lds(p, mean_removed(m, standardize=True)),
                    lds(p, mean_removed(m, standardize=True, groups=vl)) if vl is not None else float("nan")]

        for label, (p, m) in mats.items():
            v = variants(p, sign * m)
            lines.append(f"| {label}{' (default)' if label == ref else ''} | " + " | ".join(_f(x) for x in v) + " |")
        if labs is not None:
            members = [subset_members(key["n_train"], key["fraction"], key["seed"], j) for j in range(M)]
            sl = same_label_prediction(members, labs[0], vl)
            lines.append(f"| same-label member count ({source}) | "
                         + " | ".join(_f(x) for x in variants(sl, m_full, own=False)) + " |")
        oracle = loo_subset_mean(m_full)
        lines.append("| oracle: subset mean (z) over the other queries | "
                     + " | ".join(_f(x) for x in variants(oracle, m_full, own=False)[:1]) + " | — | — | — | — | — |")
        if vl is not None:
            lo_l = loo_subset_mean(m_full, groups=vl)
            lines.append("| oracle: subset mean (z) over the other queries of the same label | "
                         + _f(lds(lo_l, m_full)) + " | — | — | — | — | — |")
        lines.append("")
        # intervals for the reference method and the baselines (subsets and queries resampled)
        rows = []
        if ref in mats:
            p, m = mats[ref]
            m = sign * m
            rows += [(f"{ref}: LDS", p, m), (f"{ref}: query-averaged", query_averaged(p), m),
                     (f"{ref}: mean-removed (z)", p, mean_removed(m, standardize=True))]
            if vl is not None:
                rows.append((f"{ref}: within label (z)", p, mean_removed(m, standardize=True, groups=vl)))
        if labs is not None:
            rows.append(("same-label member count: LDS", sl, m_full))
        rows.append(("oracle subset mean (z): LDS", oracle, m_full))
        lines.append(f"{int(LEVEL * 100)}% intervals (subsets and queries resampled): "
                     + "; ".join(f"{name} {_ci(lds(a, b), *_interval(a, b, n_boot))}" for name, a, b in rows) + ".")
        lines.append("")
    if not found:
        lines += ["No score sets to compare yet.", ""]
    return lines


def margin_section(records: Sequence[Mapping], labels: Sequence[str], n_subsets: int | None, n_boot: int,
                   ref: str | None, split: SplitFn | None = None) -> list[str]:
    """LDS on the answer margin where the subset records hold one (the LLM)."""
    keys = [k for k in _configs(records)
            if any(r["kind"] == "subset" and r["config"] == k and r.get("val_margin") is not None for r in records)]
    if not keys:
        key = next(iter(_configs(records)), None)
        lines = ["## Margin (log p(correct answer) − log p(wrong answer))", "",
                 "No subset model has a recorded margin yet: the models measured before issue #25 recorded the "
                 "loss only. Every model measured since records `val_margin`; the retrains fill this section:", ""]
        if key is not None:
            lines += ["```", fill_command(records, key), "```", ""]
        return lines
    out: list[str] = []
    for key in keys:
        # the lowest retrain with margins on at least 2 leading subsets: its models' loss and margin side by side
        retrains = sorted({int(r.get("retrain", 0)) for r in records if r["kind"] == "subset" and r["config"] == key
                           and r.get("val_margin") is not None})
        for t in retrains:
            mats = _present(records, key, labels, n_subsets, field="val_margin", retrain=t)
            if mats:
                sub = [r for r in records if r["config"] == key]
                out += shared_section(sub, labels, n_subsets, n_boot, ref, split, field="val_margin", retrain=t)
                loss = _present(records, key, labels, n_subsets, field="val_loss", retrain=t)
                out += [f"LDS on loss vs on margin, the same models (seed {key['seed']}, retrain {t}):", "",
                        "| method | LDS on loss | LDS on −margin |", "|---|---|---|"]
                for label, (p, m) in mats.items():
                    k = min(p.shape[0], loss[label][0].shape[0]) if label in loss else 0
                    l_txt = _f(lds(loss[label][0][:k], loss[label][1][:k])) if k >= 2 else "—"
                    out.append(f"| {label} | {l_txt} | {_f(lds(p, -m))} |")
                out.append("")
                break
    out += ceiling_section(records, labels, n_subsets, n_boot, field="val_margin", ref=ref)
    return out


def pooled_section(records: Sequence[Mapping], labels: Sequence[str], n_subsets: int | None, n_boot: int,
                   ref: str | None, seeds: Sequence[int] | None = None, title: str | None = None) -> list[str]:
    """``ref`` − every other label, pooled over ``seeds`` (default: every seed with both)."""
    keys = [k for k in _configs(records) if seeds is None or k["seed"] in seeds]
    mats = {k["seed"]: _present(records, k, labels, n_subsets) for k in keys}
    mats = {s: v for s, v in mats.items() if ref in v}
    lines = [title or f"## Pooled paired differences over seeds: {ref} − method", "",
             "Difference of LDS on the same models; bootstrap over subsets and queries within each seed (one draw "
             "for both methods), the per-seed differences averaged over seeds; two-sided "
             f"{int(LEVEL * 100)}% percentile interval, two-sided bootstrap p ({n_boot} resamples). The seeds move "
             "the data split, the models and the queries, so the mean over seeds is over splits too.", ""]
    if not mats or ref is None:
        return lines + ["No seed has the reference method scored yet.", ""]
    seeds_used = sorted(mats)
    lines += [f"Seeds: {', '.join(map(str, seeds_used))}.", "",
              f"| method | mean LDS | {ref} − method, pooled [{int(LEVEL * 100)}% interval] | p | per seed |",
              "|---|---|---|---|---|"]
    for label in labels:
        if label == ref or not all(label in mats[s] for s in seeds_used):
            continue
        items = []
        for s in seeds_used:
            (a, m), (b, _) = mats[s][ref], mats[s][label]
            k = min(a.shape[0], b.shape[0])
            items.append((a[:k], b[:k], m[:k]))
        res = pooled_paired(items, n_boot=n_boot)
        mean_l = statistics.mean(lds(b, m) for _, b, m in items)
        lines.append(f"| {label} | {_f(mean_l)} | {_f(res['diff'], True)} [{_f(res['lo'], True)}, "
                     f"{_f(res['hi'], True)}] | {res['p']:.3f} | " + ", ".join(_f(d, True) for d in res["per_seed"])
                     + " |")
    lines.append("")
    return lines


def rule_section(records: Sequence[Mapping], labels: Sequence[str], n_subsets: int | None, n_boot: int,
                 classifier_records: Sequence[Mapping] | None = None, quality: tuple | None = None) -> list[str]:
    """The pre-registered choice (bench/defaults_rule.py) on the selection seeds, reported on the reporting
    seeds only.  ``quality``: (detection runs, bench.quality.CANDIDATES); default: read
    bench/quality_runs.jsonl."""
    from bench import defaults_rule as rule
    from bench.lds_report import default_label

    study = rule.study_of(records)
    sel, rep = rule.SELECTION_SEEDS[study], rule.REPORTING_SEEDS[study]
    lines = ["## Pre-registered default and tuned peers (bench/defaults_rule.py)", "",
             f"Frozen rule (its docstring is the pre-registration): selection seeds {', '.join(map(str, sel))}, "
             f"reporting seeds {', '.join(map(str, rep))} of this study. The default damping of hyperinf "
             "maximises LDS / best + (AUC − ½) / (best − ½) on the classifier's selection seeds and the detection "
             "study's seed-0/1 configurations (scale-free rules only); every peer gets the setting with the best "
             "mean LDS on this study's selection seeds. Amendment 1 of the rule replaced this choice with one "
             "from both studies (LDS, validation and self detection) and added the query-side option and the "
             "signal (amendment 2): bench/DEFAULTS.md (`python -m bench.defaults_report`).", ""]
    cls_records = classifier_records if classifier_records is not None else records
    if quality is None:
        try:
            from bench.quality import CANDIDATES as QC, HERE, load_runs

            quality = (load_runs(HERE / "quality_runs.jsonl"), QC)
        except Exception:  # noqa: BLE001 - the detection records are optional here
            quality = ([], [])
    choice = rule.choose_default(cls_records, *quality)
    if choice.setting is None:
        lines += ["No choice yet: the classifier's selection seeds "
                  f"({', '.join(map(str, rule.SELECTION_SEEDS['minilm']))}) and the detection study must both "
                  "have the hyperinf dampings.", ""]
        return lines
    lib = default_label()
    lines += ["| hyperinf damping | mean LDS (selection) | mean AUC (detection, seeds 0–1) | score | eligible |",
              "|---|---|---|---|---|"]
    for c in sorted(choice.lds, key=rule.Setting.sort_key):
        if c not in choice.auc:
            continue
        lines.append(f"| {c}{' **(chosen)**' if c == choice.setting else ''} | {_f(choice.lds[c])} | "
                     f"{_f(choice.auc[c])} | {_f(choice.score.get(c, float('nan')))} | "
                     f"{'yes' if c in choice.eligible else 'no (units)'} |")
    lines += ["", f"Chosen: **{choice.setting}**; the library's default today: {lib or '(not a candidate)'}.", ""]
    peers = rule.tune_peers(records, study)
    if peers:
        lines += ["Peers tuned on this study's selection seeds (mean LDS there):", "",
                  "| method | setting chosen | mean LDS (selection) |", "|---|---|---|"]
        for method, (c, v) in peers.items():
            lines.append(f"| {'hyperinf, tuned on LDS alone' if method == rule.DEFAULT_METHOD else method} | {c} | "
                         f"{_f(v)} |")
        lines.append("")
    return lines + reported_lines(records, choice.setting, peers, n_subsets, n_boot)


def reported_lines(records: Sequence[Mapping], setting: Any, peers: Mapping[str, tuple], n_subsets: int | None,
                   n_boot: int, name: str = "default", heading: str | None = None) -> list[str]:
    """``setting`` (a bench.defaults_rule.Setting) against every tuned peer ({method: (Setting, ...)}) on
    the study's REPORTING seeds only: per-seed LDS and pooled paired intervals; or the command that
    measures those seeds when they are missing.  ``heading``: the table's title (default: the seeds)."""
    from bench import defaults_rule as rule

    rep = rule.REPORTING_SEEDS[rule.study_of(records)]
    lines: list[str] = []
    keys = {k["seed"]: k for k in _configs(records) if k["seed"] in rep}
    ref_mats = {s: matrices(list(records), keys[s], rule.label_for(records, s, setting), n_subsets)
                for s in keys if rule.label_for(records, s, setting) is not None}
    have = [s for s in rep if ref_mats.get(s) is not None]
    if keys and not have:
        lines += [f"The reporting seeds {', '.join(map(str, sorted(keys)))} have subset models but no score set of "
                  f"the chosen setting ({setting}): rerun them with the current grid (bench/lds.py).", ""]
        return lines
    if not have:
        key = next(iter(_configs(records)), {"seed": rep[0]})
        m = _seconds_per_subset(records, key)
        n = 16 if key.get("model") else 32
        cost = (f"   # {len(rep) * n} subset models, about {len(rep) * n * m / 3600:.1f} h at {m:.0f} s each, plus "
                "the full model and score sets per seed" if math.isfinite(m) else "")
        lines += [f"The reporting seeds ({', '.join(map(str, rep))}) are not measured yet:", "", "```",
                  f"python -m bench.lds{' --model smollm2' if key.get('model') else ''} "
                  f"--seeds {','.join(map(str, rep))}{cost}", "```", ""]
        return lines
    # the reported result: the chosen default vs every tuned peer, on the reporting seeds only
    lines += [heading or f"### Reported on seeds {', '.join(map(str, have))} (not used by the rule)", "",
              f"| method | setting | LDS per seed | default − method, pooled [{int(LEVEL * 100)}% interval] | p |",
              "|---|---|---|---|---|",
              f"| {name} | {setting} | " + ", ".join(_f(lds(*ref_mats[s])) for s in have) + " | — | — |"]
    for method, (c, _) in peers.items():
        items = []
        for s in have:
            lab = rule.label_for(records, s, c)
            b = matrices(list(records), keys[s], lab, n_subsets) if lab else None
            if b is None:
                break
            (pa, m), pb = ref_mats[s], b[0]
            k = min(pa.shape[0], pb.shape[0])
            items.append((pa[:k], pb[:k], m[:k]))
        peer = "hyperinf, tuned on LDS alone" if method == rule.DEFAULT_METHOD else method
        if len(items) != len(have):
            lines.append(f"| {peer} | {c} | not scored on every reporting seed | — | — |")
            continue
        res = pooled_paired(items, n_boot=n_boot)
        lines.append(f"| {peer} | {c} | {', '.join(_f(lds(pb, m)) for _, pb, m in items)} | {_f(res['diff'], True)} "
                     f"[{_f(res['lo'], True)}, {_f(res['hi'], True)}] | {res['p']:.3f} |")
    lines.append("")
    return lines


def sections(records: Sequence[Mapping], labels: Sequence[str], *, n_subsets: int | None = None,
             n_boot: int = 1000, ref: str | None = None, split: SplitFn | None = None,
             classifier_records: Sequence[Mapping] | None = None, rule: bool = True,
             quality: tuple | None = None) -> list[str]:
    """Every issue-#25 section, as Markdown lines (sections without data say what command fills them)."""
    llm = any(r["config"].get("model") for r in records)
    out = ceiling_section(records, labels, n_subsets, n_boot, ref=ref)
    out += shared_section(records, labels, n_subsets, n_boot, ref, split)
    if llm:
        out += margin_section(records, labels, n_subsets, n_boot, ref, split)
    out += pooled_section(records, labels, n_subsets, n_boot, ref)
    if rule:
        out += rule_section(records, labels, n_subsets, n_boot, classifier_records, quality)
    return out
