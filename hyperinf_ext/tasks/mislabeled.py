"""Mislabeled-data detection: flip a fraction of training labels, fine-tune, rank by influence.

Pipeline (:func:`run_detect_mislabeled`): load and split the data → flip ``flip_rate`` of the
training labels (seeded) → fine-tune a LoRA model on the noisy labels → fit :class:`HyperINF` ONCE
on the noisy training set (one backward per example, gradients cached in memory) → for every
method/damping, ``attr.use(...)`` + ``mean_scores`` on the validation set (all methods share the
cached gradients) → ROC-AUC and detection curves of "flipped vs clean" with the score as suspicion.

Sign: a positive score means up-weighting the example raises the validation loss
(``attributor.SIGN_CONVENTION``), so mislabeled examples should score HIGH.

The shared building blocks (:class:`PipelineConfig`, :func:`prepare_data`, :func:`train_model`,
:func:`fit_attributor`, :func:`validation_gradients`, :func:`score_method`) are also used by :mod:`.selection`.
Nothing here prints; stage messages go to an optional ``log`` callable and progress bars to tqdm.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..damping import DAMPING_RULES, check_rule
from ..data import TextDataset, flip_labels, load_rotten_tomatoes, load_text_file, make_loader, split_dataset
from ..errors import ConvergenceError
from .metrics import detection_curve, found_at, roc_auc
from .output import prepare_output_dir

__all__ = [
    "ALL_METHODS",
    "DEFAULT_EPOCHS",
    "PipelineConfig",
    "DetectConfig",
    "MethodResult",
    "DetectResult",
    "PreparedData",
    "parse_methods",
    "parse_dampings",
    "prepare_data",
    "train_model",
    "fit_attributor",
    "validation_gradients",
    "score_method",
    "run_detect_mislabeled",
    "format_table",
]

ALL_METHODS: tuple[str, ...] = ("hyperinf", "datainf", "lissa", "tracin", "exact")
"""The methods compared by default (``paper`` is available but not run unless asked for)."""
DEFAULT_EPOCHS = 3
FOUND_FRACTIONS = (0.1, 0.2)

Log = Callable[[str], None] | None


# ------------------------------------------------------------------------------ configuration


@dataclass
class PipelineConfig:
    """Settings shared by the data → fine-tune → fit pipeline of every task."""

    data: Path | None = None
    """CSV/JSONL file with text and label columns; None = the embedded Rotten Tomatoes data."""
    text_column: str = "text"
    label_column: str = "label"
    n_train: int = 2000
    n_val: int = 300
    flip_rate: float = 0.0
    """Fraction of training labels flipped (seeded), in [0, 1)."""
    model: Path | None = None
    """Base model folder; None = the embedded all-MiniLM-L6-v2."""
    adapter: Path | None = None
    """A saved PEFT adapter to start from instead of a fresh LoRA."""
    rank: int = 8
    alpha: int = 16
    epochs: int | None = None
    """Fine-tuning epochs; None = 3 for a fresh LoRA, 0 when an adapter is given."""
    lr: float = 3e-4
    batch_size: int = 16
    max_length: int = 64
    fit_batch_size: int = 32
    """Batch size of the influence passes (fit and validation gradients)."""
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    out: Path = Path("hyperinf-out")

    @property
    def resolved_epochs(self) -> int:
        if self.epochs is not None:
            return int(self.epochs)
        return 0 if self.adapter is not None else DEFAULT_EPOCHS

    def validate(self) -> None:
        """Cheap checks run before anything slow is loaded; raises ValueError with one-line messages."""
        if self.n_train < 1:
            raise ValueError(f"--n-train must be >= 1, got {self.n_train}")
        if self.n_val < 1:
            raise ValueError(f"--n-val must be >= 1, got {self.n_val}")
        if not (isinstance(self.flip_rate, (int, float)) and 0.0 <= self.flip_rate < 1.0):
            raise ValueError(f"--flip-rate must be in [0, 1), got {self.flip_rate}")
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"--rank must be >= 1 and --alpha > 0, got rank={self.rank}, alpha={self.alpha}")
        if self.epochs is not None and self.epochs < 0:
            raise ValueError(f"--epochs must be >= 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.batch_size < 1 or self.fit_batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.max_length < 2:
            raise ValueError(f"--max-length must be >= 2, got {self.max_length}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available on this machine")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def settings(self) -> dict[str, Any]:
        """JSON-ready settings, with the resolved epochs and default paths filled in."""
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out["epochs"] = self.resolved_epochs
        out["data"] = str(self.data) if self.data is not None else "rotten_tomatoes (embedded)"
        out["model"] = str(self.model) if self.model is not None else "all-MiniLM-L6-v2 (embedded)"
        return out


@dataclass
class DetectConfig(PipelineConfig):
    """Settings of ``detect-mislabeled``."""

    flip_rate: float = 0.2
    methods: Sequence[str] = ALL_METHODS
    dampings: Sequence[float | str] = ("auto",)
    out: Path = Path("hyperinf-out/detect")

    def validate(self) -> None:
        super().validate()
        parse_methods(list(self.methods))
        parse_dampings(list(self.dampings))
        if round(self.flip_rate * self.n_train) < 1:
            raise ValueError(
                f"--flip-rate {self.flip_rate} flips no label of {self.n_train} training examples: nothing to detect"
            )
        if round(self.flip_rate * self.n_train) >= self.n_train:
            raise ValueError("--flip-rate flips every training label: there are no clean examples to compare with")


def parse_methods(value: str | Sequence[str], option: str = "--methods") -> list[str]:
    """``"hyperinf,exact"`` or a list → validated method names (duplicates dropped, order kept)."""
    from ..methods import METHODS

    items = [m.strip() for m in value.split(",")] if isinstance(value, str) else [str(m).strip() for m in value]
    items = [m for m in items if m]
    if not items:
        raise ValueError(f"{option}: no method given")
    for m in items:
        if m not in METHODS:
            raise ValueError(f"{option}: unknown method {m!r}; expected one of {', '.join(sorted(METHODS))}")
    return list(dict.fromkeys(items))


def parse_dampings(value: str | Sequence[float | str]) -> list[float | str]:
    """``"datainf,1e-3,spectral:3"`` or a list → validated damping rules (floats must be > 0).

    ``rule:scale`` (e.g. ``spectral:3``) gives a rule its factor (``damping_scale``); it is kept as the
    normalised string ``"spectral:3"``, which :func:`split_damping` takes apart.
    """
    raw = [d.strip() for d in value.split(",")] if isinstance(value, str) else list(value)
    out: list[float | str] = []
    for d in raw:
        if isinstance(d, str) and ":" in d:
            rule, _, factor = d.partition(":")
            try:
                scale = float(factor)
            except ValueError:
                raise ValueError(f"--damping: {d!r}: the factor after ':' must be a number") from None
            rule = rule.strip()
            # a factor only scales a named rule; "auto" already picks each method's own factor
            if rule not in DAMPING_RULES or rule == "auto" or not (math.isfinite(scale) and scale > 0):
                named = "|".join(r for r in DAMPING_RULES if r != "auto")
                raise ValueError(f"--damping: {d!r}: expected {named}:<factor > 0>")
            out.append(f"{rule}:{scale:g}")
            continue
        if isinstance(d, str):
            if not d:
                continue
            try:
                d = float(d)
            except ValueError:
                pass
        try:
            d = check_rule(d)
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None
        # every method but tracin divides by λ (DataInf's 1/λ, the Schulz lower bound)
        if isinstance(d, float) and d <= 0:
            raise ValueError(f"--damping: a numeric damping must be > 0, got {d}")
        out.append(d)
    if not out:
        raise ValueError("--damping: no value given")
    return list(dict.fromkeys(out))


def damping_label(d: float | str) -> str:
    return f"{d:g}" if isinstance(d, float) else str(d)


def split_damping(d: float | str) -> tuple[float | str, float | None]:
    """A parsed damping → (rule, damping_scale or None): ``"spectral:3"`` → ("spectral", 3.0)."""
    if isinstance(d, str) and ":" in d:
        rule, _, factor = d.partition(":")
        return rule, float(factor)
    return d, None


# ------------------------------------------------------------------------------ shared pipeline


@dataclass
class PreparedData:
    """The split data; ``train`` carries the labels used for training (possibly flipped)."""

    train: TextDataset
    val: TextDataset
    original_labels: list[int]
    flipped: np.ndarray  # bool [n_train]
    source: str
    n_rows: int

    @property
    def label_names(self) -> list[str]:
        return self.train.label_names or [str(k) for k in range(self.train.num_classes)]


def prepare_data(cfg: PipelineConfig) -> PreparedData:
    """Load, split and (when ``cfg.flip_rate > 0``) flip training labels, all seeded with ``cfg.seed``."""
    if cfg.data is None:
        ds = load_rotten_tomatoes()
        source = "rotten_tomatoes (embedded)"
    else:
        ds = load_text_file(cfg.data, cfg.text_column, cfg.label_column)
        source = str(cfg.data)
    train, val = split_dataset(ds, cfg.n_train, cfg.n_val, seed=cfg.seed)
    original = list(train.labels)
    if cfg.flip_rate > 0:
        noisy, flipped = flip_labels(original, cfg.flip_rate, seed=cfg.seed, num_classes=ds.num_classes)
        train = train.with_labels(noisy)
        flipped_np = flipped.numpy().astype(bool)
    else:
        flipped_np = np.zeros(len(train), dtype=bool)
    return PreparedData(train, val, original, flipped_np, source, len(ds))


@dataclass
class TrainedModel:
    model: Any
    tokenizer: Any
    history: list[dict]
    seconds: float
    val: dict[str, float]  # accuracy, loss


def load_model(cfg: PipelineConfig, num_labels: int, *, adapter: Path | None | str = "config") -> tuple[Any, Any]:
    """(model on ``cfg.device``, tokenizer); ``adapter="config"`` uses ``cfg.adapter``."""
    from ..training import load_lora_model, load_tokenizer

    tok = load_tokenizer(cfg.model)
    model = load_lora_model(
        cfg.model,
        num_labels=num_labels,
        rank=cfg.rank,
        alpha=cfg.alpha,
        adapter=cfg.adapter if adapter == "config" else adapter,
        seed=cfg.seed,
    )
    return model.to(cfg.device), tok


def train_model(
    cfg: PipelineConfig,
    train: TextDataset,
    val: TextDataset,
    *,
    epochs: int | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    log: Log = None,
    what: str = "fine-tune",
) -> TrainedModel:
    """Fine-tune (``epochs``, default ``cfg.resolved_epochs``) on ``train`` and evaluate on ``val``."""
    from ..training import evaluate, finetune

    model, tok = model_and_tokenizer or load_model(cfg, max(train.num_classes, val.num_classes))
    epochs = cfg.resolved_epochs if epochs is None else epochs
    t0 = time.perf_counter()
    history: list[dict] = []
    if epochs > 0:
        loader = make_loader(train, tok, batch_size=cfg.batch_size, shuffle=True, sort_by_length=True,
                             seed=cfg.seed, max_length=cfg.max_length)
        _log(log, f"{what}: {len(train)} examples, {epochs} epoch(s)")
        history = finetune(model, loader, epochs=epochs, lr=cfg.lr, seed=cfg.seed, progress=cfg.progress,
                           log=(lambda s: _log(log, f"  {s}")) if log else None)
    seconds = time.perf_counter() - t0
    val_metrics = evaluate(model, _eval_loader(val, tok, cfg))
    _log(log, f"{what}: validation accuracy {val_metrics['accuracy']:.4f}")
    return TrainedModel(model, tok, history, seconds, val_metrics)


def _eval_loader(ds: TextDataset, tok: Any, cfg: PipelineConfig):
    return make_loader(ds, tok, batch_size=max(cfg.fit_batch_size, 32), sort_by_length=True, max_length=cfg.max_length)


def fit_attributor(cfg: PipelineConfig, trained: TrainedModel, train: TextDataset, log: Log = None) -> tuple[Any, float]:
    """Fit HyperINF once on ``train`` (gradients cached in memory); returns (attributor, wall seconds).

    The attributor starts as ``tracin`` so the fit's closing ``prepare`` is free: every method's own
    preparation is then timed in :func:`score_method`, not hidden in the shared fit time.
    """
    from ..attributor import HyperINF

    loader = make_loader(train, trained.tokenizer, batch_size=cfg.fit_batch_size, sort_by_length=True,
                         max_length=cfg.max_length)
    _log(log, f"influence: per-example gradients of {len(train)} training examples")
    attr = HyperINF(trained.model, method="tracin", progress=cfg.progress, cache="memory")
    t0 = time.perf_counter()
    attr.fit(loader)
    return attr, time.perf_counter() - t0


_SCORING_STAGES = ("prepare", "precondition", "dot")


def validation_gradients(attr: Any, val_loader: Any) -> tuple[Any, float]:
    """Per-example validation gradients (``attr.query_gradients``) and their wall seconds.

    They do not depend on the method, so the tasks compute them once (one backward per validation
    example) and pass them to ``mean_scores`` for every method/damping.
    """
    t0 = time.perf_counter()
    queries = attr.query_gradients(val_loader, "validation gradients")
    return queries, time.perf_counter() - t0


def score_method(attr: Any, queries: Any, method: str, damping: float | str) -> tuple[np.ndarray, dict[str, float]]:
    """Mean-validation-loss influence of every training example under one method/damping.

    ``queries`` comes from :func:`validation_gradients`.  Returns (scores [n_train] float64, timing)
    where ``timing["seconds"]`` is the method's own work: prepare + preconditioning + dot products
    with the cached training gradients (from ``attr.timings``).
    """
    before = dict(attr.timings)
    rule, scale = split_damping(damping)
    # without an explicit damping_scale, use() resets it to the rule's default
    attr.use(method, damping=rule, **({} if scale is None else {"damping_scale": scale}))
    scores = attr.mean_scores(queries)
    after = attr.timings
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in _SCORING_STAGES}
    timing = {"seconds": sum(delta.values()), **{f"{k}_seconds": v for k, v in delta.items()}}
    return scores.detach().cpu().double().numpy(), timing


def _log(log: Log, message: str) -> None:
    if log is not None:
        log(message)


# ------------------------------------------------------------------------------ detection task


@dataclass
class MethodResult:
    """Detection quality and cost of one method/damping."""

    method: str
    damping: str
    label: str
    column: str
    auc: float | None = None
    found: dict[str, float] = field(default_factory=dict)  # "10%" -> fraction of flipped found
    seconds: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class DetectResult:
    """Everything ``detect-mislabeled`` measured; ``summary()`` is what summary.json holds."""

    config: DetectConfig
    n_train: int
    n_val: int
    n_flipped: int
    source: str
    finetune_seconds: float
    finetune_history: list[dict]
    val_accuracy: float
    val_loss: float
    fit_seconds: float
    fit_timings: dict[str, float]
    query_seconds: float
    warmup_seconds: float
    methods: list[MethodResult]
    paths: dict[str, str]
    total_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "task": "detect-mislabeled",
            "settings": self.config.settings(),
            "data": {"source": self.source, "n_train": self.n_train, "n_val": self.n_val,
                     "n_flipped": self.n_flipped},
            "finetune": {"seconds": self.finetune_seconds, "history": self.finetune_history,
                         "val_accuracy": self.val_accuracy, "val_loss": self.val_loss},
            "influence_fit": {"seconds": self.fit_seconds, "timings": self.fit_timings,
                              "note": "shared by every method: one backward per training example, gradients cached"},
            "query_gradient_seconds": self.query_seconds,
            "warmup_seconds": self.warmup_seconds,
            "methods": [asdict(m) for m in self.methods],
            "outputs": self.paths,
            "total_seconds": self.total_seconds,
        }


def run_detect_mislabeled(cfg: DetectConfig, log: Log = None) -> DetectResult:
    """Run the mislabeled-data detection experiment and write its outputs into ``cfg.out``.

    Outputs: ``detection.png`` (fraction of flipped found vs fraction inspected, per method, with the
    random diagonal), ``scores.csv`` (one row per training example) and ``summary.json``.

    Raises:
        DataError / ValueError: bad settings or inputs (one-line messages).
    """
    from .plots import plot_detection_curves

    t_start = time.perf_counter()
    cfg.validate()
    methods = parse_methods(list(cfg.methods))
    dampings = parse_dampings(list(cfg.dampings))
    out = prepare_output_dir(cfg.out)  # fail on an unusable folder before minutes of work

    data = prepare_data(cfg)
    n_flipped = int(data.flipped.sum())
    _log(log, f"data: {data.source}: {len(data.train)} train ({n_flipped} flipped) / {len(data.val)} val")
    trained = train_model(cfg, data.train, data.val, log=log)
    attr, fit_seconds = fit_attributor(cfg, trained, data.train, log=log)
    fit_timings = {k: v for k, v in attr.timings.items()}
    val_loader = make_loader(data.val, trained.tokenizer, batch_size=cfg.fit_batch_size, sort_by_length=True,
                             max_length=cfg.max_length)
    _log(log, f"influence: gradient of the mean validation loss ({len(data.val)} examples)")
    queries, query_seconds = validation_gradients(attr, val_loader)
    # The first pass over the cached gradients pays one-off costs (fresh float64 buffers, page
    # faults) that would otherwise be billed to whichever method is scored first: a separate
    # tracin pass takes them (in a default run the first pass was ~6x a later one).
    t0 = time.perf_counter()
    attr.use("tracin")
    attr.mean_scores(queries)
    warmup_seconds = time.perf_counter() - t0

    results: list[MethodResult] = []
    scores: dict[str, np.ndarray] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        for method, damping in _runs(methods, dampings):
            dl = damping_label(damping) if method != "tracin" else "-"
            label = method if len(dampings) == 1 or method == "tracin" else f"{method} (λ={dl})"
            column = method if len(dampings) == 1 or method == "tracin" else f"{method}@{dl}"
            _log(log, f"scoring: {label}")
            res = MethodResult(method, dl, label, f"score_{column}")
            try:
                s, timing = score_method(attr, queries, method, damping)
                if not np.isfinite(s).all():
                    raise ConvergenceError(f"{label}: scores are not finite (damping too small?)")
            except ConvergenceError as exc:
                res.error = " ".join(str(exc).split())
                results.append(res)
                continue
            res.timing, res.seconds = timing, timing["seconds"]
            res.auc = roc_auc(s, data.flipped)
            res.found = {f"{round(f * 100)}%": found_at(s, data.flipped, f) for f in FOUND_FRACTIONS}
            scores[res.column] = s
            curves[label] = detection_curve(s, data.flipped)
            results.append(res)
    finally:
        attr.cache.close()  # the cached gradients are the run's largest allocation

    paths = {
        "plot": str(out / "detection.png"),
        "scores": str(out / "scores.csv"),
        "summary": str(out / "summary.json"),
    }
    plot_detection_curves(
        curves, paths["plot"],
        title=f"Mislabeled detection ({n_flipped}/{len(data.train)} flipped)",
    )
    _write_scores_csv(paths["scores"], data, scores)
    result = DetectResult(
        config=cfg, n_train=len(data.train), n_val=len(data.val), n_flipped=n_flipped, source=data.source,
        finetune_seconds=trained.seconds, finetune_history=trained.history,
        val_accuracy=trained.val["accuracy"], val_loss=trained.val["loss"],
        fit_seconds=fit_seconds, fit_timings=fit_timings, query_seconds=query_seconds,
        warmup_seconds=warmup_seconds, methods=results, paths=paths,
    )
    result.total_seconds = time.perf_counter() - t_start
    Path(paths["summary"]).write_text(json.dumps(_json_safe(result.summary()), indent=2) + "\n")
    return result


def _runs(methods: list[str], dampings: list[float | str]) -> list[tuple[str, float | str]]:
    runs = []
    for m in methods:
        # tracin ignores the curvature, so one run covers every damping
        for d in dampings[:1] if m == "tracin" else dampings:
            runs.append((m, d))
    return runs


def _write_scores_csv(path: str, data: PreparedData, scores: dict[str, np.ndarray]) -> None:
    names = data.label_names
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["index", "text", "label", "original_label", "flipped", *scores])
        cols = list(scores.values())
        for i, text in enumerate(data.train.texts):
            w.writerow([i, text, names[data.train.labels[i]], names[data.original_labels[i]],
                        int(data.flipped[i]), *(f"{c[i]:.10g}" for c in cols)])


def _json_safe(obj: Any) -> Any:
    """NaN/inf → None and numpy scalars → Python, so the file is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def format_table(result: DetectResult) -> str:
    """Plain-text report: one row per method/damping, then the shared costs."""
    found_keys = [f"{round(f * 100)}%" for f in FOUND_FRACTIONS]
    header = ["method", "ROC-AUC", *(f"found@{k}" for k in found_keys), "seconds"]
    rows = []
    for m in result.methods:
        if m.error:
            rows.append([m.label, "failed", *([""] * len(found_keys)), m.error])
        else:
            rows.append([m.label, f"{m.auc:.4f}", *(f"{m.found[k]:.3f}" for k in found_keys), f"{m.seconds:.2f}"])
    rows.append(["random", "0.5000", *(f"{f:.3f}" for f in FOUND_FRACTIONS), ""])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [
        f"Mislabeled-data detection: {result.n_flipped} of {result.n_train} training labels flipped "
        f"({result.source}), {result.n_val} validation examples",
        f"fine-tune: {result.config.resolved_epochs} epoch(s) in {result.finetune_seconds:.1f} s, "
        f"validation accuracy {result.val_accuracy:.4f}",
        f"influence fit (shared by all methods): {result.fit_seconds:.1f} s "
        f"(per-example gradients {result.fit_timings.get('gradients', 0.0):.1f} s); "
        f"validation gradient (shared): {result.query_seconds:.1f} s, warm-up pass {result.warmup_seconds:.1f} s",
        "",
        fmt(header),
        fmt(["-" * w for w in widths]),
        *(fmt(r) for r in rows),
        "",
        "seconds = the method's own work (prepare + scoring against the cached training gradients)",
        f"outputs: {result.paths['plot']}, {result.paths['scores']}, {result.paths['summary']}",
    ]
    return "\n".join(lines)
