"""The data set container, the train/validation split and label noise.

Cheap to import: only ``torch`` and the standard library.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from ...errors import DataError  # its home; re-exported here and by hyperinf_ext.app.data

__all__ = ["DataError", "TextDataset", "split_dataset", "flip_labels"]


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
    # where each example came from, for every output that names an example: its line in the file it was read
    # from (CSV: the header is line 1; a JSON array: its element number); None for data not read from a file
    rows: list[int] | None = field(default=None, kw_only=True)
    notes: list[str] = field(default_factory=list, kw_only=True)  # what reading the file changed or skipped

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(
                f"TextDataset: {len(self.texts)} texts but {len(self.labels)} labels"
            )
        if self.rows is not None and len(self.rows) != len(self.texts):
            raise ValueError(f"TextDataset: {len(self.texts)} texts but {len(self.rows)} rows")

    def row(self, i: int) -> int:
        """The file line of example ``i`` (its position when the data did not come from a file)."""
        return i if self.rows is None else self.rows[i]

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
            rows=None if self.rows is None else [self.rows[i] for i in idx],
        )

    def with_labels(self, labels: Sequence[int]) -> "TextDataset":
        """Same texts with replacement labels (e.g. the output of :func:`flip_labels`)."""
        return TextDataset(list(self.texts), [int(y) for y in labels], list(self.label_names),
                           rows=None if self.rows is None else list(self.rows))


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
    perm = torch.randperm(len(ds), generator=g, device="cpu").tolist()
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
    chosen = torch.randperm(n, generator=g, device="cpu")[:k]
    flipped = torch.zeros(n, dtype=torch.bool, device="cpu")
    flipped[chosen] = True
    new = list(ys)
    if num_classes == 2:
        for i in chosen.tolist():
            new[i] = 1 - new[i]
    else:
        # A shift in [1, C-1] modulo C is uniform over the other classes.
        shifts = torch.randint(1, num_classes, (k,), generator=g, device="cpu").tolist()
        for i, s in zip(chosen.tolist(), shifts):
            new[i] = (new[i] + s) % num_classes
    return new, flipped
