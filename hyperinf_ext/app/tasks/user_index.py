"""``--index IDX`` of ``audit`` and ``select``: the scores from a gradient index instead of a fit.

The index (``hyperinf-ext index build``, module ``index_task``) holds the model, the adapter, the fitted
HyperINF factors and every training gradient of one training file (its path and SHA-256 in
``IDX/source.json``).  A run with ``--index`` reads that file's rows (the ``--train`` / ``--pool`` given
must be the same file), checks and tokenizes them and the target as without an index, opens the index
and scores from it: ``Index.mean_scores`` (influence on the target's mean loss) or ``Index.self_scores``
(self-influence; approximate for a projected index) — no training gradient is recomputed and no LoRA is
trained.  The model and adapter options are refused: they are the index's.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import persistence
from .index_task import READ_SETTINGS, SOURCE, open_index
from .pipeline import Loaders, Log, TrainedModel, log_stage, train_model
from .pipeline_config import config_damping
from .user_run import UserConfig, UserData, load_user_files, prepare_inputs

__all__ = ["IndexRun", "read_source", "check_index_options", "index_inputs", "index_summary"]


def read_source(index_dir: Path) -> dict[str, Any]:
    """``IDX/source.json``, or a one-line error naming ``--index``."""
    path = Path(index_dir) / SOURCE
    if not path.is_file():
        raise ValueError(f"--index {index_dir}: not an index built by `hyperinf-ext index build` ({SOURCE} missing)")
    return persistence.read_json(path, "index source")


def check_index_options(cfg: UserConfig, file_option: str, given: Path | None) -> None:
    """With ``cfg.index``: the index exists, ``given`` (``--train``/``--pool``, optional) is its training file,
    and the options that would rebuild what it holds (``--model``, ``--adapter``, another ``--method`` or
    ``--damping``) are not given.

    Raises:
        ValueError: one line naming the option.
    """
    for option, value in (("--model", cfg.model), ("--adapter", cfg.adapter)):
        if value is not None:
            raise ValueError(f"{option}: not with --index (the index holds the model, adapter and fitted factors)")
    for option, value, default in (("--method", cfg.method, "hyperinf"), ("--damping", cfg.damping, "auto")):
        if value != default:
            raise ValueError(f"{option}: not with --index (the index was fitted with its own method and damping: "
                             "`hyperinf-ext index build --method/--damping`)")
    source = read_source(cfg.index)
    if given is not None:
        if not Path(given).is_file():
            raise ValueError(f"{file_option} {given}: file not found")
        if persistence.file_sha256(Path(given)) != source["train_sha256"]:
            raise ValueError(f"{file_option} {given}: not the file the index {cfg.index} was built from "
                             f"({source['train']}, by SHA-256); rebuild the index for this file or leave out "
                             f"{file_option}")


@dataclass
class IndexRun:
    """What an ``--index`` run scores with: the opened index, the reading settings, data, loaders, the model."""

    idx: Any
    source: dict[str, Any]
    cfg: UserConfig
    """The run's settings with the index's reading and model settings (columns, max length, model, LoRA)."""
    data: UserData
    loaders: Loaders
    trained: TrainedModel
    open_seconds: float
    train_path: Path
    """The training file read (``--train``/``--pool`` when given, else the one the index was built from)."""


def index_inputs(cfg: UserConfig, command: str, added: tuple[str, ...], log: Log = None,
                 given: Path | None = None) -> IndexRun:
    """The index's training file and ``cfg.target`` read, checked and tokenized as the index read them, then
    the index opened (its model evaluated on the target, no training).  ``given`` (``--train``/``--pool``):
    read that file when it hashes as the index's (the index or the data may have moved since the build).

    Raises:
        ValueError / DataError: the training file missing or changed since the build, bad rows, an index
            that does not open (named by ``Index.open``).
    """
    source = read_source(cfg.index)
    values = {k: source[k] for k in READ_SETTINGS if k in source}
    if values.get("model") not in (None, "smollm2", "minilm"):
        values["model"] = Path(values["model"])
    rcfg = dataclasses.replace(cfg, **values)
    train_path = Path(given).resolve() if given is not None else Path(source["train"])  # given: hash checked
    if not train_path.is_file() or persistence.file_sha256(train_path) != source["train_sha256"]:
        raise ValueError(f"--index {cfg.index}: its training file {train_path} is missing or changed since the index "
                         f"was built (SHA-256 differs); {command} writes that file's rows, so it needs them unchanged")
    data = load_user_files(rcfg, train_path, command=command, added=added)
    if len(data.train) != int(source["n_train"]):
        raise ValueError(f"--index {cfg.index}: {train_path} now reads as {len(data.train)} examples, the index holds "
                         f"{source['n_train']}; rebuild the index")
    loaders, _ = prepare_inputs(rcfg, data, log)
    t0 = time.perf_counter()
    log_stage(log, f"index: opening {cfg.index} ({source['n_train']} training examples)")
    idx, _, _ = open_index(Path(cfg.index), cfg.device, cfg.progress, cfg.index_verify, log)
    idx.estimator = cfg.index_estimator
    open_seconds = time.perf_counter() - t0
    trained = train_model(rcfg, idx.attributor.model, loaders.finetune, loaders.evaluation, epochs=0, log=log,
                          what="index model")
    return IndexRun(idx, source, rcfg, data, loaders, trained, open_seconds, train_path)


def index_summary(run: IndexRun, signal: str) -> dict[str, Any]:
    """summary.json's ``index`` entry: where the scores came from and whether they are approximate."""
    proj, dtype = int(run.idx.config.proj_dim), run.idx.config.dtype
    # a layer is stored unprojected when proj_dim is 0 or at least its d: what was stored decides, not proj_dim
    projected = not all(p.exact for p in run.idx.plans)
    if projected:
        how = f"approximate (proj_dim {proj}: the training gradients are stored randomly projected, see docs/index.md)"
    elif dtype == "float32":
        how = "exact (no layer projected: the float32 training gradients are stored)"
    else:
        how = f"approximate (no layer projected, but the training gradients are stored rounded to {dtype})"
    if signal in ("self_influence", "combined_score") and projected:
        how += "; self-influence is sketched through the projection"
    return {"path": str(run.cfg.index), "proj_dim": proj, "projected": projected, "store_dtype": dtype,
            "scores": f"from the index, {how}", "train": str(run.train_path),
            "estimator": run.idx.estimator, "verified": run.cfg.index_verify,
            "method": run.idx.attributor.config.method, "damping": config_damping(run.idx.attributor.config),
            "open_seconds": run.open_seconds}
