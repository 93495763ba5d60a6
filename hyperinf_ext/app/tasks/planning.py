"""``--plan`` and ``--max-memory`` of the commands that fit: the memory and time of the run, known first.

Every command that fine-tunes and fits calls :func:`plan_gate` once its model and loaders are built and
before any training: with neither option it returns at once; otherwise it asks ``HyperINF.plan`` (a few
measured batches, the rest counted from shapes; docs/api.md "Plan") and adds the fine-tuning time
(the measured seconds per token over the fine-tuning epochs: a training step costs about what the fit's
capture does, so this is an upper bound).  ``--max-memory`` refuses a run predicted over it, in one line
naming the options that bring it under; ``--plan`` stops the command with :class:`PlanReady`, which
the CLI prints and writes to ``OUT/plan.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...attributor.plan import format_bytes
from .pipeline_config import Log, log_stage

__all__ = ["PlanReady", "plan_gate", "CLI_NAMES", "write_plan"]

CLI_NAMES = {"cache_disk": None, "float32": None, "grad_bfloat16": None, "top_k": "--top-k 100",
             "half_batch": "--fit-batch-size {half} (or a smaller --max-length)"}
"""How the commands spell the plan's savings (None: no command-line option; the library has it)."""


class PlanReady(Exception):
    """``--plan``: the plan is made; the command stops before any training or fitting."""

    def __init__(self, summary: dict[str, Any], table: str):
        super().__init__("plan ready")
        self.summary, self.table = summary, table


def _tokens(loader: Any) -> tuple[int, int]:
    """(padded tokens, batches) of a loader, read without the model."""
    from ...attributor.plan import batch_shape

    tokens = batches = 0
    for batch in loader:
        tokens += batch_shape(batch)[1]
        batches += 1
    return tokens, batches


def plan_gate(cfg: Any, model: Any, loaders: Any, *, command: str, epochs: int, finetune: Any = None,
              n_queries: int = 0, mean: bool = True, top_k: int | None = None, cache: str = "disk",
              log: Log = None) -> None:
    """Make the run's plan when ``cfg.plan`` or ``cfg.max_memory`` asks for it (else return at once).

    ``n_queries``: the queries whose gradients the run computes (validation or target examples);
    ``mean``: they are averaged into one (mean_scores) rather than scored one by one (``top_k``, or a
    dense matrix); ``cache``: where the run keeps the training gradients.

    Raises:
        PlanReady: with ``cfg.plan``, carrying the summary and its table.
        ValueError: ``cfg.max_memory`` below the predicted peak (one line naming the options).
    """
    if not getattr(cfg, "plan", False) and getattr(cfg, "max_memory", None) is None:
        return
    from ...attributor.hyperinf import HyperINF

    log_stage(log, "plan: measuring a few batches of the fit")
    attr = HyperINF(model, progress=False, cache=cache)
    plan = attr.plan(loaders.influence_train, n_queries=n_queries, top_k=None if mean else top_k, mean=mean)
    finetune_s = 0.0
    if epochs and finetune is not None:
        tokens, batches = _tokens(finetune)
        finetune_s = epochs * (tokens * plan.probe.seconds_per_token + batches * plan.probe.seconds_per_batch)
    seconds = {"finetune": finetune_s, **plan.seconds}
    half = max(1, (getattr(cfg, "fit_batch_size", None) or plan.probe.largest_batch["examples"]) // 2)
    names = {k: (v.format(half=half) if v else v) for k, v in CLI_NAMES.items()}
    if top_k is not None:
        names["top_k"] = None  # already a top-k
    limit = getattr(cfg, "max_memory", None)
    advice = plan.advice(limit, names) if limit is not None else []
    summary = {"command": command, "plan": plan.to_dict(), "seconds": seconds, "total_seconds": sum(seconds.values()),
               "max_memory": limit, "fits": None if limit is None else plan.peak_bytes <= limit, "advice": advice}
    table = "\n".join([
        plan.table(),
        f"  fine-tuning: {epochs} epochs, about {finetune_s:.1f} s" if epochs else "  fine-tuning: none",
        f"  the whole {command}: about {summary['total_seconds']:.0f} s",
        *([f"  --max-memory {format_bytes(limit)}: " + ("fits" if summary["fits"] else "does not fit")]
          if limit is not None else []),
        *(f"    option: {a}" for a in advice),
    ])
    if getattr(cfg, "plan", False):
        raise PlanReady(summary, table)
    if limit is not None and plan.peak_bytes > limit:
        raise ValueError(f"--max-memory {format_bytes(limit)}: the plan predicts a peak of "
                         f"{format_bytes(plan.peak_bytes)} ({plan.peak_phase}); "
                         + ("; ".join(advice) if advice else "no option of this command lowers it enough")
                         + " (--plan shows the details)")
    log_stage(log, f"plan: peak about {format_bytes(plan.peak_bytes)}, under --max-memory {format_bytes(limit)}; "
                   f"about {summary['total_seconds']:.0f} s")


def write_plan(out: Path, summary: dict[str, Any]) -> Path:
    """``OUT/plan.json`` (written whole: a temporary file, then renamed)."""
    from ... import persistence

    path = Path(out) / "plan.json"
    persistence.write_bytes_atomic(path, json.dumps(summary, indent=1, default=str).encode())
    return path
