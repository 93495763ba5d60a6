"""The frozen selection rule for the library's default damping, and for every peer's setting (issue #25).

PRE-REGISTRATION.  This file was written, and its rule fixed, before the reporting seeds below were run;
the rule is a pure function of the records of the SELECTION seeds and reads nothing else.  Changing it
after a reporting seed has been measured voids the reported result (bench/LDS.md says which seeds were
used for what).

Seeds.
  * LDS study on the embedded classifier (bench/lds.py, MiniLM): selection seeds ``SELECTION_SEEDS["minilm"]``
    = 0, 1; reporting seeds ``REPORTING_SEEDS["minilm"]`` = 2, 3.
  * LDS study on the embedded LLM (``--model smollm2``): selection seed 0; reporting seeds 1, 2.
  * Detection study (bench/quality.py, flipped labels): the configurations whose seed is in
    ``DETECTION_SELECTION_SEEDS`` = 0, 1 (6 of its 8; the 2 of seed 2 are not used by the rule).

What is chosen, and how.
  1. The default damping of ``method="hyperinf"`` (the library's method; the rule does not choose the
     method).  Candidates: every hyperinf setting whose damping rule is scale-free (``SCALE_FREE``:
     "datainf", "spectral" — λ relative to the layer's GFIM; "paper" adds an absolute 1e-3 tuned to one
     model's gradient scale and is not eligible) that has an LDS on EVERY classifier selection seed and a
     detection AUC on EVERY detection selection configuration.
     LDS(c) = mean over the selection seeds of the seed's LDS (Spearman across the seed's subset models,
     retrain 0, between predicted and measured loss, per validation query, averaged over queries).
     AUC(c) = mean ROC-AUC of flipped-label detection over the selection configurations.
     score(c) = LDS(c) / max_c LDS + (AUC(c) − ½) / (max_c AUC − ½): each metric as the fraction of the
     best candidate's margin over chance (LDS 0, AUC ½), so the two weigh alike.
     MAXIMISED: score(c).  Ties (equal to 1e-12): the higher LDS(c), then the higher AUC(c), then the
     smaller damping (rule order datainf < spectral, then the smaller scale).
  2. Each peer's setting (every other method family in the records: exact, datainf, lissa, kronecker,
     tracin, paper, EK-FAC), per study: the setting with the highest LDS(c) over THAT study's selection
     seeds, any damping (units allowed), among the settings measured on every selection seed.  Peers are
     tuned on the reported metric alone, so they get at least as much tuning on it as the default does.
     Ties: the smaller damping, as above.  hyperinf tuned the same way (LDS alone, any damping) is shown
     beside them as "hyperinf, tuned on LDS alone".
  3. The LLM study uses the default chosen in 1 (the library has one default; one selection seed is too
     few to tune it there) and its own peers from 2.

AMENDMENT 1 (2026-12-06, before any reporting seed was run and before any number of the query-side
variants or of the LLM detection study existed; it replaces rule 1 above, rules 2 and 3 stand except that
the LLM study now takes part in rule 1).  Issue #25 item 3 asks for defaults chosen from the LLM and the
classifier studies together, on LDS and detection AUC, validation and self signal; item 2 added query-side
options (bench/variants.py) that may become part of the default.  Known when it was written (already in the
records): the classifier's LDS (seeds 0, 1) and validation-signal AUC, and the LLM's LDS (seed 0), of the
plain hyperinf dampings.  Unknown: every self signal, the whole LLM detection study, every variant, every
reporting seed.
  1a. The default damping of ``method="hyperinf"``.  Candidates: hyperinf settings with a scale-free damping
      rule and no query-side option, measured on EVERY component below.  Components, with their weights:
        classifier LDS (selection seeds 0, 1)                                     ½
        classifier detection AUC, validation signal (configurations of seeds 0, 1)  ¼
        classifier detection AUC, self-influence signal (the same configurations)   ¼
        LLM LDS (selection seed 0)                                                 ½
        LLM detection AUC, validation signal (bench/quality_llm.py, seeds 0, 1)     ¼
        LLM detection AUC, self-influence signal (the same configurations)          ¼
      Each component enters as the fraction of the best eligible candidate's margin over chance (LDS: v /
      max v; AUC: (v − ½) / (max v − ½)).  MAXIMISED: the weighted sum (at most 2).  Ties (1e-12): the
      smaller damping, as in rule 1.  No choice while any component is unmeasured.
  1b. The query-side option (bench/variants.py) of that default.  Candidates: the setting of 1a with no
      option, and each variant of it measured on the four components that have queries (both LDS and both
      validation-signal detection AUCs; a variant changes nothing without a query set, so the self signal
      does not enter).  Weights ½ LDS, ½ validation AUC per study, normalised as in 1a over these
      candidates.  MAXIMISED: the weighted sum; ties go to no option, then to the variant order of
      bench/variants.py.  The variants were measured at spectral × 1 only: if 1a chooses another damping,
      the default has no query-side option until they are measured there.
  1c. (AMENDMENT 2, same day, also before any of those numbers existed: issue #25 item 4.)  The detection
      signal the user-facing commands recommend when trusted rows (a validation / target set) exist.
      Candidates, for the setting chosen by 1a–1b: "validation" (its influence on the mean validation loss),
      "self" (its self-influence; a mixed-only variant's is its damping's) and "combined" (the two signals'
      ranks averaged, hyperinf_ext.app.tasks.metrics.rank_average).  Value: the mean over the two studies of
      each study's mean ROC-AUC over its detection selection configurations.  MAXIMISED; ties go to
      validation, then combined, then self.  Without trusted rows self-influence is the only signal.
  2'. Each peer of the LLM detection study (bergson TrackStar with and without mixing, bergson EK-FAC,
      Kronfluence EK-FAC on its damping grid) is tuned on its mean validation-signal AUC over the LLM
      detection selection configurations, any damping; reported on the configurations of seeds 2, 3.

AMENDMENT 3 (2026-12-06, written before any library record of the settings it adds existed; it adds rule
1d, every rule above stands).  Issue #25's target that the LLM's validation-signal detection AUC lead
TrackStar's was missed on the reporting configurations (bench/QUALITY_LLM.md).  Known when it was written:
everything amendments 1 and 2 name, every LLM detection configuration's library and bergson numbers then
recorded, and an offline ablation (a scratch script on per-example gradients dumped from the study's own
models, not the library's code path) on LLM detection configurations 1 (selection) and 6 (REPORTING).  The
script reproduced the records (configuration 6, mixed 99 at spectral × 1: 0.832, recorded 0.832; bergson
TrackStar emulated 0.888, recorded 0.887) and showed that with the query set mixed in (w = 99) a damping of
0.1 × the mixed matrix's mean eigenvalue ranked flipped rows higher than × 1 (configuration 1: 0.879 against
0.859; configuration 6: 0.863 against 0.832; with normalize="symmetric" 0.867 and 0.889).  Because a reporting
configuration was looked at, what 1d chooses is reported with and without configuration 6.
  1d. The setting of the validation signal for detection with trusted rows (``audit --target``; the
      combined signal of 1c then averages ITS ranks with its damping's self signal).  Candidates: the
      setting chosen by 1a–1b and hyperinf at spectral × 0.1 with each variant of bench/variants.py
      ``DAMPED`` ("mixed 99"; "mixed 99, symmetric").  Value: the mean over the two studies (classifier,
      LLM) of each study's mean validation-signal ROC-AUC over its detection selection configurations.
      MAXIMISED; ties (1e-12) go to the 1a–1b setting, then to the order of ``DAMPED``.  No choice while a
      candidate lacks a selection configuration of either study.  1c is applied again to the chosen setting.

AMENDMENT 4 (2026-12-07, written and committed before any combined signal of a "symmetric" setting was
scored and before any detection configuration of seeds 4–5 existed; every rule above stands).  1d chose
hyperinf at spectral × 0.1 with "mixed 99, symmetric" (bench/DEFAULTS.md), and 1c could not be applied to it:
a "symmetric" setting's own self-influence is 1 for every row, so 1c's "self" and "combined" were missing.
1d already says the combined signal of its setting averages its ranks with ITS DAMPING'S self signal; 1c's
"self" candidate for a mixed-only setting is its damping's.  This amendment makes that one rule:
  1c'. For a setting with query-side options and no self-influence signal of its own (mixed-only and
      "symmetric" settings; a "unit" setting has one), 1c's "self" is the self-influence of plain hyperinf
      at the same damping rule and scale, and "combined" averages the setting's validation ranks with it
      (bench/variants.py ``self_source``).  Nothing else of 1c changes.
  Fresh reporting configurations.  Every configuration of seeds 2–3 had been looked at when amendments 3–4
      were written.  The LLM detection study adds two configurations, seeds ``FRESH_DETECTION_SEEDS`` = 4, 5
      (20% flipped, rank 8, the grid's main setting; bench/quality_llm.py ``FRESH_SEEDS``), recorded after
      this amendment was committed; what 1c–1d choose is reported on them beside the issue's 8
      configurations.  No rule reads them.

Reported.  The chosen default and every tuned peer on the REPORTING seeds only: per-seed LDS, and the
pooled two-sided 95% paired interval of default − peer (bootstrap over subsets and queries within each
seed, pooled over the reporting seeds; bench/lds_baselines.py ``pooled_paired``).  The library's default
(``curvature.methods.METHOD_DEFAULTS["hyperinf"]``) is not changed by this file; the report states whether
the rule agrees with it.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

SELECTION_SEEDS: dict[str, tuple[int, ...]] = {"minilm": (0, 1), "smollm2": (0,)}
REPORTING_SEEDS: dict[str, tuple[int, ...]] = {"minilm": (2, 3), "smollm2": (1, 2, 3)}
DETECTION_SELECTION_SEEDS: tuple[int, ...] = (0, 1)
FRESH_DETECTION_SEEDS: tuple[int, ...] = (4, 5)  # amendment 4: reported only, read by no rule
DEFAULT_METHOD = "hyperinf"
SCALE_FREE = ("datainf", "spectral")
_RULE_ORDER = {"datainf": 0, "spectral": 1, "kronfluence heuristic": 1, "paper": 2}
TIE = 1e-12


@dataclass(frozen=True, order=True)
class Setting:
    """A method with the damping it was actually run with (``rule`` and ``scale`` None: no damping) and its
    query-side options (bench/variants.py; () = none), as sorted (name, value) pairs."""

    method: str
    rule: str | None = None
    scale: float | None = None
    options: tuple = ()

    def sort_key(self) -> tuple:
        return (_RULE_ORDER.get(self.rule or "", 3), self.scale if self.scale is not None else 0.0,
                _variant_rank(self.options))

    def plain(self) -> "Setting":
        return Setting(self.method, self.rule, self.scale)

    def __str__(self) -> str:
        base = self.method if self.rule is None else f"{self.method}, {self.rule} × {self.scale:g}"
        return base + "".join(f", {k}={v:g}" if isinstance(v, float) else f", {k}={v}" for k, v in self.options)


def _variant_rank(options: tuple) -> int:
    from bench.variants import VARIANTS

    if not options:
        return 0
    order = [tuple(sorted(o.items())) for o in VARIANTS.values()]
    return 1 + (order.index(options) if options in order else len(order))


def options_of(options: Mapping | None) -> tuple:
    """A record's "options" field ({"mix_queries": 99.0, ...}) as Setting.options."""
    return tuple(sorted((str(k), float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                        for k, v in (options or {}).items()))


def setting_of(record: Mapping) -> Setting:
    """The setting of a "scores" record of bench/lds.py (its "method", resolved "damping" and "options")."""
    damping = record.get("damping")
    opts = options_of(record.get("options"))
    if not damping:
        return Setting(str(record.get("method")), options=opts)
    rule, scale = damping
    return Setting(str(record.get("method")), str(rule), float(scale), opts)


def study_of(records: Sequence[Mapping]) -> str:
    """"minilm" or "smollm2": which LDS study the records are."""
    model = next((r["config"].get("model") for r in records), None)
    return model or "minilm"


def seed_lds(records: Sequence[Mapping], seeds: Iterable[int], n_subsets: int | None = None
             ) -> dict[int, dict[Setting, tuple[str, float]]]:
    """{seed: {setting: (label, LDS)}} over the score sets of the given seeds (retrain-0 losses); a setting
    scored under two labels (e.g. a method's "auto" and its explicit damping) keeps the first label."""
    from bench.lds import matrices
    from hyperinf_ext.app.tasks.metrics import lds

    seeds = set(int(s) for s in seeds)
    out: dict[int, dict[Setting, tuple[str, float]]] = {}
    for r in records:
        if r["kind"] != "scores" or r["config"]["seed"] not in seeds or r.get("predicted") is None:
            continue
        seed, setting = r["config"]["seed"], setting_of(r)
        per = out.setdefault(seed, {})
        if setting in per:
            continue
        pm = matrices(list(records), r["config"], r["label"], n_subsets)
        if pm is None:
            continue
        v = lds(*pm)
        if math.isfinite(v):
            per[setting] = (r["label"], v)
    return out


def mean_lds(per_seed: Mapping[int, Mapping[Setting, tuple[str, float]]], seeds: Sequence[int]
             ) -> dict[Setting, float]:
    """Mean LDS over ``seeds`` of the settings measured on every one of them."""
    if not seeds or any(s not in per_seed for s in seeds):
        return {}
    common = set.intersection(*(set(per_seed[s]) for s in seeds))
    return {c: statistics.mean(per_seed[s][c][1] for s in seeds) for c in common}


from bench.variants import COMBINED, SELF  # noqa: E402  (the detection records' label prefixes)
_PREFIX = {"validation": "", "self": SELF, "combined": COMBINED}
SIGNALS = ("validation", "combined", "self")  # amendment 2's tie order


def detection_auc(quality_runs: Sequence[Mapping], quality_candidates: Sequence[tuple] | Mapping[str, Setting],
                  seeds: Sequence[int] = DETECTION_SELECTION_SEEDS, signal: str = "validation"
                  ) -> dict[Setting, float]:
    """Mean detection ROC-AUC per setting over the detection configurations whose seed is in ``seeds``,
    for the settings every such configuration has.  ``quality_candidates``: bench.quality.CANDIDATES
    ((label, method, rule, scale[, options]) rows) or a {label: Setting} table (bench/quality_llm.py).
    ``signal``: "validation" (the label itself), "self" or "combined" (the label's "self: " / "combined: "
    entry)."""
    runs = [r for r in quality_runs if r["config"]["seed"] in set(seeds)]
    if not runs:
        return {}
    table = quality_candidates if isinstance(quality_candidates, Mapping) else {
        row[0]: (Setting(row[1]) if row[1] == "tracin" else
                 Setting(row[1], row[2], float(row[3]), options_of(row[4] if len(row) > 4 else None)))
        for row in quality_candidates}
    prefix = _PREFIX[signal]
    out = {}
    for label, setting in table.items():
        vals = [r["results"][prefix + label].get("auc") for r in runs if prefix + label in r["results"]]
        if len(vals) == len(runs) and all(v is not None and math.isfinite(v) for v in vals) \
                and setting not in out:
            out[setting] = statistics.mean(vals)
    return out


@dataclass
class Choice:
    setting: Setting | None
    lds: dict[Setting, float]
    auc: dict[Setting, float]
    score: dict[Setting, float]
    eligible: list[Setting]
    components: dict[str, dict[Setting, float]] | None = None  # amendment 1: every component's values
    final: Setting | None = None  # amendment 1b: the default with its query-side option (None: no choice)
    option_score: dict[Setting, float] | None = None


def choose_default(lds_records: Sequence[Mapping], quality_runs: Sequence[Mapping],
                   quality_candidates: Sequence[tuple]) -> Choice:
    """Rule 1 as first frozen (classifier only; kept to show what it chose): the hyperinf damping to make
    the default (None without candidates).  Amendment 1 replaced it: :func:`choose_default_amended`."""
    seeds = SELECTION_SEEDS["minilm"]
    per = seed_lds(lds_records, seeds)
    lds_mean = {c: v for c, v in mean_lds(per, seeds).items() if c.method == DEFAULT_METHOD and not c.options}
    auc = {c: v for c, v in detection_auc(quality_runs, quality_candidates).items()
           if c.method == DEFAULT_METHOD and not c.options}
    eligible = sorted((c for c in lds_mean if c in auc and c.rule in SCALE_FREE), key=Setting.sort_key)
    if not eligible:
        return Choice(None, lds_mean, auc, {}, [])
    score = _weighted({"lds": lds_mean, "auc": auc}, {"lds": 1.0, "auc": 1.0}, eligible)
    best = _argmax(eligible, score, [lds_mean, auc])
    return Choice(best, lds_mean, auc, score, eligible)


# amendment 1a: (component, weight, chance level)
COMPONENTS = (("classifier LDS", 0.5, 0.0), ("classifier AUC, validation", 0.25, 0.5),
              ("classifier AUC, self", 0.25, 0.5), ("LLM LDS", 0.5, 0.0), ("LLM AUC, validation", 0.25, 0.5),
              ("LLM AUC, self", 0.25, 0.5))
QUERY_COMPONENTS = {"classifier LDS": 0.5, "classifier AUC, validation": 0.5, "LLM LDS": 0.5,
                    "LLM AUC, validation": 0.5}
_CHANCE = {name: chance for name, _, chance in COMPONENTS}


def _weighted(values: Mapping[str, Mapping[Setting, float]], weights: Mapping[str, float],
              among: Sequence[Setting]) -> dict[Setting, float]:
    """Σ_k w_k·(v_k(c) − chance_k)/(max over ``among`` of v_k − chance_k), for every c of ``among``."""
    top = {k: max(values[k][c] for c in among) for k in weights}
    return {c: sum(w * (values[k][c] - _CHANCE.get(k, 0.5 if "auc" in k.lower() else 0.0))
                   / (top[k] - _CHANCE.get(k, 0.5 if "auc" in k.lower() else 0.0)) for k, w in weights.items())
            for c in among}


def _argmax(ordered: Sequence[Setting], score: Mapping[Setting, float],
            then: Sequence[Mapping[Setting, float]]) -> Setting:
    """The first of ``ordered`` with the highest (score, then each of ``then``): a later one wins only when
    strictly better (by more than TIE) on the first key that differs."""
    best = ordered[0]
    for c in ordered[1:]:
        for x, y in zip([score[c]] + [t[c] for t in then], [score[best]] + [t[best] for t in then]):
            if x > y + TIE:
                best = c
                break
            if x < y - TIE:
                break
    return best


def choose_default_amended(classifier_lds: Sequence[Mapping], classifier_quality: Sequence[Mapping],
                           classifier_candidates: Sequence[tuple], llm_lds: Sequence[Mapping],
                           llm_quality: Sequence[Mapping], llm_candidates: Mapping[str, Setting],
                           expected_configs: Mapping[str, int] | None = None) -> Choice:
    """Amendment 1 of the module docstring (1a: the damping; 1b: the query-side option).
    ``classifier_candidates``: bench.quality's candidate rows; ``llm_candidates``: bench.quality_llm's
    {label: Setting} table.  Only the selection seeds and configurations are read.  ``expected_configs``:
    {"classifier"/"LLM": how many selection configurations each detection grid has}; a study with fewer
    recorded counts as unmeasured (a mean over part of the grid is not the component)."""
    cls_seeds, llm_seeds = SELECTION_SEEDS["minilm"], SELECTION_SEEDS["smollm2"]
    expected = expected_configs or {}

    def complete(runs: Sequence[Mapping], study: str) -> Sequence[Mapping]:
        n = len({_config_key(r) for r in runs if r["config"]["seed"] in DETECTION_SELECTION_SEEDS})
        return runs if n >= expected.get(study, 0) else []

    classifier_quality, llm_quality = complete(classifier_quality, "classifier"), complete(llm_quality, "LLM")
    mine = lambda d: {c: v for c, v in d.items() if c.method == DEFAULT_METHOD}  # noqa: E731
    comp = {"classifier LDS": mine(mean_lds(seed_lds(classifier_lds, cls_seeds), cls_seeds)),
            "classifier AUC, validation": mine(detection_auc(classifier_quality, classifier_candidates)),
            "classifier AUC, self": mine(detection_auc(classifier_quality, classifier_candidates, signal="self")),
            "LLM LDS": mine(mean_lds(seed_lds(llm_lds, llm_seeds), llm_seeds)),
            "LLM AUC, validation": mine(detection_auc(llm_quality, llm_candidates)),
            "LLM AUC, self": mine(detection_auc(llm_quality, llm_candidates, signal="self"))}
    eligible = sorted((c for c in comp["classifier LDS"] if not c.options and c.rule in SCALE_FREE
                       and all(c in comp[k] for k, _, _ in COMPONENTS)), key=Setting.sort_key)
    if not eligible:
        return Choice(None, comp["classifier LDS"], comp["classifier AUC, validation"], {}, [], comp)
    score = _weighted(comp, {k: w for k, w, _ in COMPONENTS}, eligible)
    best = _argmax(eligible, score, [])
    # 1b: the variants of the chosen damping measured on every query component
    opts = sorted((c for c in comp["classifier LDS"] if c.plain() == best
                   and all(c in comp[k] for k in QUERY_COMPONENTS)), key=Setting.sort_key)
    final, option_score = (best, None)
    if best in opts and len(opts) > 1:
        option_score = _weighted(comp, QUERY_COMPONENTS, opts)
        final = _argmax(opts, option_score, [])
    return Choice(best, comp["classifier LDS"], comp["classifier AUC, validation"], score, eligible, comp, final,
                  option_score)


def _config_key(run: Mapping) -> str:
    import json

    return json.dumps(run["config"], sort_keys=True)


def has_base_self(setting: Setting) -> bool:
    """True when ``setting`` has query-side options and no self-influence signal of its own (mixed-only or
    "symmetric"): 1c reads its damping's (amendment 4)."""
    from bench.variants import self_options

    return bool(setting.options) and not self_options(dict(setting.options))


def choose_signal(setting: Setting, classifier_quality: Sequence[Mapping], classifier_candidates: Sequence[tuple],
                  llm_quality: Sequence[Mapping], llm_candidates: Mapping[str, Setting]
                  ) -> tuple[str | None, dict[str, float]]:
    """Amendment 2 (rule 1c): (the signal to recommend with trusted rows, {signal: value}) for ``setting``
    (the default chosen by 1a–1b); (None, values) while a study lacks one of the signals."""
    values: dict[str, float] = {}
    for signal in SIGNALS:
        per_study = []
        for runs, table in ((classifier_quality, classifier_candidates), (llm_quality, llm_candidates)):
            auc = detection_auc(runs, table, signal=signal)
            key = setting
            if key not in auc and signal == "self" and has_base_self(setting):
                key = setting.plain()  # no self signal of its own: its damping's (amendments 2 and 4)
            if key in auc:
                per_study.append(auc[key])
        if len(per_study) == 2:
            values[signal] = statistics.mean(per_study)
    if len(values) < len(SIGNALS):
        return None, values
    best = SIGNALS[0]
    for sig in SIGNALS[1:]:
        if values[sig] > values[best] + TIE:
            best = sig
    return best, values


# the reporting configuration amendment 3's ablation looked at (1d is reported with and without it)
ABLATION_SEEN_CONFIG = {"seed": 2, "rank": 4}


def validation_candidates(chosen: Setting) -> list[Setting]:
    """Rule 1d's candidates, in its tie order: ``chosen`` (1a–1b's), then hyperinf at spectral × s with each
    variant of bench/variants.py ``DAMPED``."""
    from bench.variants import DAMPED, VARIANTS

    return [chosen] + [Setting(DEFAULT_METHOD, "spectral", float(scale), options_of(VARIANTS[name]))
                       for name, scale in DAMPED]


def choose_validation_setting(chosen: Setting, classifier_quality: Sequence[Mapping],
                              classifier_candidates: Sequence[tuple], llm_quality: Sequence[Mapping],
                              llm_candidates: Mapping[str, Setting],
                              expected_configs: Mapping[str, int] | None = None
                              ) -> tuple[Setting | None, dict[Setting, float]]:
    """Amendment 3 (rule 1d): (the setting of the validation signal, {candidate: value}) among ``chosen``
    (1a–1b's) and hyperinf at spectral × s with each variant of bench/variants.py ``DAMPED``; (None, values
    of the candidates measured everywhere) while a candidate lacks a selection configuration of a study.
    ``expected_configs`` as in :func:`choose_default_amended`."""
    expected = expected_configs or {}
    cands = validation_candidates(chosen)
    per_study = []
    for study, runs, table in (("classifier", classifier_quality, classifier_candidates),
                               ("LLM", llm_quality, llm_candidates)):
        n = len({_config_key(r) for r in runs if r["config"]["seed"] in DETECTION_SELECTION_SEEDS})
        per_study.append(detection_auc(runs, table) if n >= expected.get(study, 1) else {})
    values = {c: statistics.mean(a[c] for a in per_study) for c in cands if all(c in a for a in per_study)}
    if len(values) < len(cands):
        return None, values
    return _argmax(cands, values, []), values


def tune_detection_peers(quality_runs: Sequence[Mapping], table: Mapping[str, Setting],
                         seeds: Sequence[int] = DETECTION_SELECTION_SEEDS) -> dict[str, tuple[Setting, str, float]]:
    """Rule 2': {method: (setting, label, mean validation AUC on the selection configurations)} per method
    family of ``table`` ({label: Setting}; hyperinf's query-side variants are not dampings: left out)."""
    label_of = {}
    for label, setting in table.items():
        label_of.setdefault(setting, label)
    means = {c: v for c, v in detection_auc(quality_runs, table, seeds).items() if not c.options}
    out: dict[str, tuple[Setting, str, float]] = {}
    for c in sorted(means, key=lambda c: (c.sort_key(), c.method)):  # ascending damping per method; the method fixes the table order
        if c.method not in out or means[c] > out[c.method][2] + TIE:
            out[c.method] = (c, label_of[c], means[c])
    return out


def tune_peers(records: Sequence[Mapping], study: str | None = None) -> dict[str, tuple[Setting, float]]:
    """Rule 2: {method: (setting, mean LDS on the selection seeds)} per method family of ``records``
    (hyperinf included, tuned the same way, for comparison)."""
    study = study or study_of(records)
    seeds = SELECTION_SEEDS[study]
    # the query-side variants are options of hyperinf's default (amendment 1b), not dampings to tune
    means = {c: v for c, v in mean_lds(seed_lds(records, seeds), seeds).items() if not c.options}
    out: dict[str, tuple[Setting, float]] = {}
    for c in sorted(means, key=lambda c: (c.sort_key(), c.method)):  # ascending damping per method; the method fixes the table order
        if c.method not in out or means[c] > out[c.method][1] + TIE:
            out[c.method] = (c, means[c])
    return out


def label_for(records: Sequence[Mapping], seed: int, setting: Setting) -> str | None:
    """The label under which ``setting`` was scored on ``seed`` (None: not scored there)."""
    for r in records:
        if r["kind"] == "scores" and r["config"]["seed"] == seed and r.get("predicted") is not None \
                and setting_of(r) == setting:
            return r["label"]
    return None


def measured_seeds(records: Sequence[Mapping]) -> list[int]:
    return sorted({r["config"]["seed"] for r in records if r["kind"] == "subset"})
