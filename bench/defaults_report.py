"""The library's defaults chosen by the pre-registered rule, and reported on the seeds it did not read (issue #25).

Reads the four studies' records — the classifier's and the LLM's LDS (bench/lds_runs.jsonl,
bench/lds_llm_runs.jsonl) and detection studies (bench/quality_runs.jsonl with
bench/quality_ekfac_runs.jsonl, bench/quality_llm_runs.jsonl) — applies bench/defaults_rule.py (amendments
1 and 2: the damping, the query-side option, the recommended signal; rules 2 and 2': each peer's setting)
on the SELECTION seeds and configurations, and writes bench/DEFAULTS.md: the choice with every
component, then the chosen default against every tuned peer on the REPORTING seeds and configurations only.

    python -m bench.defaults_report            # -> bench/DEFAULTS.md (nothing is trained; seconds)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

HERE = Path(__file__).resolve().parent
CLASSIFIER_REPORTING = (2,)  # the detection configurations of seed 2 (bench/defaults_rule.py: not read by it)
LLM_REPORTING = (2, 3)


def _f(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.3f}" if sign else f"{x:.3f}"


def classifier_table() -> dict[str, Any]:
    """{label: Setting} of the classifier detection study (bench/quality.py rows and Kronfluence EK-FAC)."""
    from bench import quality
    from bench.defaults_rule import Setting, detection_auc

    rows = list(quality.CANDIDATES) + list(quality.VARIANT_CANDIDATES)
    # detection_auc builds the same Settings from the rows; keep its mapping, label by label
    table = {}
    for row in rows:
        one = detection_auc([{"config": {"seed": 0}, "results": {row[0]: {"auc": 0.5}}}], [row], seeds=(0,))
        table[row[0]] = next(iter(one))
    table[quality.EKFAC] = Setting("ekfac", "kronfluence heuristic", 0.1)
    return table


def load_all(root: Path = HERE) -> dict[str, list[dict]]:
    from bench import quality, quality_llm
    from bench.records import load as load_records

    return {"classifier LDS": load_records(root / "lds_runs.jsonl"),
            "LLM LDS": load_records(root / "lds_llm_runs.jsonl"),
            "classifier detection": quality.merge_ekfac(quality.load_runs(root / "quality_runs.jsonl"),
                                                        quality.load_runs(root / "quality_ekfac_runs.jsonl")),
            "LLM detection": quality_llm.load_runs(root / "quality_llm_runs.jsonl")}


def untuned_peers(records: Sequence[Mapping], peers: Mapping[str, tuple]) -> tuple[dict[str, tuple], list[str]]:
    """The LDS peers rule 2 could not tune (no score set on the selection seeds), as extra rows for
    :func:`bench.lds_baselines.reported_lines` ({row name: (Setting, None)}), and the names of the grids among
    them.  A peer with one setting on the reporting seeds needs no tuning: its row is that setting.  A peer
    with a damping grid gets its best setting by mean LDS over the reporting seeds ("best against best", in
    the peer's favour: the default did not pick its setting there)."""
    from bench import defaults_rule as rule

    rep = rule.REPORTING_SEEDS[rule.study_of(records)]
    settings: dict[str, set] = {}
    for r in records:
        if r["kind"] == "scores" and r["config"]["seed"] in set(rep) and r.get("predicted") is not None:
            c = rule.setting_of(r)
            if not c.options and c.method not in peers:
                settings.setdefault(c.method, set()).add(c)
    rows = {m: (next(iter(cs)), None) for m, cs in settings.items() if len(cs) == 1}
    grids = sorted(m for m, cs in settings.items() if len(cs) > 1)
    if grids:
        per_seed = rule.seed_lds(records, rep)
        means = rule.mean_lds(per_seed, [s for s in rep if s in per_seed])
        for m in grids:
            best = max((c for c in settings[m] if c in means), key=lambda c: means[c], default=None)
            if best is not None:
                rows[f"{m}, best of its grid on these seeds"] = (best, None)
    return rows, grids


def untuned_detection_peers(rep: Sequence[Mapping], table: Mapping[str, Any],
                            tuned: set[str]) -> tuple[dict[str, tuple], list[str]]:
    """The detection peers rule 2' could not tune (not measured on every selection configuration) that the
    reporting configurations ``rep`` have: {row name: (setting, label)} and the names of the grids among
    them.  A peer with one setting is reported as it is; a grid by its best setting (mean validation AUC)
    on ``rep``, in its favour ("best against best": the default did not pick its setting there)."""
    settings_of: dict[str, list] = {}
    for label, c in table.items():
        if not c.options and c.method not in tuned:
            settings_of.setdefault(c.method, []).append((c, label))
    measured = {l for r in rep for l in r["results"]}
    rows: dict[str, tuple] = {}
    grids: list[str] = []
    for method, cl in settings_of.items():
        if not any(label in measured for _, label in cl):
            continue
        if len(cl) == 1:
            rows[method] = (f"{cl[0][0]} (its one setting)", cl[0][1])
            continue
        grids.append(method)
        mean = {label: statistics.mean(v) for c, label in cl
                if (v := [r["results"][label]["auc"] for r in rep if r["results"].get(label, {}).get("auc") is not None])}
        best = max(mean, key=mean.get)
        rows[f"{method}, best of its grid here"] = (table[best], best)
    return rows, grids


def detection_reported(runs: Sequence[Mapping], table: Mapping[str, Any], setting: Any, signal: str,
                       seeds: Sequence[int]) -> list[str]:
    """``setting``'s AUC (``signal``) against every peer tuned by rule 2' (validation signal), on the
    configurations of ``seeds`` only: mean, and paired default − peer (mean ± sd, configurations won)."""
    from bench import defaults_rule as rule

    rep = [r for r in runs if r["config"]["seed"] in set(seeds)]
    if not rep:
        return [f"No reporting configuration (seeds {', '.join(map(str, seeds))}) measured yet.", ""]
    label_of = {}
    for label, s in table.items():
        label_of.setdefault(s, label)
    mine = label_of.get(setting)
    if mine is None:
        return [f"The chosen setting {setting} is not a candidate of this study.", ""]
    if signal == "self" and rule.SELF + mine not in rep[0]["results"]:
        mine = label_of.get(setting.plain(), mine)
    key = rule._PREFIX[signal] + mine
    ours = [r["results"].get(key, {}).get("auc") for r in rep]
    if any(v is None for v in ours):
        return [f"`{key}` is missing on a reporting configuration.", ""]
    lines = [f"Reporting configurations: {len(rep)} (seeds {', '.join(map(str, seeds))}). Default: `{key}`, "
             f"mean AUC {_f(statistics.mean(ours))}.", "",
             "| peer (tuned on the selection configurations) | setting | mean AUC | default − peer (mean ± sd) | won |",
             "|---|---|---|---|---|"]
    tuned = {m: (c, label) for m, (c, label, _) in rule.tune_detection_peers(runs, table).items()}
    extra, untuned = untuned_detection_peers(rep, table, set(tuned))
    tuned.update(extra)
    for method, (c, label) in tuned.items():
        # a peer still being measured is compared on the configurations it has, and says how many
        pairs = [(a, b) for a, b in zip(ours, (r["results"].get(label, {}).get("auc") for r in rep)) if b is not None]
        if not pairs:
            lines.append(f"| {method} | {c} | not on a reporting configuration yet | — | — |")
            continue
        d = [a - b for a, b in pairs]
        sd = f" ± {statistics.stdev(d):.3f}" if len(d) > 1 else ""
        on = "" if len(pairs) == len(rep) else f" (on {len(pairs)} of {len(rep)}; default there {_f(statistics.mean(a for a, _ in pairs))})"
        lines.append(f"| {method} | {c} | {_f(statistics.mean(b for _, b in pairs))}{on} | "
                     f"{_f(statistics.mean(d), True)}{sd} | {sum(x > 0 for x in d)}/{len(d)} |")
    if untuned:
        lines += ["", f"Not measured on every selection configuration, so not tuned by rule 2': {', '.join(untuned)}; "
                  "each is reported by its best setting (mean AUC) on the reporting configurations that have it, "
                  "which favours it."]
    return lines + [""]


def audit_defaults() -> tuple[Any, str]:
    """(the Setting, the rule's signal name) that ``audit --target`` scores with hyperinf at its defaults."""
    from bench import defaults_rule as rule
    from hyperinf_ext.app.tasks.audit import (DETECTION_DAMPING, DETECTION_MIX_QUERIES, DETECTION_NORMALIZE,
                                              DETECTION_SIGNAL)
    from hyperinf_ext.curvature.methods import split_damping

    damping, scale = split_damping(DETECTION_DAMPING)
    options = {"mix_queries": DETECTION_MIX_QUERIES, **({"normalize": DETECTION_NORMALIZE} if DETECTION_NORMALIZE else {})}
    setting = rule.Setting("hyperinf", damping, float(scale), rule.options_of(options))
    return setting, {"influence": "validation"}.get(DETECTION_SIGNAL, DETECTION_SIGNAL)


def validation_setting_lines(final: Any, data: Mapping[str, Sequence[Mapping]], llm_table: Mapping[str, Any],
                             expected: Mapping[str, int]) -> list[str]:
    """Rule 1d (amendment 3): the candidates' mean validation AUC per study on the selection configurations,
    the choice (or what is missing), and the chosen setting on the LLM's reporting configurations with and
    without configuration 6 (the reporting configuration the amendment's ablation looked at)."""
    from bench import defaults_rule as rule
    from bench import quality, quality_llm

    cls_rows = list(quality.CANDIDATES) + list(quality.VARIANT_CANDIDATES)
    best, values = rule.choose_validation_setting(final, data["classifier detection"], cls_rows,
                                                  data["LLM detection"], llm_table, expected)
    per = {"classifier": rule.detection_auc(data["classifier detection"], cls_rows),
           "LLM": rule.detection_auc(data["LLM detection"], llm_table)}
    lines = ["## 1d. The setting of the validation signal (amendment 3)", "",
             "| setting | classifier, mean validation AUC | LLM, mean validation AUC | value |", "|---|---|---|---|"]
    for c in rule.validation_candidates(final):
        star = " **(chosen)**" if c == best else ""
        lines.append(f"| {c}{star} | {_f(per['classifier'].get(c))} | {_f(per['LLM'].get(c))} | {_f(values.get(c))} |")
    if best is None:
        return lines + ["", "No choice yet: a candidate lacks a selection configuration of a study. The commands that "
                        "fill them: `python -m bench.quality --seeds 0,1` (the classifier's selection configurations get the "
                        "new labels as supplements, about 20 min each on 2 cores) and `python -m bench.quality_llm --only 0,1,2,3 --parts library` (the library "
                        "part reruns for the labels a configuration lacks).", ""]
    lines += ["", f"Chosen: **{best}**{' (the 1a–1b setting: no change)' if best == final else ''}.", ""]
    signal = "validation"
    if best != final:
        signal, vals = rule.choose_signal(best, data["classifier detection"], cls_rows, data["LLM detection"], llm_table)
        got = ", ".join(f"{k} {_f(v)}" for k, v in vals.items())
        base = " (self: its damping's, amendment 4)" if rule.has_base_self(best) else ""
        lines += ([f"1c applied to it{base}: {got} → **{signal}**.", ""] if signal else
                  [f"1c cannot be applied to it yet ({got}; the others are not measured on every selection "
                   "configuration). `audit --target` is unchanged until they are.", ""])
    audit, audit_signal = audit_defaults()
    final_signal = signal if best != final else rule.choose_signal(
        final, data["classifier detection"], cls_rows, data["LLM detection"], llm_table)[0]
    same = audit == best and audit_signal == final_signal
    lines += [f"`audit --target` today (hyperinf_ext/app/tasks/audit.py): {audit}, signal {audit_signal} — "
              f"{'the same' if same else 'DIFFERENT'}.", ""]
    table = {**llm_table, **quality_llm.peer_table()}
    seen = rule.ABLATION_SEEN_CONFIG
    clean = [r for r in data["LLM detection"] if any(r["config"][k] != v for k, v in seen.items())]
    for sig in dict.fromkeys(["validation"] + ([signal] if signal else [])):
        for name, runs, seeds in (
                ("every LLM reporting configuration of seeds 2–3", data["LLM detection"], LLM_REPORTING),
                ("seeds 2–3 without configuration 6 (seed 2, rank 4), which the ablation looked at", clean,
                 LLM_REPORTING),
                ("the fresh reporting configurations (seeds 4–5, amendment 4)", data["LLM detection"],
                 rule.FRESH_DETECTION_SEEDS)):
            lines += [f"### {best}: {sig} signal, {name}", ""]
            lines += detection_reported(runs, table, best, sig, seeds)
        lines += [f"### {best}: {sig} signal, the classifier's reporting configurations", ""]
        lines += detection_reported(data["classifier detection"], classifier_table(), best, sig, CLASSIFIER_REPORTING)
    return lines


def report(data: Mapping[str, list[dict]], n_boot: int = 1000, expected: Mapping[str, int] | None = None) -> str:
    """DEFAULTS.md from the four studies' records.  ``expected``: selection configurations per detection study
    (default: those of bench.quality's and bench.quality_llm's grids)."""
    from bench import defaults_rule as rule
    from bench import quality, quality_llm
    from bench.lds_baselines import reported_lines
    from hyperinf_ext.curvature.methods import METHOD_DEFAULTS

    llm_table = quality_llm.settings_table()
    sel = set(rule.DETECTION_SELECTION_SEEDS)
    expected = dict(expected or {"classifier": sum(c.seed in sel for c in quality.grid(False)),
                                 "LLM": sum(c.seed in sel for c in quality_llm.grid())})
    choice = rule.choose_default_amended(data["classifier LDS"], data["classifier detection"],
                                         list(quality.CANDIDATES) + list(quality.VARIANT_CANDIDATES),
                                         data["LLM LDS"], data["LLM detection"], llm_table, expected)
    lines = ["# Defaults chosen by the pre-registered rule (issue #25)", "",
             "Generated by `python -m bench.defaults_report` from the four studies' records; the rule is "
             "bench/defaults_rule.py (its docstring, amendments 1–4, is the pre-registration). The choice reads "
             "the selection seeds and configurations only; the reported sections read the others only.", ""]
    lines += ["## 1a. The damping: six components on the selection data", ""]
    comp = choice.components or {}
    names = [k for k, _, _ in rule.COMPONENTS]
    plain = sorted({c for k in names for c in comp.get(k, {}) if not c.options and c.rule in rule.SCALE_FREE},
                   key=rule.Setting.sort_key)
    lines += ["| hyperinf setting | " + " | ".join(f"{k} (×{w:g})" for k, w, _ in rule.COMPONENTS) + " | score |",
              "|---|" + "---|" * (len(names) + 1)]
    for c in plain:
        cells = [_f(comp[k].get(c)) for k in names]
        star = " **(chosen)**" if c == choice.setting else ""
        lines.append(f"| {c}{star} | " + " | ".join(cells) + f" | {_f(choice.score.get(c))} |")
    missing = [k for k in names if not comp.get(k)]
    have = {"classifier": len([r for r in data["classifier detection"] if r["config"]["seed"] in sel]),
            "LLM": len([r for r in data["LLM detection"] if r["config"]["seed"] in sel])}
    partial = [f"{k} detection: {have[k]} of {n} selection configurations" for k, n in expected.items() if have[k] < n]
    if choice.setting is None:
        lines += ["", "No choice yet: components without data: " + (", ".join(missing + partial) or "none")
                  + ". The commands "
                  "that fill them: `python -m bench.lds --seeds 0,1`, `python -m bench.quality --seeds 0,1`, "
                  "`python -m bench.lds --model smollm2 --seeds 0 --subsets 12`, "
                  "`python -m bench.quality_llm --only 0,1,2,3` (peers on PYTHONPATH, see bench/lds.py).", ""]
        return "\n".join(lines)
    lines += ["", "## 1b. The query-side option (bench/variants.py), on the four query components", ""]
    if choice.option_score:
        qn = list(rule.QUERY_COMPONENTS)
        lines += ["| setting | " + " | ".join(qn) + " | score |", "|---|" + "---|" * (len(qn) + 1)]
        for c in sorted(choice.option_score, key=rule.Setting.sort_key):
            star = " **(chosen)**" if c == choice.final else ""
            lines.append(f"| {c}{star} | " + " | ".join(_f(comp[k].get(c)) for k in qn)
                         + f" | {_f(choice.option_score[c])} |")
    else:
        lines.append(f"No variant of {choice.setting} is measured on every query component: no option.")
    rule_default, scale = METHOD_DEFAULTS["hyperinf"]
    lib = rule.Setting("hyperinf", rule_default, float(scale))
    lines += ["", f"Chosen default: **{choice.final}**. The library's defaults today: the API (`HyperINF.scores`), "
              f"`attribute` and `select` score {lib} with no query-side option — "
              f"{'the same' if choice.final == lib else 'not the rule’s single choice, by design'} "
              "(docs/methods-and-damping.md says why); `audit --target` follows 1d below.", ""]
    signal, values = rule.choose_signal(choice.final, data["classifier detection"],
                                        list(quality.CANDIDATES) + list(quality.VARIANT_CANDIDATES),
                                        data["LLM detection"], llm_table)
    lines += ["## 1c. The detection signal to recommend with trusted rows (amendment 2)", "",
              "| signal | mean AUC over both studies' selection configurations |", "|---|---|"]
    lines += [f"| {s}{' **(chosen)**' if s == signal else ''} | {_f(values.get(s))} |" for s in rule.SIGNALS]
    lines += ["", f"Recommended for {choice.final}: **{signal or 'not decided (a signal is missing)'}**; without "
              "trusted rows, self-influence. 1d below may change the setting, and 1c is applied to it again.", ""]
    lines += validation_setting_lines(choice.final, data, llm_table, expected)
    lines += ["## Reported: LDS on the reporting seeds (not read by the rule)", ""]
    for study in ("classifier LDS", "LLM LDS"):
        recs = data[study]
        lines += [f"### {study}", ""]
        if not recs:
            lines += ["No records.", ""]
            continue
        peers = rule.tune_peers(recs, rule.study_of(recs))
        extra, grids = untuned_peers(recs, peers)
        peers = {**peers, **extra}
        lines += reported_lines(recs, choice.final, peers, None, n_boot)
        if extra:
            lines += ["Peers with no score set on the selection seeds: one setting is reported as it is; "
                      f"a damping grid ({', '.join(grids) or 'none'}) by its best setting on the reporting seeds, "
                      "which favours it.", ""]
        if choice.final != lib and any(rule.label_for(recs, s, lib) for s in rule.REPORTING_SEEDS[rule.study_of(recs)]):
            lines += reported_lines(recs, lib, peers, None, n_boot, name="unmixed default",
                                    heading=f"#### The setting `attribute`, `select` and the API use ({lib})")
    lines += ["## Reported: detection on the reporting configurations (not read by the rule)", ""]
    for study, table, seeds in (("classifier detection", classifier_table(), CLASSIFIER_REPORTING),
                                ("LLM detection", {**llm_table, **quality_llm.peer_table()}, LLM_REPORTING)):
        for sig in ("validation", signal) if signal and signal != "validation" else ("validation",):
            lines += [f"### {study}, {sig} signal of 1a–1c's {choice.final}", ""]
            lines += detection_reported(data[study], table, choice.final, sig, seeds)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.defaults_report", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "DEFAULTS.md")
    p.add_argument("--n-boot", type=int, default=1000)
    args = p.parse_args(argv)
    args.out.write_text(report(load_all(), n_boot=args.n_boot))
    print(f"[defaults] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
