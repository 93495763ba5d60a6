"""Embedded default data, text-file loaders, label noise and batching.

Everything here is cheap to import: only ``torch`` and the standard library
are imported at module level. ``transformers`` is never imported here; the
tokenizer is passed in by the caller (see :mod:`hyperinf_ext.app.models.training`).

Modules: :mod:`.dataset` (:class:`TextDataset`, splits, label noise, :class:`DataError`),
:mod:`.files` (CSV/JSONL files), :mod:`.packaged` (the embedded model and Rotten Tomatoes data),
:mod:`.batching` (tokenizing, :class:`Collator`, :func:`make_loader`), :mod:`.instruction`
(prompt/response data for causal LMs: chat template, response-only labels).

Data flow used by the rest of the package::

    ds = load_rotten_tomatoes()                  # TextDataset
    train, val = split_dataset(ds, 1000, 500, seed=0)
    noisy, flipped = flip_labels(train.labels, 0.2, seed=0, num_classes=2)
    loader = make_loader(train_noisy, tokenizer, batch_size=16, sort_by_length=True)
    for batch in loader:  # dict of LongTensors, batch["index"] -> dataset positions
        ...
"""
from .batching import Collator, encode_texts, make_loader
from .dataset import DataError, TextDataset, flip_labels, split_dataset
from .files import load_text_file
from .instruction import (
    InstructionDataset,
    encode_instructions,
    load_instruction_file,
    rotten_tomatoes_instructions,
)
from .packaged import default_model_path, load_rotten_tomatoes, rotten_tomatoes_path

__all__ = [
    "DataError",
    "TextDataset",
    "default_model_path",
    "rotten_tomatoes_path",
    "load_rotten_tomatoes",
    "load_text_file",
    "split_dataset",
    "flip_labels",
    "Collator",
    "encode_texts",
    "make_loader",
    "InstructionDataset",
    "load_instruction_file",
    "rotten_tomatoes_instructions",
    "encode_instructions",
]
