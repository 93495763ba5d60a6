"""Linear datamodeling score (LDS) of every influence method on the embedded default (issue #16).

Protocol, per seed: split the embedded Rotten Tomatoes data (no flipped labels); draw M random subsets of
50% of the training set (subset j of seed s from ``numpy.random.default_rng([s, j])``, so adding subsets
never changes the earlier ones); fine-tune all-MiniLM-L6-v2 + LoRA on each subset from the SAME initial
adapter (``load_lora_model(seed=s)``) with the same recipe and seed schedule (AdamW 3e-4 constant,
batch 16, max length 64, loader shuffle and dropout seeded with s) and record its loss on every
validation query.  Separately fine-tune the full-data model with the same recipe, fit HyperINF once and
score every (method, damping) of ``CANDIDATES`` per query: scores [Q, n_train], sign as the library's
(positive = up-weighting raises the query loss).  Predicted effect of subset S on query q = the sum of
the scores of S's members; LDS = Spearman across subsets of predicted vs measured loss, per query,
averaged over queries (``hyperinf_ext.app.tasks.metrics.lds``), with bootstrap intervals over queries and
subsets.  Kronfluence EK-FAC is scored on the same full-data model through bench/quality_ekfac.py's code
path (bench/lds_ekfac.py: one factor fit, one scoring per damping) when kronfluence is installed; on the
LLM with bergson's TrackStar and EK-FAC too (see "The external peers on the LLM" below).

Sizes and time.  The shared FACTS.md (measured on this machine): 1,000 examples stay at chance for 3 epochs and take off
in epoch 4 (0.75 after 5); 2,000 × 3 epochs reach 0.79.  Subsets of 1,000 must train past chance or the
LDS measures noise, so: n_train = 2,000 (subsets of 1,000), 5 epochs for every model, 200 validation
queries, M = 32 subsets.  Measured on an idle 2-core AMD machine: about 41 s per subset model, 26 min
per seed, plus about 4 min for the full model, the 14 score sets and Kronfluence EK-FAC.  Each
subset model is appended as soon as it is measured, so an interrupted run resumes where it stopped.

    python -m bench.lds                  # seeds 0 and 1, M = 32 (about 2.5 h), resumable -> bench/lds_runs.jsonl
    python -m bench.lds --seeds 2        # one more seed
    python -m bench.lds --smoke          # tiny sizes (64 train, 4 subsets, 1 epoch) -> /tmp, about 2 min
    python -m bench.lds --report-only    # rewrite bench/LDS.md (+ bench/lds.png) from the records
    python -m bench.lds --model smollm2 --seeds 0 --subsets 12
                                         # the smaller grid on the embedded LLM (300/60, 3 epochs, LLM_LABELS)
                                         # -> bench/lds_llm_runs.jsonl, bench/LDS_LLM.md

Noise ceiling (issue #25).  ``--retrain-seeds 0,1,2`` retrains every subset model r = 1, 2 more times
on the SAME members from the SAME initial adapter (``load_lora_model(seed=s)``: the shared init is part
of the protocol, every subset model of a seed starts from it, so a retrain keeps it); what a retrain
changes is the training randomness, seeded with ``train_seed(s, r)`` instead of s: the loader's shuffle
(batch order) and the dropout masks (MiniLM: hidden and attention dropout 0.1; SmolLM2 has no dropout,
so there a retrain changes the batch order only).  r = 0 is the model measured today (training seed s,
records without a "retrain" field); the default ``--retrain-seeds 0`` is today's run.  The report then
gives the test-retest correlation per query (the noise ceiling) and every method's LDS against the
retrain-averaged losses (bench/lds_baselines.py).

    python -m bench.lds --seeds 0 --subsets 16 --retrain-seeds 0,1,2
                                         # 32 more MiniLM models (retrains 1, 2 of subsets 0-15; about 25 min)
    python -m bench.lds --model smollm2 --seeds 0 --subsets 16 --retrain-seeds 0,1,2
                                         # 36 more LLM models (subsets 12-15, then retrains 1, 2 of all 16; about
                                         # 2 h at 196 s each; they record margins) and the 16-subset score sets
    python -m bench.lds --seeds 0,1 --split-only
                                         # the split's labels only (no training): the same-label baseline

Peers are tuned as much as the default (issue #25): every method with a curvature is scored on the same
damping grid as hyperinf (DataInf's rule and spectral 0.1-30; EK-FAC with Kronfluence's heuristic scaled
0.01-30, which is our "spectral" rule), and bench/defaults_rule.py, frozen before the reporting seeds
run, picks the default and each peer's setting on the selection seeds; bench/LDS.md reports them on the
reporting seeds only:

    python -m bench.lds --seeds 0,1      # score the peer grid on the selection seeds (no subset model to train)
    python -m bench.lds --seeds 2,3      # the reporting seeds (bench/defaults_rule.py REPORTING_SEEDS)

The external peers on the LLM (issue #25).  ``--model smollm2`` also scores, on the same full-data SmolLM2 +
LoRA model and the same encodings as hyperinf, Kronfluence EK-FAC with a causal-LM task (the mean token
loss over the answer tokens, LoRA lora_A/lora_B of q_proj/v_proj tracked; the same damping grid as on the
classifier, labels "kronfluence EK-FAC" and "kronfluence EK-FAC, spectral S"; bench/lds_ekfac.py
``ekfac_causal_pairwise_grid``) and bergson 2.5.1's "bergson TrackStar", "bergson TrackStar, no mixing" and
"bergson EK-FAC" (bench/lds_bergson.py says what each runs), each when it is importable (``--no-ekfac`` /
``--no-bergson`` skip them).  Both go in with ``--no-deps`` beside torch 2.13 (../shared/FACTS.md), each into
a folder of its own that PYTHONPATH names, so the venv's torch stays 2.13.0+cpu:

    pip install --no-deps --target /tmp/kfsite kronfluence==1.0.1 einops opt_einsum einconv
    pip install --no-deps --target /tmp/bgsite bergson==2.5.1 torchopt==0.7.3
    pip install --no-deps --target /tmp/bgsite datasets==5.2.0 simple-parsing==0.1.9 jaxtyping==0.3.11 \
        ml_dtypes==0.7.0 natsort==8.4.0 petname==2.9 optree==0.20.0 graphviz==0.21 dill==0.4.1 \
        docstring_parser==0.18.0 multiprocess==0.70.19 pyarrow==26.0.1 wadler_lindig==0.1.8 pandas==3.1.1 xxhash==4.1.0
    python -c "import torch; print(torch.__version__)"      # still 2.13.0+cpu

    PYTHONPATH=/tmp/kfsite:/tmp/bgsite HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        python -m bench.lds --model smollm2 --seeds 0 --subsets 16 --retrain-seeds 0,1,2
                                         # the LLM LDS with the peers: subset models still missing, then every
                                         # score set not recorded yet (peers included) -> bench/lds_llm_runs.jsonl
    PYTHONPATH=/tmp/kfsite:/tmp/bgsite HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        python -m bench.lds --model smollm2 --seeds 1,2 --subsets 16
                                         # the LLM's reporting seeds, peers included

What the peers cost, in forward + backward passes over the 300 training examples (each about as long as one
epoch of fine-tuning): Kronfluence 2 for its factors plus 1 per damping of its grid (8 in all); bergson 6
for its three score sets (TrackStar 2, no mixing 1 as it reuses the training-set curvature, EK-FAC 3), plus
a few passes over the 60 queries and one load of the base model per bergson step.
The sign of every peer is ours (positive = up-weighting raises the query loss); tests/bench/test_lds_peers.py
checks it against hyperinf on a tiny random Llama.

Records (JSON lines): ``{"kind": "subset", "config", "subset": j, "val_loss": [Q], ...}`` per subset model
(a retrain adds ``"retrain": r, "train_seed"``; an LLM model measured since issue #25 adds
``"val_margin": [Q]``, log p(correct answer) − log p(wrong answer) summed over the answer tokens),
``{"kind": "scores", "config", "label", "n_subsets": M, "predicted": [M][Q], ...}`` per score set
(the predicted subset effects, not the [Q, n_train] scores, keep the file small; a later run with more
subsets re-scores) and ``{"kind": "split", "config", "train_labels", "val_labels"}`` once per seed (the
labels of the data split, for the same-label baseline).  bench/lds_report.py writes the Markdown and the
plot from them.  Two processes must not append to one records file: to spread a run over both cores (the
noise ceiling's retrains 1 and 2, say, or a new seed's subsets with ``--lane 0/2`` and ``--lane 1/2``), give
the second a copy (``--runs``) and fold it back with ``python -m bench.records merge COPY
bench/lds_llm_runs.jsonl`` once both have stopped (bench/records.py); lanes leave the score sets to a run
without ``--lane``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from bench import variants
from bench.lds_bergson import LABELS as BERGSON_LABELS, have_bergson
from bench.records import append as append_record, load as load_records

HERE = Path(__file__).resolve().parent
EKFAC = "kronfluence EK-FAC"

# (label, method, damping as hyperinf_ext.curvature.methods.parse_dampings reads it)
CANDIDATES: list[tuple[str, str, str]] = [
    ("hyperinf, datainf damping", "hyperinf", "datainf"),
    ("hyperinf, paper damping", "hyperinf", "paper"),
    ("hyperinf, spectral 0.1", "hyperinf", "spectral:0.1"),
    ("hyperinf, spectral 1", "hyperinf", "spectral:1"),
    ("hyperinf, spectral 3", "hyperinf", "spectral:3"),
    ("hyperinf, spectral 10", "hyperinf", "spectral:10"),
    ("hyperinf, spectral 30", "hyperinf", "spectral:30"),
    ("exact, datainf damping", "exact", "datainf"),
    ("exact, spectral 3", "exact", "spectral:3"),
    ("datainf", "datainf", "auto"),
    ("lissa", "lissa", "auto"),
    ("tracin", "tracin", "auto"),
    ("kronecker", "kronecker", "auto"),
    ("paper code", "paper", "auto"),
]
# Issue #25: every peer with a curvature on the damping grid hyperinf has (DataInf's rule × 0.1 and
# spectral 0.1–30), so each can be tuned as much as the default (bench/defaults_rule.py picks each one's
# setting on the selection seeds).  "datainf", "lissa" and "kronecker" above are each method's "auto".
PEER_GRID = [("datainf damping", "datainf"), ("spectral 0.1", "spectral:0.1"), ("spectral 1", "spectral:1"),
             ("spectral 3", "spectral:3"), ("spectral 10", "spectral:10"), ("spectral 30", "spectral:30")]
_AUTO = {"datainf": "datainf", "lissa": "datainf", "kronecker": None}  # the grid point "auto" already is
CANDIDATES += [(f"{m}, {name}", m, d) for m in ("exact", "datainf", "lissa", "kronecker") for name, d in PEER_GRID
               if not (m == "exact" and d in ("datainf", "spectral:3")) and _AUTO.get(m) != d]
# Issue #25 item 2(c): ``eigen`` (EK-FAC's eigenvalue correction on HyperINF's GFIM), its "auto" and the grid
CANDIDATES += [("eigen", "eigen", "auto")] + [(f"eigen, {name}", "eigen", d) for name, d in PEER_GRID]
_FAMILY = ["hyperinf", "exact", "datainf", "lissa", "tracin", "kronecker", "eigen", "paper"]
CANDIDATES.sort(key=lambda c: _FAMILY.index(c[1]))  # stable: each method's rows together, in the tables too
# Kronfluence EK-FAC: damping = scale × the mean eigenvalue per module (its heuristic, scale 0.1 by default),
# which is our "spectral" rule; the grid scales it as hyperinf's (and 0.01, near DataInf's rule).
EKFAC_SCALES: dict[str, float] = {EKFAC: 0.1, **{f"{EKFAC}, spectral {s:g}": s for s in (0.01, 1, 3, 10, 30)}}
# Issue #25 item 2: the query-side options of hyperinf at its default damping (bench/variants.py), then the
# two at spectral × 0.1 of amendment 3 (variants.DAMPED_LABELS); scored with ``variants.OPTIONS[label]`` passed
# to ``scores``.  Appended after the peers: earlier records keep their order.
VARIANT_CANDIDATES: list[tuple[str, str, str]] = [(l, "hyperinf", f"spectral:{variants.SCALES[l]:g}")
                                                  for l in variants.LABELS + variants.DAMPED_LABELS]
LABELS = [c[0] for c in CANDIDATES] + list(EKFAC_SCALES) + variants.LABELS + variants.DAMPED_LABELS
# The smaller grid on the embedded LLM (issue #16): the default, its neighbours, the paper's damping
# and every other method at its own default.  Issue #25 adds hyperinf's spectral 0.1 and 30 (every damping
# the frozen rule of bench/defaults_rule.py may choose) and each peer at the dampings hyperinf has here,
# then the external peers on the same model (LLM_PEER_LABELS, below).
LLM_LABELS = ["hyperinf, datainf damping", "hyperinf, paper damping", "hyperinf, spectral 0.1", "hyperinf, spectral 1",
              "hyperinf, spectral 3", "hyperinf, spectral 10", "hyperinf, spectral 30", "datainf", "lissa", "tracin",
              "kronecker"]
LLM_LABELS += [f"{m}, {d}" for m in ("datainf", "lissa", "kronecker")
               for d in ("datainf damping", "spectral 1", "spectral 3", "spectral 10")
               if f"{m}, {d}" in {c[0] for c in CANDIDATES}]
# Issue #25: the external peers on the LLM, scored on the same full-data model when installed — Kronfluence
# EK-FAC with a causal-LM task (bench/lds_ekfac.py ekfac_causal_pairwise_grid) on the same damping grid as the
# classifier's, and bergson 2.5.1's TrackStar (with and without the query set's curvature mixed in) and
# EK-FAC (bench/lds_bergson.py).  Appended: the labels before keep their records and their order.
LLM_PEER_LABELS = list(EKFAC_SCALES) + list(BERGSON_LABELS)
LLM_LABELS += LLM_PEER_LABELS + variants.LABELS
LLM_LABELS += ["eigen"] + [f"eigen, {d}" for d in ("datainf damping", "spectral 1", "spectral 3", "spectral 10")]
LLM_LABELS += variants.DAMPED_LABELS  # amendment 3 (bench/defaults_rule.py rule 1d)
# Sizes per model, when not given on the command line (the LLM's: its section of the README)
SIZES = {"minilm": dict(n_train=2000, n_val=200, epochs=5, max_length=64, subsets=32),
         "smollm2": dict(n_train=300, n_val=60, epochs=3, max_length=128, subsets=16)}


@dataclass(frozen=True)
class LdsConfig:
    """One seed's setting; its JSON is the key records are matched on (the subset count is not in it)."""

    seed: int = 0
    n_train: int = 2000
    n_val: int = 200
    epochs: int = 5
    rank: int = 8
    max_length: int = 64
    fraction: float = 0.5
    model: str | None = None  # None: the embedded MiniLM classifier; "smollm2": the embedded LLM

    def key(self) -> str:
        d = asdict(self)
        if d["model"] is None:
            del d["model"]  # the MiniLM records were written before the field existed
        return json.dumps(d, sort_keys=True)


def subset_members(n_train: int, fraction: float, seed: int, j: int) -> np.ndarray:
    """Sorted indices of subset ``j`` of ``seed``: round(fraction·n) distinct examples, uniformly drawn."""
    k = int(round(fraction * n_train))
    return np.sort(np.random.default_rng([int(seed), int(j)]).permutation(n_train)[:k])


def train_seed(seed: int, retrain: int) -> int:
    """The training seed (loader shuffle, dropout) of retrain ``retrain`` of data seed ``seed``: the data
    seed itself for retrain 0 (today's models), else a fixed draw from ``SeedSequence([seed, retrain])``,
    so no retrain of one seed repeats the schedule of another seed's models."""
    if retrain == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(retrain)]).generate_state(1)[0] & 0x7FFFFFFF)


class Experiment(Protocol):
    """What the runner needs from a model family (the MiniLM default here, a linear model in the tests)."""

    def subset_losses(self, members: np.ndarray, train_seed: int | None = None) -> dict[str, Any]:
        """Train on ``members`` from the shared initial state; {"val_loss": [Q], "val_accuracy": float} and
        optionally "val_margin": [Q].  ``train_seed``: the seed of the training randomness (loader
        shuffle, dropout) when it is not the data seed's (a retrain; the runner passes it only then)."""

    def score_sets(self, labels: Sequence[str]) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        """Train the full-data model once and yield (label, scores [Q, n_train], extra fields) per label;
        scores None with extra["error"] for a method that failed."""

    # optional: ``split_labels() -> (train labels [n_train], validation labels [Q])``, recorded once per seed


def _round(x: float) -> float:
    return float(f"{float(x):.9g}")  # 9 digits: far below any loss difference, a third of repr's size


def _retrain_of(record: dict) -> int:
    return int(record.get("retrain", 0))  # records written before retrains existed are retrain 0


def run(
    exp: Experiment,
    cfg: LdsConfig,
    runs: Path,
    n_subsets: int,
    labels: Sequence[str],
    log: Callable[[str], None] = print,
    retrains: Sequence[int] = (0,),
    lane: tuple[int, int] = (0, 1),
) -> None:
    """Measure the missing subset models of ``cfg`` (0..n_subsets−1, each for every retrain in
    ``retrains``), then the missing score sets; first the split's labels when the experiment gives them.

    ``lane=(k, n)``: only the subsets j with j mod n = k, and no score sets when n > 1 (a run without a lane
    scores them once the lanes' records are merged): n processes on copies of the records share a seed."""
    k, n_lanes = lane
    if not (n_lanes >= 1 and 0 <= k < n_lanes):
        raise ValueError(f"lane: expected k/n with 0 <= k < n, got {k}/{n_lanes}")
    key = json.loads(cfg.key())
    mine = [r for r in load_records(runs) if r["config"] == key]
    write_split(exp, key, runs, mine)
    have = {(r["subset"], _retrain_of(r)) for r in mine if r["kind"] == "subset"}
    # subset-major: an interrupted run leaves every retrain of its leading subsets, all the ceiling needs
    for j in range(k, n_subsets, n_lanes):
        for t in retrains:
            if (j, t) in have:
                continue
            members = subset_members(cfg.n_train, cfg.fraction, cfg.seed, j)
            t0 = time.perf_counter()
            res = exp.subset_losses(members) if t == 0 else exp.subset_losses(members, train_seed=train_seed(cfg.seed, t))
            rec = {"kind": "subset", "config": key, "subset": j, "n_members": int(members.size)}
            if t != 0:
                rec.update(retrain=int(t), train_seed=train_seed(cfg.seed, t))
            rec.update(val_loss=[_round(v) for v in res["val_loss"]], val_accuracy=float(res["val_accuracy"]))
            if res.get("val_margin") is not None:
                rec["val_margin"] = [_round(v) for v in res["val_margin"]]
            rec["seconds"] = time.perf_counter() - t0
            append_record(runs, rec)
            log(f"[lds] seed {cfg.seed} subset {j + 1}/{n_subsets}" + (f" retrain {t}" if t else "")
                + f": val acc {rec['val_accuracy']:.3f}, mean loss {np.mean(rec['val_loss']):.4f} ({rec['seconds']:.0f} s)")
    if n_lanes > 1:
        return
    scored = {r["label"] for r in mine if r["kind"] == "scores" and r["n_subsets"] >= n_subsets}
    todo = [l for l in labels if l not in scored]
    if not todo:
        return
    subsets = [subset_members(cfg.n_train, cfg.fraction, cfg.seed, j) for j in range(n_subsets)]
    for label, scores, extra in exp.score_sets(todo):
        if scores is None:  # the method failed (extra["error"] says why): recorded, not retried
            append_record(runs, {"kind": "scores", "config": key, "label": label, "n_subsets": n_subsets,
                           "predicted": None, **extra})
            log(f"[lds] seed {cfg.seed} {label} FAILED: {extra.get('error')}")
            continue
        scores = np.asarray(scores, dtype=np.float64)
        predicted = np.stack([scores[:, m].sum(axis=1) for m in subsets])  # [M, Q]
        append_record(runs, {"kind": "scores", "config": key, "label": label, "n_subsets": n_subsets,
                       "predicted": [[_round(v) for v in row] for row in predicted], **extra})
        log(f"[lds] seed {cfg.seed} scored {label}")


def write_split(exp: Any, key: dict, runs: Path, mine: list[dict] | None = None) -> bool:
    """Append the split's labels ({"kind": "split"}) once per config, when ``exp`` has ``split_labels``."""
    mine = [r for r in load_records(runs) if r["config"] == key] if mine is None else mine
    if any(r["kind"] == "split" for r in mine) or not hasattr(exp, "split_labels"):
        return False
    train, val = exp.split_labels()
    append_record(runs, {"kind": "split", "config": key, "train_labels": [int(y) for y in train],
                   "val_labels": [int(y) for y in val]})
    return True


def subset_table(records: list[dict], cfg_key: dict, field: str = "val_loss", retrain: int = 0) -> dict[int, list]:
    """{subset j: ``field`` [Q]} of one seed's subset models of one retrain (those that have the field)."""
    return {r["subset"]: r[field] for r in records if r["kind"] == "subset" and r["config"] == cfg_key
            and _retrain_of(r) == retrain and r.get(field) is not None}


def split_labels(records: list[dict], cfg_key: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(train labels, validation labels) of one seed's split record (None without one)."""
    rec = [r for r in records if r["kind"] == "split" and r["config"] == cfg_key]
    if not rec:
        return None
    return np.asarray(rec[-1]["train_labels"]), np.asarray(rec[-1]["val_labels"])


def matrices(records: list[dict], cfg_key: dict, label: str, n_subsets: int | None = None,
             field: str = "val_loss", retrain: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """(predicted, measured) [M, Q] of one seed and label over the leading subsets both have (None if < 2);
    measured = ``field`` of retrain ``retrain`` (default: the loss of the models measured first)."""
    subs = subset_table(records, cfg_key, field, retrain)
    score = [r for r in records if r["kind"] == "scores" and r["config"] == cfg_key and r["label"] == label]
    if not score or score[-1]["predicted"] is None:
        return None
    pred = score[-1]["predicted"]
    m = min(len(pred), n_subsets or len(pred))
    while m > 0 and any(j not in subs for j in range(m)):
        m -= 1  # an interrupted run: use the leading subsets measured so far
    if m < 2:
        return None
    return np.asarray(pred[:m], dtype=np.float64), np.asarray([subs[j] for j in range(m)], dtype=np.float64)


# ------------------------------------------------------------------------------ the embedded default


class PipelineExperiment:
    """An embedded model + LoRA on Rotten Tomatoes, through hyperinf_ext.app.tasks.pipeline: all-MiniLM-L6-v2
    as a classifier, or (``cfg.model="smollm2"``) SmolLM2-135M-Instruct on the reviews as sentiment
    instructions, its loss the mean over the answer tokens."""

    def __init__(self, cfg: LdsConfig, progress: bool = False, ekfac: bool = True, bergson: bool = True):
        from hyperinf_ext.app.tasks.pipeline import build_loaders, is_causal, model_dir, prepare_data
        from hyperinf_ext.app.models.training import load_tokenizer

        self.cfg, self.ekfac, self.bergson = cfg, ekfac, bergson
        self.pcfg = pipeline_config(cfg, progress)
        self.causal = is_causal(self.pcfg)
        self.data = prepare_data(self.pcfg, causal=self.causal)
        self.loaders = build_loaders(self.pcfg, self.data, load_tokenizer(model_dir(self.pcfg)))
        self._wrong = None  # the validation set with the other answer (the LLM's margin), built on first use

    def split_labels(self) -> tuple[list[int], list[int]]:
        return list(self.data.train.labels), list(self.data.val.labels)

    def train(self, members: np.ndarray | None, train_seed: int | None = None) -> Any:
        """Fine-tune a fresh LoRA (the shared initial adapter) on ``members`` (None: all); a TrainedModel.
        ``train_seed``: seed the loader's shuffle and the dropout with it instead of ``cfg.seed`` (a
        retrain); the initial adapter stays the data seed's."""
        from hyperinf_ext.app.tasks.pipeline import finetune_loader, load_model, train_model

        # a fresh LoRA seeded with cfg.seed: every model, retrains included, starts from the same adapter
        model = load_model(self.pcfg, self.data.num_labels, adapter=None)
        run_cfg = self.pcfg if train_seed is None else replace(self.pcfg, seed=int(train_seed))
        if members is None:
            loader = self.loaders.finetune
        else:
            loader = finetune_loader(run_cfg, self.data.train.subset(members.tolist()), self.loaders.tokenizer,
                                     [self.loaders.train_encodings[i] for i in members])
        return train_model(run_cfg, model, loader, self.loaders.evaluation, epochs=self.cfg.epochs)

    def subset_losses(self, members: np.ndarray, train_seed: int | None = None) -> dict[str, Any]:
        trained = self.train(members, train_seed)
        out = {"val_loss": per_example_losses(trained.model, self.loaders.evaluation),
               "val_accuracy": trained.val["accuracy"]}
        if self.causal and self.data.num_labels == 2:
            out["val_margin"] = self.answer_margins(trained.model)
        return out

    def answer_margins(self, model: Any) -> list[float]:
        """Per validation query: log p(correct answer | prompt) − log p(the other answer | prompt), each the
        sum over the answer's labelled tokens (end-of-turn tokens included), in dataset order."""
        if self._wrong is None:
            from hyperinf_ext.app.data.batching import make_loader
            from hyperinf_ext.app.data.instruction import encode_instructions
            from hyperinf_ext.app.tasks.pipeline_data import CAUSAL_FIT_BATCH_SIZE

            val = self.data.val
            wrong = val.with_labels([1 - int(y) for y in val.labels])
            enc = encode_instructions(wrong, self.loaders.tokenizer, self.cfg.max_length).encodings
            self._wrong = make_loader(wrong, self.loaders.tokenizer,
                                      batch_size=self.pcfg.fit_batch_size or CAUSAL_FIT_BATCH_SIZE,
                                      sort_by_length=True, max_length=self.cfg.max_length, encodings=enc)
        right = answer_logprobs(model, self.loaders.evaluation)
        return (np.asarray(right) - np.asarray(answer_logprobs(model, self._wrong))).tolist()

    def score_sets(self, labels: Sequence[str]) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        trained = self.train(None)
        full = {"full_val_accuracy": trained.val["accuracy"], "full_val_loss": trained.val["loss"]}
        if any(label in labels for label, _, _ in CANDIDATES + VARIANT_CANDIDATES):  # no fit when only peers are left
            yield from self._library_score_sets(trained, labels, full)
        if self.causal:
            yield from self._llm_peer_score_sets(trained, labels, full)
            return
        ek = {EKFAC_SCALES[l]: l for l in labels if l in EKFAC_SCALES}
        if ek and self.ekfac and self.cfg.model is None and _have_kronfluence():
            from bench.lds_ekfac import ekfac_pairwise_grid

            # one factor fit for the whole grid (Kronfluence wraps the model in place: once per model)
            with tempfile.TemporaryDirectory(prefix="lds_ekfac_", dir="/tmp") as workdir:
                for scale, s, seconds in ekfac_pairwise_grid(trained.model, self.loaders.tokenizer, self.data.train,
                                                             self.data.val, workdir, sorted(ek),
                                                             max_length=self.cfg.max_length):
                    yield ek[scale], s.numpy(), {**full, "method": "ekfac",
                                                 "damping": ["kronfluence heuristic", scale], "seconds": seconds}

    def _library_score_sets(self, trained: Any, labels: Sequence[str], full: dict
                            ) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        """Every (method, damping) of CANDIDATES in ``labels``, from one HyperINF fit of the full-data model."""
        from hyperinf_ext.curvature.methods import resolve
        from hyperinf_ext.curvature.methods import split_damping
        from hyperinf_ext.app.tasks.pipeline import fit_attributor, validation_gradients

        attr, _ = fit_attributor(self.pcfg, trained.model, self.loaders.influence_train)
        try:
            queries, _ = validation_gradients(attr, self.loaders.influence_val)
            for label, method, damping in CANDIDATES + VARIANT_CANDIDATES:
                if label not in labels:
                    continue
                rule, scale = split_damping(damping)
                rule_used, scale_used = resolve(method, rule, scale)
                options = variants.OPTIONS.get(label, {})
                # tracin has no curvature: no damping to report
                extra = {**full, "method": method, "damping": None if method == "tracin" else [rule_used, scale_used]}
                if options:
                    extra["options"] = options
                t0 = time.perf_counter()
                try:
                    attr.use(method, damping=rule, **({} if scale is None else {"damping_scale": scale}))
                    s = attr.scores(queries, **options).detach().cpu().double().numpy()
                    if not np.isfinite(s).all():  # e.g. the paper's fixed-start Schulz diverging
                        raise ArithmeticError("scores are not finite")
                except (ValueError, ArithmeticError, RuntimeError) as exc:
                    # a method that fails on this model is reported as failed; the others go on
                    yield label, None, {**extra, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                    continue
                lams = [f.damping for f in attr.factors.values()]
                yield label, s, {**extra, "damping_range": None if method == "tracin" else [min(lams), max(lams)],
                                 "seconds": time.perf_counter() - t0}
        finally:
            attr.cache.close()

    def _llm_peer_score_sets(self, trained: Any, labels: Sequence[str], full: dict
                             ) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        """Issue #25: the external peers on the causal LM's full-data model, each when installed (and not
        switched off): bergson's TrackStar and EK-FAC (bench/lds_bergson.py), then Kronfluence EK-FAC on the
        damping grid (bench/lds_ekfac.py).  bergson first: it saves the adapter, which Kronfluence's in-place
        wrapping of the model would rename.  Both read the pipeline's own encodings (prompt + response,
        labels −100 on the prompt): score column k = training example k, row q = validation example q."""
        from hyperinf_ext.app.data.instruction import encode_instructions
        from hyperinf_ext.app.tasks.pipeline_data import CAUSAL_FIT_BATCH_SIZE

        tok = self.loaders.tokenizer
        train_enc = self.loaders.train_encodings
        # the same encoding build_loaders made of the validation split (its loaders keep it only inside)
        val_enc = encode_instructions(self.data.val, tok, self.cfg.max_length).encodings
        cached = getattr(getattr(self.loaders.influence_val, "collate_fn", None), "cache", None)
        if cached is not None and list(cached) != val_enc:
            raise RuntimeError("the validation encodings differ from the loaders' (score rows would not match)")
        bg = [l for l in BERGSON_LABELS if l in labels]
        if bg and self.bergson and have_bergson():
            from bench.lds_bergson import bergson_score_sets

            with tempfile.TemporaryDirectory(prefix="lds_bergson_", dir="/tmp") as workdir:
                for label, s, extra in bergson_score_sets(trained.model, tok, train_enc, val_enc, workdir, bg):
                    yield label, s, {**full, **extra}
        ek = {EKFAC_SCALES[l]: l for l in labels if l in EKFAC_SCALES}
        if ek and self.ekfac and _have_kronfluence():
            from bench.lds_ekfac import ekfac_causal_pairwise_grid

            # one factor fit for the whole grid (Kronfluence wraps the model in place: once per model)
            with tempfile.TemporaryDirectory(prefix="lds_ekfac_", dir="/tmp") as workdir:
                for scale, s, seconds in ekfac_causal_pairwise_grid(
                        trained.model, tok, train_enc, val_enc, workdir, sorted(ek), max_length=self.cfg.max_length,
                        batch_size=self.pcfg.fit_batch_size or CAUSAL_FIT_BATCH_SIZE):
                    yield ek[scale], s.numpy(), {**full, "method": "ekfac",
                                                 "damping": ["kronfluence heuristic", scale], "seconds": seconds}


def pipeline_config(cfg: LdsConfig, progress: bool = False) -> Any:
    """The PipelineConfig of one seed (shared by the experiment and :func:`reconstruct_split`)."""
    from hyperinf_ext.app.tasks.pipeline import PipelineConfig

    return PipelineConfig(n_train=cfg.n_train, n_val=cfg.n_val, flip_rate=0.0, rank=cfg.rank, alpha=2 * cfg.rank,
                          epochs=cfg.epochs, max_length=cfg.max_length, seed=cfg.seed, progress=progress,
                          model=cfg.model)


def reconstruct_split(cfg_key: dict) -> tuple[np.ndarray, np.ndarray]:
    """The split's (train, validation) labels of a seed recorded before split records existed: the data
    split again from the config, as :class:`PipelineExperiment` does (data only, no model)."""
    from hyperinf_ext.app.tasks.pipeline import is_causal, prepare_data

    pcfg = pipeline_config(LdsConfig(**cfg_key))
    data = prepare_data(pcfg, causal=is_causal(pcfg))
    return np.asarray(data.train.labels), np.asarray(data.val.labels)


def _have_kronfluence() -> bool:
    import importlib.util

    return importlib.util.find_spec("kronfluence") is not None


def run_labels(llm: bool, no_ekfac: bool = False, no_bergson: bool = False,
               ekfac_scales: Sequence[float] | None = None) -> tuple[list[str], list[str]]:
    """The labels a run scores and what it skips: a peer that is not installed (or switched off) is left out,
    so a run whose other score sets are all recorded does not train the full-data model for nothing.
    MiniLM: every label but Kronfluence's base "kronfluence EK-FAC" label is kept as before (its grid labels
    are only scored when it is installed).  LLM: Kronfluence's grid and bergson's labels are left out whole.
    ``ekfac_scales``: only these scales of Kronfluence's grid (a reporting seed needs only the scale the
    frozen rule tuned on the selection seeds; each scale costs a pairwise pass, ~12 min on the LLM)."""
    labels, skipped = _run_labels(llm, no_ekfac, no_bergson)
    if ekfac_scales is None:
        return labels, skipped
    unknown = sorted(set(ekfac_scales) - set(EKFAC_SCALES.values()))
    if unknown:
        raise ValueError(f"--ekfac-scales: {unknown} not in the grid {sorted(EKFAC_SCALES.values())}")
    left = [l for l in labels if l in EKFAC_SCALES and EKFAC_SCALES[l] not in ekfac_scales]
    if left:
        skipped.append(f"{', '.join(left)} skipped (--ekfac-scales)")
    return [l for l in labels if l not in left], skipped


def _run_labels(llm: bool, no_ekfac: bool, no_bergson: bool) -> tuple[list[str], list[str]]:
    no_kf = no_ekfac or not _have_kronfluence()
    why_kf = "--no-ekfac" if no_ekfac else "kronfluence is not installed"
    if not llm:
        labels = [l for l in LABELS if not (l == EKFAC and no_kf)]
        return labels, [] if EKFAC in labels else [f"{EKFAC} skipped ({why_kf})"]
    no_bg = no_bergson or not have_bergson()
    labels = [l for l in LLM_LABELS if not (l in EKFAC_SCALES and no_kf) and not (l in BERGSON_LABELS and no_bg)]
    skipped = [f"{EKFAC} and its damping grid skipped ({why_kf})"] if no_kf else []
    if no_bg:
        skipped.append(f"{', '.join(BERGSON_LABELS)} skipped "
                       f"({'--no-bergson' if no_bergson else 'bergson is not installed'})")
    return labels, skipped


def per_example_losses(model: Any, loader: Any) -> list[float]:
    """The loss influence is computed on (``capture.default_loss_fn``: cross-entropy of a classifier, the
    mean over the labelled tokens of a causal LM) of every example of ``loader``, in dataset order
    (placed by ``batch["index"]``)."""
    import torch

    from hyperinf_ext.capture.losses import default_loss_fn

    out = np.full(len(loader.dataset), np.nan)
    model.eval()
    with torch.no_grad():
        for batch in loader:
            out[batch["index"].numpy()] = default_loss_fn(model, batch).double().cpu().numpy()
    if np.isnan(out).any():
        raise RuntimeError("per_example_losses: the loader did not cover every example")
    return out.tolist()


def answer_logprobs(model: Any, loader: Any) -> list[float]:
    """log p(response | prompt) of every example of an instruction ``loader``: the sum over its labelled
    tokens of the next-token log-probability, in dataset order (placed by ``batch["index"]``)."""
    import torch

    from hyperinf_ext.capture.losses import model_inputs

    out = np.full(len(loader.dataset), np.nan)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for batch in loader:
            b = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            logits = model(**model_inputs(b)).logits[:, :-1].float()
            target = b["labels"][:, 1:]
            mask = target != -100
            picked = logits.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            logp = (picked - torch.logsumexp(logits, dim=-1)) * mask
            out[batch["index"].numpy()] = logp.sum(dim=1).double().cpu().numpy()
    if np.isnan(out).any():
        raise RuntimeError("answer_logprobs: the loader did not cover every example")
    return out.tolist()


# ------------------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lds", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1", help="comma list of seeds (default: 0,1)")
    p.add_argument("--subsets", type=int, default=None, help="subset models per seed, M (default: 32; 16 for smollm2)")
    p.add_argument("--n-train", type=int, default=None, help="default: 2000 (300 for smollm2)")
    p.add_argument("--n-val", type=int, default=None, help="default: 200 (60 for smollm2)")
    p.add_argument("--epochs", type=int, default=None, help="default: 5 (3 for smollm2)")
    p.add_argument("--max-length", type=int, default=None, help="default: 64 (128 for smollm2)")
    p.add_argument("--model", choices=("minilm", "smollm2"), default="minilm",
                   help="smollm2: the smaller grid on the embedded LLM (default sizes 300/60, 3 epochs, max length "
                        "128, 16 subsets; records bench/lds_llm_runs.jsonl, report bench/LDS_LLM.md)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per interval (default: 1000)")
    p.add_argument("--no-ekfac", action="store_true", help="skip Kronfluence EK-FAC even when installed")
    p.add_argument("--no-bergson", action="store_true",
                   help="smollm2: skip bergson's TrackStar and EK-FAC even when installed")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (64 train, 16 val, 4 subsets, 1 epoch) -> /tmp")
    p.add_argument("--runs", type=Path, default=None, help="default bench/lds_runs.jsonl (lds_llm_runs.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="default bench/LDS.md (LDS_LLM.md)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the records")
    p.add_argument("--retrain-seeds", default="0",
                   help="comma list of retrains r of every subset model (default 0: the models of today; e.g. "
                        "0,1,2 for the noise ceiling; r > 0 reseeds the shuffle and dropout, not the initial adapter)")
    p.add_argument("--lane", default="0/1",
                   help="K/N: measure only the subsets j with j mod N = K and no score sets (N > 1), on a copy of "
                        "the records (--runs) merged back with bench.records; e.g. 0/2 and 1/2 on two cores")
    p.add_argument("--ekfac-scales", default=None,
                   help="only these scales of Kronfluence's damping grid, comma list (default: all of "
                        f"{','.join(f'{v:g}' for v in sorted(EKFAC_SCALES.values()))}; a reporting seed needs only "
                        "the tuned one, bench/LDS_LLM.md 'Peers tuned')")
    p.add_argument("--split-only", action="store_true",
                   help="only record each seed's split labels (for the same-label baseline; no training)")
    args = p.parse_args(argv)
    llm = args.model == "smollm2"
    for k, v in SIZES[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.runs = args.runs or HERE / ("lds_llm_runs.jsonl" if llm else "lds_runs.jsonl")
    args.out = args.out or HERE / ("LDS_LLM.md" if llm else "LDS.md")
    base = LdsConfig(n_train=args.n_train, n_val=args.n_val, epochs=args.epochs, max_length=args.max_length,
                     model="smollm2" if llm else None)
    if args.smoke:
        base = LdsConfig(n_train=64, n_val=16, epochs=1, max_length=32, model=base.model)
        args.subsets, args.n_boot = 4, 200
        if args.runs.parent == HERE:
            args.runs, args.out = Path("/tmp/hyperinf_lds_smoke.jsonl"), Path("/tmp/hyperinf_LDS_smoke.md")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    retrains = sorted({int(t) for t in args.retrain_seeds.split(",") if t.strip()})
    if not retrains or min(retrains) < 0:
        p.error("--retrain-seeds: a comma list of integers >= 0")
    try:
        lane = tuple(int(x) for x in args.lane.split("/"))
        if len(lane) != 2 or not 0 <= lane[0] < lane[1]:
            raise ValueError
    except ValueError:
        p.error(f"--lane: expected K/N with 0 <= K < N, got {args.lane!r}")
    try:
        ekfac_scales = None if args.ekfac_scales is None else [float(x) for x in args.ekfac_scales.split(",") if x.strip()]
    except ValueError:
        p.error(f"--ekfac-scales: expected a comma list of numbers, got {args.ekfac_scales!r}")
    configs = [replace(base, seed=s) for s in seeds]
    if args.split_only and not args.report_only:
        for cfg in configs:
            if write_split(PipelineExperiment(cfg), json.loads(cfg.key()), args.runs):
                print(f"[lds] seed {cfg.seed}: split labels recorded in {args.runs}")
    elif not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        try:
            labels, skipped = run_labels(llm, args.no_ekfac, args.no_bergson, ekfac_scales)
        except ValueError as exc:
            p.error(str(exc))
        for note in skipped:
            print(f"[lds] {note}")
        for cfg in configs:
            print(f"[lds] {cfg}", flush=True)
            exp = PipelineExperiment(cfg, progress=args.progress, ekfac=not args.no_ekfac, bergson=not args.no_bergson)
            run(exp, cfg, args.runs, args.subsets, labels, log=lambda s: print(s, flush=True), retrains=retrains,
                lane=lane)
    from bench.lds_report import write_report

    command = "python -m bench.lds" + (" --model smollm2" if llm else "") + (" --smoke" if args.smoke else "")
    # every subset model a seed has scored, whatever --subsets this invocation used (a run that adds seed 0's
    # peers at --subsets 12 must not cut seed 1's table to 12 of its 16 subsets)
    text = write_report(load_records(args.runs), args.out, command, n_subsets=None, n_boot=args.n_boot,
                        labels=LLM_LABELS if llm else LABELS, choose_damping=not llm,
                        split=reconstruct_split, rule=not args.smoke,
                        classifier_records=load_records(HERE / "lds_runs.jsonl") if llm else None)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
