"""bench/LDS.md and its plot, generated from the records of ``python -m bench.lds`` (nothing typed in).

Per seed: LDS of every score set with its bootstrap interval (subsets and queries resampled), the
paired difference of the library's default (``method="hyperinf"``, ``damping="auto"``) to every other
method on the same resamples, and the subset models' accuracy (they must train past chance for the LDS
to mean anything).  Over seeds: the mean LDS and the seeds on which the default wins.  Then the sections
of issue #25 (bench/lds_baselines.py): noise ceiling from retrained subset models, shared-structure
baselines and mean-removed LDS, margin (the LLM), pooled paired intervals over seeds, and the default
chosen by the frozen rule of bench/defaults_rule.py reported on its reporting seeds only.
"""
from __future__ import annotations

import platform
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.lds import CANDIDATES, LABELS, matrices
from hyperinf_ext.app.tasks.metrics import bootstrap_ci, lds, lds_interval

LEVEL = 0.95


def default_label() -> str | None:
    """The candidate equal to the library's default for method="hyperinf" (curvature.methods.METHOD_DEFAULTS)."""
    from hyperinf_ext.curvature.methods import METHOD_DEFAULTS

    rule, scale = METHOD_DEFAULTS["hyperinf"]
    want = {f"{rule}:{scale:g}", rule if scale == 0.1 else None}
    return next((l for l, m, d in CANDIDATES if m == "hyperinf" and d in want), None)


def seed_rows(records: list[dict], key: dict, n_subsets: int | None, n_boot: int,
              labels: Sequence[str] = LABELS, ref: str | None = None) -> dict[str, dict]:
    """{label: {"lds", "lo", "hi", "m", "q", "diff", "diff_lo", "diff_hi"}} for one seed's records; the
    differences are ``ref`` (default: the library's default candidate) minus each label."""
    out: dict[str, dict] = {}
    mats = {l: matrices(records, key, l, n_subsets) for l in labels}
    for label, pm in mats.items():
        if pm is None:
            continue
        p, m = pm
        lo, hi = lds_interval(p, m, n_boot=n_boot, level=LEVEL, seed=0)
        out[label] = {"lds": lds(p, m), "lo": lo, "hi": hi, "m": p.shape[0], "q": p.shape[1]}
    ref = ref or default_label()
    if ref in out:
        pr, mr = mats[ref]
        for label, row in out.items():
            p, m = mats[label]
            k = min(p.shape[0], pr.shape[0])
            if label == ref or k < 2:
                continue
            # the same resampled subsets and queries for both: the interval of the paired difference
            a, b, mm = pr[:k], p[:k], mr[:k]
            row["diff"] = lds(a, mm) - lds(b, mm)
            row["diff_lo"], row["diff_hi"] = bootstrap_ci(
                lambda s, q: lds(a[np.ix_(s, q)], mm[np.ix_(s, q)]) - lds(b[np.ix_(s, q)], mm[np.ix_(s, q)]),
                a.shape, n_boot=n_boot, level=LEVEL, seed=0)
    return out


def _fmt(row: dict) -> str:
    return f"{row['lds']:.3f} [{row['lo']:.3f}, {row['hi']:.3f}]"


def plot(per_seed: dict[int, dict[str, dict]], path: Path, labels: Sequence[str] = LABELS) -> None:
    """LDS per method (rows) with its bootstrap interval, one marker per seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [l for l in labels if any(l in rows for rows in per_seed.values())]
    fig = Figure(figsize=(7.5, 0.38 * len(labels) + 1.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    seeds = sorted(per_seed)
    for i, seed in enumerate(seeds):
        off = (i - (len(seeds) - 1) / 2) * 0.18
        ys, xs, err = [], [], [[], []]
        for y, l in enumerate(labels):
            r = per_seed[seed].get(l)
            if r is None or not np.isfinite(r["lds"]):
                continue
            ys.append(y + off)
            xs.append(r["lds"])
            err[0].append(max(r["lds"] - r["lo"], 0.0))
            err[1].append(max(r["hi"] - r["lds"], 0.0))
        ax.errorbar(xs, ys, xerr=err, fmt="o", ms=4, capsize=2, label=f"seed {seed}")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.0, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel(f"LDS (Spearman, mean over queries) with {int(LEVEL * 100)}% bootstrap interval")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def report(records: list[dict], command: str, *, n_subsets: int | None = None, n_boot: int = 1000,
           labels: Sequence[str] = LABELS, ref: str | None = None) -> tuple[str, dict[int, dict[str, dict]]]:
    """The Markdown text and the per-seed rows it was written from (``ref``: the method the differences
    are taken from, default the library's default candidate)."""
    keys = []
    for r in records:
        if r["config"] not in keys:
            keys.append(r["config"])
    per_seed: dict[int, dict[str, dict]] = {}
    model = next((r["config"].get("model") for r in records), None)
    lines = [f"# Linear datamodeling score (LDS) on the embedded {'LLM (' + model + ')' if model else 'default'}", "",
             f"Generated by `{command}` from its JSON-lines records by bench/lds_report.py; every number is "
             "measured (see bench/lds.py for the protocol).", "",
             "LDS = Spearman correlation, across models fine-tuned on random 50% subsets, between the predicted "
             "effect (sum of the subset members' influence scores) and the measured validation loss, per "
             f"validation query, averaged over queries. Intervals: {int(LEVEL * 100)}% percentile bootstrap over "
             f"subsets and queries ({n_boot} resamples).", ""]
    ref = ref or default_label()
    for key in keys:
        seed = key["seed"]
        rows = seed_rows(records, key, n_subsets, n_boot, labels, ref)
        if not rows:
            continue
        per_seed[seed] = rows
        subs = [r for r in records if r["kind"] == "subset" and r["config"] == key and not r.get("retrain")]
        scored = [r for r in records if r["kind"] == "scores" and r["config"] == key]
        acc = [r["val_accuracy"] for r in subs]
        lines += [f"## Seed {seed}: {key['n_train']} training / {key['n_val']} validation examples, "
                  f"{key['epochs']} epochs, rank {key['rank']}" + (f", {key['model']}" if key.get("model") else ""), "",
                  f"- subset models: {len(subs)}, validation accuracy {statistics.mean(acc):.3f} "
                  f"(min {min(acc):.3f}, max {max(acc):.3f}); full-data model: "
                  + (f"{scored[0]['full_val_accuracy']:.3f}" if scored and "full_val_accuracy" in scored[0] else "—"),
                  "", f"| method | damping used | LDS [{int(LEVEL * 100)}% interval] | subsets × queries | "
                  f"{ref or 'default'} − method [interval] |", "|---|---|---|---|---|"]
        by_label = {r["label"]: r for r in scored}
        for label in labels:
            if label not in rows:
                if by_label.get(label, {}).get("error"):
                    lines.append(f"| {label} | — | failed: {by_label[label]['error']} | — | — |")
                continue
            row, rec = rows[label], by_label.get(label, {})
            damp = rec.get("damping")
            rng = rec.get("damping_range")
            dtxt = "none" if damp is None else f"{damp[0]} × {damp[1]:g}" + (
                f" (λ {rng[0]:.2g}…{rng[1]:.2g})" if rng else "")
            diff = (f"{row['diff']:+.3f} [{row['diff_lo']:+.3f}, {row['diff_hi']:+.3f}]" if "diff" in row
                    else ("(the default)" if label == ref else "—"))
            lines.append(f"| {label} | {dtxt} | {_fmt(row)} | {row['m']} × {row['q']} | {diff} |")
        lines.append("")
    if per_seed:
        lines += _summary(per_seed, ref, labels)
    lines += ["## Machine", "", f"- {platform.processor() or platform.machine()}, Python {platform.python_version()}", ""]
    return "\n".join(lines), per_seed


def _summary(per_seed: dict[int, dict[str, dict]], ref: str | None, labels: Sequence[str]) -> list[str]:
    seeds = sorted(per_seed)
    lines = [f"## Over seeds {', '.join(map(str, seeds))}", "",
             "| method | mean LDS | per seed | default ahead, outside the interval |", "|---|---|---|---|"]
    for label in labels:
        vals = [per_seed[s][label]["lds"] for s in seeds if label in per_seed[s]]
        if not vals:
            continue
        clear = [s for s in seeds if label in per_seed[s] and per_seed[s][label].get("diff_lo", -1) > 0]
        lines.append(f"| {label} | {statistics.mean(vals):.3f} | " + ", ".join(f"{v:.3f}" for v in vals)
                     + f" | {'—' if label == ref else f'{len(clear)}/{len(vals)} seeds'} |")
    lines.append("")
    if ref is None:
        lines += ["The library's default damping of method='hyperinf' is not among the candidates.", ""]
    return lines


# A default damping must not carry units: "paper" adds an absolute 1e-3 to DataInf's value, which suits
# the gradient scale of the model it was tuned on (λ ≈ 1e-3 on MiniLM) and no other; it is measured and
# shown, but not eligible.  The other rules are relative to G (its trace), so they carry over.
SCALE_FREE = ("datainf", "spectral")


def damping_choice(per_seed: dict[int, dict[str, dict]], auc: dict[str, float]) -> tuple[str | None, list[str]]:
    """The hyperinf damping to make the default, from LDS and detection AUC together.

    Rule: among the hyperinf dampings measured by both studies whose rule is scale-free (SCALE_FREE),
    score = mean LDS / the best mean LDS + (mean AUC − ½) / (the best mean AUC − ½): each metric as the
    fraction of the best candidate's margin over chance (LDS 0, AUC ½), so the two weigh alike however
    wide their spreads; choose the highest score (ties: higher LDS).  Every hyperinf damping is listed,
    the ineligible ones with the score they would have had.  Returns the choice (None without an
    overlap) and Markdown lines stating it.
    """
    labels = [l for l, m, _ in CANDIDATES if m == "hyperinf" and l in auc
              and all(l in rows and np.isfinite(rows[l]["lds"]) for rows in per_seed.values())]
    if not labels or not per_seed:
        return None, []
    rule_of = {l: d.split(":")[0] for l, m, d in CANDIDATES}
    eligible = [l for l in labels if rule_of[l] in SCALE_FREE]
    if not eligible:
        return None, []
    mean_lds = {l: statistics.mean(rows[l]["lds"] for rows in per_seed.values()) for l in labels}
    top_lds, top_auc = max(mean_lds[l] for l in eligible), max(auc[l] for l in eligible)

    def score(l: str) -> float:
        return mean_lds[l] / top_lds + (auc[l] - 0.5) / (top_auc - 0.5)

    best = max(eligible, key=lambda l: (score(l), mean_lds[l]))
    lines = ["## Default damping of method='hyperinf' from LDS and detection AUC (historical)", "",
             "How today's default was picked: on every seed above, i.e. the seeds it is reported on, and every "
             "detection configuration. The frozen rule of bench/defaults_rule.py (section above) replaces it.", "",
             "Score = mean LDS over the seeds above / the best of them + (mean AUC over bench/quality_runs.jsonl − ½) / "
             "(the best − ½): each metric as the fraction of the best candidate's margin over chance, so both weigh "
             "alike. Eligible: the scale-free rules (λ relative to G). `paper` adds an absolute 1e-3, tuned to one "
             "model's gradient scale, so it is shown (score against the same bests) but not eligible.", "",
             "| damping | mean LDS | LDS / best | mean AUC | (AUC − ½) / (best − ½) | score | eligible |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {l} | {mean_lds[l]:.3f} | {mean_lds[l] / top_lds:.3f} | {auc[l]:.3f} | "
              f"{(auc[l] - 0.5) / (top_auc - 0.5):.3f} | {score(l):.3f} | {'yes' if l in eligible else 'no (units)'} |"
              for l in labels]
    lines += ["", f"Choice: **{best}**; the library's default today: {default_label() or '(not a candidate)'}.", ""]
    return best, lines


def quality_auc(path: Path | None = None) -> dict[str, float]:
    """Mean detection AUC per candidate label over bench/quality_runs.jsonl ({} when absent)."""
    from bench.quality import HERE, load_runs

    runs = load_runs(path or HERE / "quality_runs.jsonl")
    labels = {l for r in runs for l in r["results"]}
    return {l: statistics.mean(r["results"][l]["auc"] for r in runs if l in r["results"]) for l in labels}


def write_report(records: list[dict], out: Path, command: str, *, n_subsets: int | None = None,
                 n_boot: int = 1000, labels: Sequence[str] = LABELS, ref: str | None = None,
                 choose_damping: bool = True, split=None, classifier_records: list[dict] | None = None,
                 rule: bool = True, quality: tuple | None = None) -> str:
    """Write ``out`` (Markdown) and the plot beside it (``lds.png`` for bench/LDS.md); returns the text.

    ``split``: config key → (train labels, validation labels), for seeds recorded without a "split"
    record (the same-label baseline); ``classifier_records``: the classifier study's records, from which
    the frozen rule picks the default when ``records`` are another study's (the LLM); ``rule``: add the
    pre-registered section (bench/defaults_rule.py); ``quality``: its (detection runs, candidates), default
    bench/quality_runs.jsonl."""
    from bench.lds_baselines import sections

    png = out.with_name("lds.png" if out.name == "LDS.md" else out.stem + ".png")
    text, per_seed = report(records, command, n_subsets=n_subsets, n_boot=n_boot, labels=labels, ref=ref)
    if per_seed:
        plot(per_seed, png, labels)
        extra = sections(records, labels, n_subsets=n_subsets, n_boot=n_boot, ref=ref or default_label(),
                         split=split, classifier_records=classifier_records, rule=rule, quality=quality)
        text = text.replace("## Machine", "\n".join(extra) + "\n## Machine", 1)
        _, choice = damping_choice(per_seed, quality_auc()) if choose_damping else (None, [])
        if choice:
            text = text.replace("## Machine", "\n".join(choice) + "\n## Machine", 1)
        text = text.replace("## Machine", f"![LDS per method]({png.name})\n\n## Machine", 1)
    out.write_text(text)
    return text

