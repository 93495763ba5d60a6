"""Tokenizing and batching a :class:`TextDataset`: :class:`Collator`, the length-sorted sampler, :func:`make_loader`.

``transformers`` is never imported here; the tokenizer is passed in by the caller.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .dataset import DataError, TextDataset

__all__ = ["TOKEN_KEYS", "Collator", "encode_texts", "count_truncated", "make_loader"]

#: The tokenizer outputs a batch carries (``token_type_ids`` only when the tokenizer makes them).
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class _IndexedTexts(Dataset):
    """Yields ``(text, label, index)`` for each row of a TextDataset."""

    def __init__(self, ds: TextDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[str, int, int]:
        return self.ds.texts[i], int(self.ds.labels[i]), int(i)


class Collator:
    """Turns a list of ``(text, label, index)`` items into a model batch.

    Returns a dict of ``torch.long`` tensors (``B`` = batch size, ``L`` =
    longest sequence in the batch after truncation to ``max_length``):

    * ``input_ids``, ``attention_mask``: ``(B, L)``
    * ``token_type_ids``: ``(B, L)``, only if the tokenizer produces them
    * ``labels``: ``(B,)``, or ``(B, L)`` token labels (−100 = no target) when the cached
      encodings carry ``labels`` (instruction data)
    * ``index``: ``(B,)`` -- each example's position in the source dataset

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_length: truncation length in tokens (including special tokens).
        cache: optional per-dataset-index pre-tokenized encodings (dicts of
            token-id lists, as built by :func:`make_loader`). When given, the
            text is not re-tokenized; the output is identical.
    """

    def __init__(self, tokenizer: Any, max_length: int = 64, cache: Sequence[dict] | None = None):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.cache = cache

    def __call__(self, items: Sequence[tuple[str, int, int]]) -> dict[str, torch.Tensor]:
        texts = [t for t, _, _ in items]
        labels = torch.tensor([int(y) for _, y, _ in items], dtype=torch.long, device="cpu")
        index = torch.tensor([int(i) for _, _, i in items], dtype=torch.long, device="cpu")
        if self.cache is None:
            enc = self.tokenizer(
                texts,
                truncation=True,
                max_length=self.max_length,
                padding="longest",
                return_tensors="pt",
            )
            batch = {k: v.long() for k, v in enc.items() if k in TOKEN_KEYS}
        else:
            batch = self._pad([self.cache[int(i)] for _, _, i in items])
        # token-level labels (instruction data, see data.instruction) come padded from the cache
        batch.setdefault("labels", labels)
        batch["index"] = index
        return batch

    def _pad(self, encs: Sequence[dict]) -> dict[str, torch.Tensor]:
        # Padding by hand rather than tokenizer.pad(): it is a few lines, avoids
        # the fast-tokenizer "use __call__" warning, and mirrors padding="longest".
        tok = self.tokenizer
        pad_id = tok.pad_token_id
        if pad_id is None:
            raise ValueError("tokenizer has no pad token; set tokenizer.pad_token first")
        pad_values = {
            "input_ids": pad_id,
            "attention_mask": 0,
            "token_type_ids": getattr(tok, "pad_token_type_id", 0) or 0,
            "labels": -100,  # token-level labels: padding is never a target
        }
        left = getattr(tok, "padding_side", "right") == "left"
        width = max(len(e["input_ids"]) for e in encs)
        out: dict[str, torch.Tensor] = {}
        for key, pv in pad_values.items():
            if key not in encs[0]:
                continue
            t = torch.full((len(encs), width), pv, dtype=torch.long, device="cpu")
            for r, e in enumerate(encs):
                seq = e[key]
                if left:
                    t[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long, device="cpu")
                else:
                    t[r, : len(seq)] = torch.tensor(seq, dtype=torch.long, device="cpu")
            out[key] = t
        return out


class _LengthBatchSampler(Sampler[list[int]]):
    """Batches of consecutive examples in token-length order.

    Batch membership is fixed (similar lengths together, minimal padding);
    with ``shuffle`` the order of whole batches is re-drawn every epoch from
    a private generator, so successive epochs differ but the run is
    reproducible from ``seed``.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int):
        # Stable sort: ties keep dataset order, so batches are deterministic.
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        self.batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            perm = torch.randperm(len(self.batches), generator=self.generator, device="cpu").tolist()
        else:
            perm = range(len(self.batches))
        for b in perm:
            yield list(self.batches[b])


def encode_texts(ds: TextDataset, tokenizer: Any, max_length: int = 64) -> list[dict[str, list[int]]]:
    """Token ids of every text of ``ds`` (truncated to ``max_length``), one dict per dataset index.

    :func:`make_loader` takes them as ``encodings`` so that several loaders over one split (e.g.
    shuffled for fine-tuning and length-sorted for influence) tokenize it once.
    """
    enc = tokenizer(list(ds.texts), truncation=True, max_length=int(max_length))
    keys = [k for k in TOKEN_KEYS if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(ds))]


def count_truncated(ds: TextDataset, encodings: Sequence[dict[str, list[int]]], tokenizer: Any,
                    max_length: int) -> int:
    """How many texts of ``ds`` :func:`encode_texts` cut at ``max_length`` tokens (``encodings`` are its
    output): only the rows that came out exactly ``max_length`` long are tokenized again, whole."""
    full = [i for i, e in enumerate(encodings) if len(e["input_ids"]) >= int(max_length)]
    if not full:
        return 0
    whole = tokenizer([ds.texts[i] for i in full], truncation=False)["input_ids"]
    return sum(len(ids) > int(max_length) for ids in whole)


def make_loader(
    ds: TextDataset,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    sort_by_length: bool = False,
    seed: int = 0,
    max_length: int = 64,
    encodings: Sequence[dict[str, list[int]]] | None = None,
) -> DataLoader:
    """DataLoader over ``ds`` yielding :class:`Collator` batches.

    All texts are tokenized once up front (truncated to ``max_length``) unless ``encodings``
    (from :func:`encode_texts` with the same tokenizer and ``max_length``) are given; the
    cached token ids are padded per batch and their lengths drive sorting.

    * ``sort_by_length=False``: dataset order, or a random example order per
      epoch with ``shuffle`` (private generator seeded with ``seed``).
    * ``sort_by_length=True``: examples ordered by token length and cut into
      batches in that order, which cuts padding; ``shuffle`` then shuffles
      the batches, not the examples.

    Every batch carries ``"index"`` (``torch.long``, shape ``(B,)``): the
    examples' positions in ``ds``, so per-example results can be mapped back.
    Over one pass each index appears exactly once (the last batch may be short).

    The loader exposes ``loader.token_lengths`` (list of int, per dataset
    index) for callers that want padding statistics.
    """
    own = getattr(ds, "own_loader", None)
    if own is not None:  # image + text data (data.vlm.VLMDataset): batches with the processor's image tensors
        return own(tokenizer, batch_size=batch_size, shuffle=shuffle, sort_by_length=sort_by_length, seed=seed,
                   max_length=max_length, encodings=encodings)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(ds) == 0:
        raise DataError("cannot build a loader over an empty data set")
    if encodings is None:
        encodings = encode_texts(ds, tokenizer, max_length)
    elif len(encodings) != len(ds):
        raise ValueError(f"encodings: {len(encodings)} for a data set of {len(ds)} examples")
    cache = list(encodings)
    lengths = [len(c["input_ids"]) for c in cache]
    collate = Collator(tokenizer, max_length=max_length, cache=cache)
    items = _IndexedTexts(ds)
    if sort_by_length:
        loader = DataLoader(
            items,
            batch_sampler=_LengthBatchSampler(lengths, batch_size, shuffle, seed),
            collate_fn=collate,
        )
    else:
        gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
        loader = DataLoader(
            items, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=collate
        )
    loader.token_lengths = lengths  # type: ignore[attr-defined]
    return loader
