"""The flow the user commands share (``audit``, ``select``): the user's files → every input check → the model
(a given ``--adapter``, or a LoRA fine-tuned here and kept for a resume) → a checkpointed HyperINF fit.

Order: settings (:meth:`UserConfig.validate`), the output folder, the files (:func:`load_user_files`), the
adapter against the base model, labels against a fixed classification head and tokenization with every
example scored (:func:`prepare_inputs`, module ``user_checks``) — all before a model is loaded or trained.

Interrupt and resume (:class:`RunCheckpoint`): a run keeps ``OUT/.checkpoint/`` — ``run.json`` (the
command, its settings and the SHA-256 of its input files), ``adapter/`` (the LoRA it fine-tuned, saved once
training ends) and ``fit/`` (the attributor's fit checkpoint, ``HyperINF.fit(checkpoint_dir=...)``, with the
training gradients cached on disk).  A rerun with the same arguments loads the adapter instead of training
again and resumes the fit after its last commit, also when only scoring settings changed (the method, the
damping, the signal, the selection rule and size: ``UserConfig.scoring_only``; the fit does not depend on
them); other arguments or files start afresh.  A finished run keeps only ``run.json`` and ``adapter/`` (a LoRA's
weights, small beside the gradient cache it deletes: :meth:`RunCheckpoint.finish`), so asking the same data
another question (another signal, damping or selection size) costs a fit, not a fine-tune.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from ... import persistence
from ..data.batching import count_truncated, encode_texts
from ..data.dataset import DataError, TextDataset
from ..data.files import load_text_file
from ..data.instruction import ensure_pad_token, truncation_note
from ..data.user_rows import UserRows, check_added_columns, read_user_rows
from ...curvature.methods import Damping, damping_label, parse_dampings, parse_methods, split_damping
from .pipeline import (Log, Loaders, PipelineConfig, PreparedData, TrainedModel, build_loaders, fit_attributor,
                       is_causal, load_instruction, load_model, log_stage, model_dir, train_model)
from .planning import plan_gate
from .user_checks import (align_target_labels, check_model_folder, folder_head_classes, folder_head_label_names,
                          inspect_adapter, labelled_encodings, labels_for_head)

__all__ = ["UserConfig", "UserData", "load_user_files", "prepare_inputs", "RunCheckpoint", "trained_model",
           "checkpointed_fit", "use_method", "unlearned_note"]


@dataclass
class UserConfig(PipelineConfig):
    """Settings the user commands share (``data``, ``n_train``, ``n_val``, ``flip_rate``, ``top_k`` unused)."""

    reads_own_file: ClassVar[bool] = True
    scoring_only: ClassVar[tuple[str, ...]] = ("method", "damping", "mix_queries", "normalize")
    """Settings used only after the fit (how the fitted curvature scores): a rerun that changes only these
    resumes the interrupted run's adapter and fit (:class:`RunCheckpoint`)."""

    target: Path | None = None
    """Trusted examples whose mean loss the scores are about (same format as the training file)."""
    method: str = "hyperinf"
    damping: Damping = "auto"
    checkpoint_every: int = 50
    """Fit batches between checkpoint commits (a commit writes every layer's factors)."""
    max_length: int = 128
    index: Path | None = None
    """A gradient index (``hyperinf-ext index build``) to score from instead of fitting (module ``user_index``)."""
    index_verify: bool = True
    """With ``index``: check every shard file's SHA-256 on open (``--no-verify`` checks sizes only)."""
    index_estimator: str = "regression"
    """With ``index``: how a projected layer's score is estimated (``Index.estimator``)."""

    def validate(self) -> None:
        super().validate()
        if self.target is not None and not Path(self.target).is_file():
            raise ValueError(f"--target {self.target}: file not found")
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        self.method = parse_methods([self.method], what="method")[0]
        self.damping = parse_dampings([self.damping])[0]
        check_model_folder(self.model)
        if self.adapter is not None and not Path(self.adapter).is_dir():
            raise ValueError(f"--adapter {self.adapter}: adapter folder not found")
        if self.index is not None:
            for option, given in (("--plan", self.plan), ("--max-memory", self.max_memory is not None)):
                if given:
                    raise ValueError(f"{option}: not with --index (an index run fits nothing; plan the index build: "
                                     "`hyperinf-ext index build ... --plan`)")

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        for unused in ("data", "n_train", "n_val", "flip_rate", "top_k", *(("index", "index_verify", "index_estimator") if self.index is None else ())):
            out.pop(unused, None)
        out["damping"] = damping_label(self.damping)
        return out


@dataclass
class UserData:
    """The training (pool) and target files as data sets and as the user's rows, checked."""

    train: TextDataset
    train_rows: UserRows
    target: TextDataset | None
    target_rows: UserRows | None
    causal: bool
    num_labels: int = 2
    notes: list[str] = field(default_factory=list)


def _read(cfg: UserConfig, path: Path, causal: bool, min_classes: int) -> TextDataset:
    if causal:
        return load_instruction(path, cfg)
    return load_text_file(path, cfg.text_column, cfg.label_column, min_classes=min_classes)


def load_user_files(cfg: UserConfig, train_path: Path, *, command: str, added: Sequence[str]) -> UserData:
    """Read the training file and ``cfg.target``: rows kept as written, examples checked (columns, empty
    file, empty responses, classes), target classes mapped to the training file's.  No model is touched."""
    causal = is_causal(cfg)
    rows = read_user_rows(train_path)
    check_added_columns(rows, added, command)
    train = _read(cfg, train_path, causal, 2)
    target = target_rows = None
    if cfg.target is not None:
        target_rows = read_user_rows(cfg.target)
        target = _read(cfg, Path(cfg.target), causal, 1)
        if not causal:
            target = align_target_labels(train, target, train_path, Path(cfg.target), cfg.label_column)
    notes = list(train.notes) + (list(target.notes) if target is not None else [])
    return UserData(train, rows, target, target_rows, causal, max(train.num_classes, 2), notes)


def prepare_inputs(cfg: UserConfig, data: UserData, log: Log = None) -> tuple[Loaders, PreparedData]:
    """The model folder, the adapter and label checks, tokenization (every example checked) and the loaders
    (the evaluation and influence-query loaders run over the target, or the training file without one)."""
    from ..models.training import load_tokenizer

    folder = model_dir(cfg, log)
    head, whose = None, ""
    if cfg.adapter is not None:
        info = inspect_adapter(Path(cfg.adapter), folder, data.causal)
        data.notes += info.notes
        head, whose = info.head_classes, f"the classification head of --adapter {cfg.adapter}"
    if not data.causal:
        if head is None:
            head, whose = folder_head_classes(folder), f"the classification head of --model {folder}"
        if head is not None:
            # the file's class names must mean the head's outputs: by the head's own names when it has them
            names = folder_head_label_names(folder, head)
            data.train, note = labels_for_head(data.train, data.train_rows.path, cfg.label_column, head, names, whose)
            data.notes += [note] if note else []
            if data.target is not None:
                data.target, _ = labels_for_head(data.target, data.target_rows.path, cfg.label_column, head, names,
                                                 whose)
            data.num_labels = head
    tokenizer = load_tokenizer(folder)
    notes: list[str] = []
    if data.causal:
        note = ensure_pad_token(tokenizer)
        notes += [note] if note else []
        train_enc, cut = labelled_encodings(data.train, data.train_rows, cfg.response_column, tokenizer, cfg.max_length)
        val_enc = train_enc
        if data.target is not None:
            val_enc, cut_target = labelled_encodings(data.target, data.target_rows, cfg.response_column, tokenizer,
                                                     cfg.max_length)
            cut += cut_target
        note = truncation_note(cut, cfg.max_length)
        notes += [note] if note else []
    else:
        train_enc = encode_texts(data.train, tokenizer, cfg.max_length)
        val_enc = train_enc if data.target is None else encode_texts(data.target, tokenizer, cfg.max_length)
        cut = count_truncated(data.train, train_enc, tokenizer, cfg.max_length)
        if data.target is not None:
            cut += count_truncated(data.target, val_enc, tokenizer, cfg.max_length)
        if cut:
            notes.append(f"{cut} text(s) longer than --max-length {cfg.max_length} tokens were cut to their first "
                         f"{cfg.max_length} (the model saw only those)")
    target = data.target if data.target is not None else data.train
    prepared = PreparedData(data.train, target, list(data.train.labels), np.zeros(len(data.train), dtype=bool),
                            str(data.train_rows.path), len(data.train), data.causal)
    loaders = build_loaders(cfg, prepared, tokenizer, encodings=(train_enc, val_enc, notes))
    data.notes += notes  # the report and summary.json state what tokenizing changed, not only the log
    for note in data.notes:
        log_stage(log, f"data: {note}")
    return loaders, prepared


class RunCheckpoint:
    """``OUT/.checkpoint``: what a rerun with the same arguments resumes from (see the module docstring)."""

    NAME = ".checkpoint"

    def __init__(self, out: Path, command: str, cfg: UserConfig, files: Sequence[Path | None], log: Log = None):
        self.root = Path(out) / self.NAME
        self.log, self._lock = log, None
        self.adapter_given, self.scoring_only = cfg.adapter, cfg.scoring_only
        # what the fit and the adapter do not depend on: a rerun that changes only these resumes
        skip = ("progress", "out", "checkpoint_every", *cfg.scoring_only)
        settings = {k: v for k, v in cfg.settings().items() if k not in skip}
        inputs = [Path(p) for p in files if p is not None]
        if cfg.adapter is not None:
            inputs += sorted(p for p in Path(cfg.adapter).iterdir() if p.is_file())
        self.identity = {"command": command, "settings": settings,
                         "files": {str(p): persistence.file_sha256(p) for p in inputs}}

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def fit_dir(self) -> Path:
        return self.root / "fit"

    LOCK = ".run.lock"

    def start(self) -> bool:
        """Keep a checkpoint of the same run (True), or start a fresh one (False).  Holds ``OUT/.run.lock``
        until :meth:`remove` (or the process ends): a second run on the same ``--out`` is refused rather
        than deleting or writing into this one's checkpoint (the lock lives outside the folder a fresh
        start deletes, so both cannot hold it)."""
        if self._lock is None:
            try:
                self._lock = persistence.hold_lock(self.root.parent / self.LOCK, (
                    f"--out {self.root.parent}: in use by another audit or select run (its lock file {self.LOCK} "
                    "is held); wait for it to finish or choose another --out"))
            except persistence.DirectoryBusyError as exc:
                raise ValueError(str(exc)) from None
        run = self.root / "run.json"
        if run.is_file():
            try:
                same = json.loads(run.read_text(encoding="utf-8")) == json.loads(json.dumps(self.identity))
            except (OSError, ValueError):
                same = False
            if same:
                log_stage(self.log, f"resume: {self.root} holds a run with these arguments (interrupted, or "
                                    "finished with its adapter kept); continuing it")
                return True
            log_stage(self.log, f"resume: {self.root} belongs to a run with other arguments or files; starting afresh")
        if self.root.exists():
            self._refuse_own_adapter()
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        run.write_text(json.dumps(self.identity, indent=1), encoding="utf-8")
        return False

    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file() and (self.adapter_dir / "training.json").is_file()

    def save_adapter(self, model: Any, info: dict[str, Any]) -> None:
        """The fine-tuned adapter and its training record, written whole (a temporary folder, then renamed)."""
        tmp = self.root / ".adapter-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        (tmp / "training.json").write_text(json.dumps(info), encoding="utf-8")
        tmp.rename(self.adapter_dir)

    def _refuse_own_adapter(self) -> None:
        given = self.adapter_given
        if given is not None and Path(given).resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"--adapter {given}: lies in {self.root}, which a run with other arguments on this "
                             "--out replaces; copy the adapter elsewhere first, or choose another --out")

    def finish(self) -> None:
        """The run finished: the fit's checkpoint (the training gradients) goes, the fine-tuned adapter and
        ``run.json`` stay for a rerun (module docstring), and the lock is released."""
        if self.has_adapter():
            shutil.rmtree(self.fit_dir, ignore_errors=True)
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        self.release()

    def kept_note(self) -> str:
        """What the finished run leaves in ``OUT/.checkpoint`` (for summary.json and the report)."""
        if self.has_adapter():
            return (f"{self.root}: the fine-tuned adapter is kept in {self.adapter_dir}; a rerun on this --out "
                    "that changes only " + ", ".join("--" + k.replace("_", "-") for k in self.scoring_only)
                    + " reuses it (no fine-tuning); --adapter " + str(self.adapter_dir)
                    + " gives it to another command (delete the folder to free the space)")
        return (f"{self.root}: removed when the run finished; an interrupted run keeps it and a rerun with the "
                "same arguments resumes from it")

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def __del__(self) -> None:  # an interrupted run: the lock goes with the object (or the process)
        self.release()


def _load(cfg: UserConfig, num_labels: int, adapter: Path | None | str = "config") -> Any:
    try:
        return load_model(cfg, num_labels, adapter=adapter)
    except DataError as exc:
        if "size mismatch" in str(exc) and cfg.adapter is not None:
            raise DataError(f"--adapter {cfg.adapter}: trained on another base model (its tensor shapes differ "
                            f"from --model {cfg.model}'s); give --model the base it was trained on") from None
        raise


def unlearned_note(data: UserData, accuracy: float | None, epochs: int) -> str | None:
    """A note when a classifier predicts its evaluation examples (the target, else the training file) no better
    than always answering their most common class: its scores then describe a model that has not learned the
    task.  None for a causal LM (its accuracy is exact-match of free answers) or a model above that rate."""
    ref = data.target if data.target is not None else data.train
    if data.causal or accuracy is None or len(ref) == 0:
        return None
    counts = np.bincount(np.asarray(ref.labels, dtype=np.int64))
    share = counts.max() / counts.sum()
    if accuracy > share + 1e-9:
        return None
    on = "target" if data.target is not None else "training"
    fix = ("more --epochs or a larger --lr give scores about the model you would train" if epochs
           else "fine-tune it first (--epochs N) for scores about a model that learned the task")
    return (f"the model is no better on the {on} examples than always answering their most common class "
            f"(accuracy {accuracy:.3f}, that class alone {share:.3f}): its scores describe a model that has not "
            f"learned the task; {fix}")


def trained_model(cfg: UserConfig, data: UserData, loaders: Loaders, ckpt: RunCheckpoint, finetune: Any,
                  epochs: int, log: Log, what: str) -> TrainedModel:
    """The model to attribute: the checkpoint's adapter on a resume; else ``cfg.adapter`` or a fresh LoRA,
    fine-tuned ``epochs`` on ``finetune`` (then saved into the checkpoint); evaluated on the target."""
    if ckpt.has_adapter():
        log_stage(log, f"resume: loading the {what} adapter of an earlier run with these arguments from "
                       f"{ckpt.adapter_dir} (no training)")
        model = _load(cfg, data.num_labels, adapter=ckpt.adapter_dir)
        plan_gate(cfg, model, loaders, command=ckpt.identity["command"], epochs=0,
                  n_queries=0 if data.target is None else len(data.target), mean=True, cache="disk", log=log)
        trained = train_model(cfg, model, finetune, loaders.evaluation, epochs=0, log=log, what=what)
        info = json.loads((ckpt.adapter_dir / "training.json").read_text(encoding="utf-8"))
        trained.history, trained.seconds = info["history"], info["seconds"]
        return _noted(trained, data, epochs, log)
    model = _load(cfg, data.num_labels)
    plan_gate(cfg, model, loaders, command=ckpt.identity["command"], epochs=epochs, finetune=finetune,
              n_queries=0 if data.target is None else len(data.target), mean=True, cache="disk", log=log)
    trained = train_model(cfg, model, finetune, loaders.evaluation, epochs=epochs, log=log, what=what)
    if epochs > 0:
        ckpt.save_adapter(trained.model, {"history": trained.history, "seconds": trained.seconds})
    return _noted(trained, data, epochs, log)


def _noted(trained: TrainedModel, data: UserData, epochs: int, log: Log) -> TrainedModel:
    note = unlearned_note(data, trained.val.get("accuracy"), epochs)
    if note is not None:
        data.notes.append(note)
        log_stage(log, f"model: {note}")
    return trained


def checkpointed_fit(cfg: UserConfig, model: Any, loaders: Loaders, ckpt: RunCheckpoint, log: Log) -> tuple[Any, float]:
    """Fit HyperINF over the training loader with its checkpoint in ``ckpt.fit_dir`` (resumed when present)."""
    if (ckpt.fit_dir / "meta.json").is_file():
        log_stage(log, f"resume: the fit continues from its last commit in {ckpt.fit_dir}")
    else:
        log_stage(log, f"influence: fit checkpoint in {ckpt.fit_dir} every {cfg.checkpoint_every} batches "
                       "(interrupt with Ctrl-C; rerun the same command to resume)")
    return fit_attributor(cfg, model, loaders.influence_train, log=log, cache="disk", checkpoint_dir=ckpt.fit_dir,
                          checkpoint_every=cfg.checkpoint_every)


def use_method(cfg: UserConfig, attr: Any, damping: Damping | None = None) -> None:
    """Switch the fitted attributor to ``cfg.method`` at ``damping`` (default ``cfg.damping``)."""
    rule, scale = split_damping(cfg.damping if damping is None else damping)
    attr.use(cfg.method, damping=rule, **({} if scale is None else {"damping_scale": scale}))

