"""The pipeline every task shares: data → model → fine-tune → fit HyperINF → validation gradients → scores.

:func:`fit_and_query` runs it up to the validation gradients; a task then scores methods with
:func:`score_method`.  The stages live in one module each: settings (``pipeline_config``), data and
loaders (``pipeline_data``: each split tokenized once), the model, fine-tuning and the fit (here), and
per-method scoring (``method_scores``); this module re-exports them, so tasks import the pipeline from
one place.  Nothing here prints; stage messages go to an optional ``log`` callable and progress bars
to tqdm.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models.family import is_causal, load_instruction, model_dir
from .method_scores import score_method, self_score_method
from .pipeline_config import DEFAULT_EPOCHS, Log, PipelineConfig, log_stage
from .planning import plan_gate
from .pipeline_data import Loaders, PreparedData, build_loaders, finetune_loader, prepare_data

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
    "load_instruction",
    "load_model",
    "TrainedModel",
    "train_model",
    "fit_attributor",
    "validation_gradients",
    "FittedRun",
    "fit_and_query",
    "top_k_scores",
    "write_top_k",
    "score_method",
    "self_score_method",
]


# ------------------------------------------------------------------------------ model


def load_model(cfg: PipelineConfig, num_labels: int, *, adapter: Path | None | str = "config") -> Any:
    """The LoRA model on ``cfg.device``; ``adapter="config"`` uses ``cfg.adapter``, None a fresh LoRA.

    A causal LM gets LoRA on its q/v projections (``causal.load_causal_lora_model``); ``num_labels``
    is then unused.
    """
    from ..models.training import load_lora_model

    adapter_dir = cfg.adapter if adapter == "config" else adapter
    if is_causal(cfg):
        from ..models.causal import load_causal_lora_model

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
    from ...capture.losses import causal_lm_loss
    from ..models.causal import evaluate_causal
    from ..models.training import evaluate, finetune

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
                   cache: str = "memory", checkpoint_dir: Path | None = None,
                   checkpoint_every: int = 50) -> tuple[Any, float]:
    """Fit HyperINF once over ``train_loader`` (gradients cached in ``cache``: memory or disk); returns
    (attributor, wall seconds).  ``checkpoint_dir``: the fit commits its state there every
    ``checkpoint_every`` batches and resumes from it when rerun (``HyperINF.fit``; the gradient cache then
    lives on disk in that folder).

    The attributor starts as ``tracin`` so the fit's closing ``prepare`` is free: every method's own
    preparation is then timed in :func:`score_method`, not hidden in the shared fit time.
    """
    from ...attributor.hyperinf import HyperINF

    log_stage(log, f"influence: per-example gradients of {len(train_loader.dataset)} training examples")
    from ...distributed import shard_loader

    attr = HyperINF(model, method="tracin", progress=cfg.progress, cache=cache)
    t0 = time.perf_counter()
    # under torchrun: this rank's share of the examples
    attr.fit(shard_loader(train_loader), checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
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
    top_k: Any = None  # --top-k's TopK, held until the task writes its outputs all at once

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
    from ..models.training import load_tokenizer

    folder = model_dir(cfg, log)  # first, so a missing model fails before the data work
    data = prepare_data(cfg, causal=is_causal(cfg))
    log_stage(log, f"data: {data.source}: {len(data.train)} train ({int(data.flipped.sum())} flipped) / "
                   f"{len(data.val)} val")
    loaders = build_loaders(cfg, data, load_tokenizer(folder))
    for note in loaders.notes:
        log_stage(log, f"data: {note}")
    model = load_model(cfg, data.num_labels)
    plan_gate(cfg, model, loaders, command="run", epochs=cfg.resolved_epochs, finetune=loaders.finetune,
              n_queries=len(data.val) if queries else 0, mean=True, top_k=None, cache="memory", log=log)
    trained = train_model(cfg, model, loaders.finetune, loaders.evaluation, log=log)
    attr, fit_seconds = fit_attributor(cfg, trained.model, loaders.influence_train, log=log)
    run = FittedRun(data, loaders, trained, attr, fit_seconds, dict(attr.timings), None, 0.0)
    try:
        if queries:
            log_stage(log, f"influence: gradient of the mean validation loss ({len(data.val)} examples)")
            run.queries, run.query_seconds = validation_gradients(attr, loaders.influence_val)
            if cfg.top_k:
                run.top_k = top_k_scores(cfg, attr, run.queries, log)
    except BaseException:
        run.release()
        raise
    return run


def top_k_scores(cfg: PipelineConfig, attr: Any, queries: Any, log: Log = None) -> Any:
    """``--top-k K``: per validation example the K training examples that most raise (positive_*) and most
    lower (negative_*) its loss under hyperinf at its default damping (None on ranks other than 0)."""
    log_stage(log, f"influence: top {cfg.top_k} training examples per validation example -> topk.safetensors")
    attr.use("hyperinf", damping="auto")
    return attr.scores(queries, top_k=cfg.top_k)


def write_top_k(run: FittedRun, folder: Path) -> None:
    """``folder``/topk.safetensors when the run computed a top-k (rank 0 of a ``--top-k`` run)."""
    if run.top_k is not None:
        run.top_k.save(Path(folder) / "topk.safetensors", method="hyperinf", damping="auto")
