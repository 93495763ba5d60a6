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
path when kronfluence is installed.

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

Records (JSON lines): ``{"kind": "subset", "config", "subset": j, "val_loss": [Q], ...}`` per subset model
and ``{"kind": "scores", "config", "label", "n_subsets": M, "predicted": [M][Q], ...}`` per score set
(the predicted subset effects, not the [Q, n_train] scores, keep the file small; a later run with more
subsets re-scores).  bench/lds_report.py writes the Markdown and the plot from them.
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
LABELS = [c[0] for c in CANDIDATES] + [EKFAC]
# The smaller grid on the embedded LLM (issue #16): the default, its neighbours, the paper's damping
# and every other method at its own default.  No EK-FAC: bench/quality_ekfac.py drives a classifier.
LLM_LABELS = ["hyperinf, datainf damping", "hyperinf, paper damping", "hyperinf, spectral 1", "hyperinf, spectral 3",
              "hyperinf, spectral 10", "datainf", "lissa", "tracin", "kronecker"]
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


class Experiment(Protocol):
    """What the runner needs from a model family (the MiniLM default here, a linear model in the tests)."""

    def subset_losses(self, members: np.ndarray) -> dict[str, Any]:
        """Train on ``members`` from the shared initial state; {"val_loss": [Q], "val_accuracy": float}."""

    def score_sets(self, labels: Sequence[str]) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        """Train the full-data model once and yield (label, scores [Q, n_train], extra fields) per label;
        scores None with extra["error"] for a method that failed."""


def load_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, record: dict) -> None:
    # one line per record, flushed at once: a kill loses at most the record being measured
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _round(x: float) -> float:
    return float(f"{float(x):.9g}")  # 9 digits: far below any loss difference, a third of repr's size


def run(
    exp: Experiment,
    cfg: LdsConfig,
    runs: Path,
    n_subsets: int,
    labels: Sequence[str],
    log: Callable[[str], None] = print,
) -> None:
    """Measure the missing subset models of ``cfg`` (0..n_subsets−1), then the missing score sets."""
    key = json.loads(cfg.key())
    mine = [r for r in load_records(runs) if r["config"] == key]
    have = {r["subset"] for r in mine if r["kind"] == "subset"}
    for j in range(n_subsets):
        if j in have:
            continue
        members = subset_members(cfg.n_train, cfg.fraction, cfg.seed, j)
        t0 = time.perf_counter()
        res = exp.subset_losses(members)
        rec = {"kind": "subset", "config": key, "subset": j, "n_members": int(members.size),
               "val_loss": [_round(v) for v in res["val_loss"]], "val_accuracy": float(res["val_accuracy"]),
               "seconds": time.perf_counter() - t0}
        _append(runs, rec)
        log(f"[lds] seed {cfg.seed} subset {j + 1}/{n_subsets}: val acc {rec['val_accuracy']:.3f}, "
            f"mean loss {np.mean(rec['val_loss']):.4f} ({rec['seconds']:.0f} s)")
    scored = {r["label"] for r in mine if r["kind"] == "scores" and r["n_subsets"] >= n_subsets}
    todo = [l for l in labels if l not in scored]
    if not todo:
        return
    subsets = [subset_members(cfg.n_train, cfg.fraction, cfg.seed, j) for j in range(n_subsets)]
    for label, scores, extra in exp.score_sets(todo):
        if scores is None:  # the method failed (extra["error"] says why): recorded, not retried
            _append(runs, {"kind": "scores", "config": key, "label": label, "n_subsets": n_subsets,
                           "predicted": None, **extra})
            log(f"[lds] seed {cfg.seed} {label} FAILED: {extra.get('error')}")
            continue
        scores = np.asarray(scores, dtype=np.float64)
        predicted = np.stack([scores[:, m].sum(axis=1) for m in subsets])  # [M, Q]
        _append(runs, {"kind": "scores", "config": key, "label": label, "n_subsets": n_subsets,
                       "predicted": [[_round(v) for v in row] for row in predicted], **extra})
        log(f"[lds] seed {cfg.seed} scored {label}")


def matrices(records: list[dict], cfg_key: dict, label: str, n_subsets: int | None = None
             ) -> tuple[np.ndarray, np.ndarray] | None:
    """(predicted, measured) [M, Q] of one seed and label over the subsets both have (None if < 2)."""
    subs = {r["subset"]: r["val_loss"] for r in records if r["kind"] == "subset" and r["config"] == cfg_key}
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

    def __init__(self, cfg: LdsConfig, progress: bool = False, ekfac: bool = True):
        from hyperinf_ext.app.tasks.pipeline import PipelineConfig, build_loaders, is_causal, model_dir, prepare_data
        from hyperinf_ext.app.models.training import load_tokenizer

        self.cfg, self.ekfac = cfg, ekfac
        self.pcfg = PipelineConfig(n_train=cfg.n_train, n_val=cfg.n_val, flip_rate=0.0, rank=cfg.rank,
                                   alpha=2 * cfg.rank, epochs=cfg.epochs, max_length=cfg.max_length,
                                   seed=cfg.seed, progress=progress, model=cfg.model)
        self.data = prepare_data(self.pcfg, causal=is_causal(self.pcfg))
        self.loaders = build_loaders(self.pcfg, self.data, load_tokenizer(model_dir(self.pcfg)))

    def train(self, members: np.ndarray | None) -> Any:
        """Fine-tune a fresh LoRA (the shared initial adapter) on ``members`` (None: all); a TrainedModel."""
        from hyperinf_ext.app.tasks.pipeline import finetune_loader, load_model, train_model

        # a fresh LoRA seeded with cfg.seed: every model starts from the same adapter
        model = load_model(self.pcfg, self.data.num_labels, adapter=None)
        if members is None:
            loader = self.loaders.finetune
        else:
            loader = finetune_loader(self.pcfg, self.data.train.subset(members.tolist()), self.loaders.tokenizer,
                                     [self.loaders.train_encodings[i] for i in members])
        return train_model(self.pcfg, model, loader, self.loaders.evaluation, epochs=self.cfg.epochs)

    def subset_losses(self, members: np.ndarray) -> dict[str, Any]:
        trained = self.train(members)
        return {"val_loss": per_example_losses(trained.model, self.loaders.evaluation),
                "val_accuracy": trained.val["accuracy"]}

    def score_sets(self, labels: Sequence[str]) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        from hyperinf_ext.curvature.methods import resolve
        from hyperinf_ext.curvature.methods import split_damping
        from hyperinf_ext.app.tasks.pipeline import fit_attributor, validation_gradients

        trained = self.train(None)
        full = {"full_val_accuracy": trained.val["accuracy"], "full_val_loss": trained.val["loss"]}
        attr, _ = fit_attributor(self.pcfg, trained.model, self.loaders.influence_train)
        try:
            queries, _ = validation_gradients(attr, self.loaders.influence_val)
            for label, method, damping in CANDIDATES:
                if label not in labels:
                    continue
                rule, scale = split_damping(damping)
                rule_used, scale_used = resolve(method, rule, scale)
                # tracin has no curvature: no damping to report
                extra = {**full, "method": method, "damping": None if method == "tracin" else [rule_used, scale_used]}
                t0 = time.perf_counter()
                try:
                    attr.use(method, damping=rule, **({} if scale is None else {"damping_scale": scale}))
                    s = attr.scores(queries).detach().cpu().double().numpy()
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
        if EKFAC in labels and self.ekfac and self.cfg.model is None and _have_kronfluence():
            from bench.quality_ekfac import ekfac_pairwise_scores

            with tempfile.TemporaryDirectory(prefix="lds_ekfac_", dir="/tmp") as workdir:
                s, seconds = ekfac_pairwise_scores(trained.model, self.loaders.tokenizer, self.data.train,
                                                   self.data.val, workdir, max_length=self.cfg.max_length)
            yield EKFAC, s.numpy(), {**full, "method": "ekfac", "damping": ["kronfluence heuristic", 0.1],
                                     "seconds": seconds}


def _have_kronfluence() -> bool:
    import importlib.util

    return importlib.util.find_spec("kronfluence") is not None


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
    p.add_argument("--smoke", action="store_true", help="tiny sizes (64 train, 16 val, 4 subsets, 1 epoch) -> /tmp")
    p.add_argument("--runs", type=Path, default=None, help="default bench/lds_runs.jsonl (lds_llm_runs.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="default bench/LDS.md (LDS_LLM.md)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the records")
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
    configs = [replace(base, seed=s) for s in seeds]
    if not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        labels = LLM_LABELS if llm else [l for l in LABELS if not (l == EKFAC and (args.no_ekfac or not _have_kronfluence()))]
        if EKFAC not in labels and not llm:
            print(f"[lds] {EKFAC} skipped ({'--no-ekfac' if args.no_ekfac else 'kronfluence is not installed'})")
        for cfg in configs:
            print(f"[lds] {cfg}", flush=True)
            exp = PipelineExperiment(cfg, progress=args.progress, ekfac=not args.no_ekfac)
            run(exp, cfg, args.runs, args.subsets, labels, log=lambda s: print(s, flush=True))
    from bench.lds_report import write_report

    command = "python -m bench.lds" + (" --model smollm2" if llm else "") + (" --smoke" if args.smoke else "")
    text = write_report(load_records(args.runs), args.out, command, n_subsets=args.subsets, n_boot=args.n_boot,
                        labels=LLM_LABELS if llm else LABELS, choose_damping=not llm)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
