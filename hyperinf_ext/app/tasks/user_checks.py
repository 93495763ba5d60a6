"""Checks of the user commands' inputs (``audit``, ``select``) that run before any model is loaded or trained.

Each failure is one :class:`~hyperinf_ext.errors.DataError` line naming the file, the row (its file line)
and the column, or the adapter folder and what differs:

* :func:`check_model_folder`: ``--model DIR`` is a model folder (config.json);
* :func:`inspect_adapter`: ``--adapter DIR`` is a PEFT adapter of this base model — the base its
  adapter_config.json names (``base_model_name_or_path``, when that folder exists here) has this model's
  architecture, the adapter's tensor shapes (read from the safetensors header, no weights loaded) fit this
  model's hidden size and layer count, and its task type fits the model family; returns the classes of
  its classification head, if it has one;
* :func:`align_target_labels`: a classifier target names only the training file's classes;
* :func:`labels_for_head`: the labels as class ids of a fixed classification head (by its own class names,
  :func:`folder_head_label_names`, when it has them), every label within its classes;
* :func:`labelled_encodings`: causal-LM examples tokenized with every error named by file, line and
  column, and every example left with at least one labelled (scored) token.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..data.dataset import DataError, TextDataset
from ..data.instruction import InstructionDataset, encode_instructions
from ..data.user_rows import UserRows
from ..messages import one_line

__all__ = ["check_model_folder", "AdapterInfo", "inspect_adapter", "align_target_labels", "labels_for_head",
           "folder_head_label_names", "labelled_encodings", "folder_head_classes"]

_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_ARCH_KEYS = ("model_type", *_HIDDEN_KEYS, *_LAYER_KEYS, "num_attention_heads", "intermediate_size", "vocab_size")
# LoRA targets whose input is the model's hidden state (every attention projection of models.causal.LORA_TARGETS)
_ATTENTION_INPUTS = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "c_attn", "query_key_value", "Wqkv"}
_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder / 'config.json'}: cannot read ({one_line(exc)})") from None
    if not isinstance(config, dict):
        raise DataError(f"{folder / 'config.json'}: not a JSON object")
    return config


def _first(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((config[k] for k in keys if isinstance(config.get(k), int)), None)


def check_model_folder(model: Any) -> None:
    """``--model DIR`` (not a name of an embedded model): a folder holding config.json."""
    if model is None or str(model) in ("minilm", "smollm2"):
        return
    p = Path(model)
    if not p.is_dir():
        raise DataError(f"--model {p}: model folder not found")
    if not (p / "config.json").is_file():
        raise DataError(f"--model {p}: not a model folder (no config.json)")


def folder_head_classes(folder: Path) -> int | None:
    """Classes of the classification head stored in model folder ``folder`` (None: it has none)."""
    config = _config(folder)
    if not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return None
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


class AdapterInfo:
    """What :func:`inspect_adapter` learned: the head's classes (None: no head) and notes for the log."""

    def __init__(self, head_classes: int | None, notes: list[str]):
        self.head_classes = head_classes
        self.notes = notes


def inspect_adapter(adapter: Path, model_folder: Path, causal: bool) -> AdapterInfo:
    """Check that ``adapter`` belongs to the base model in ``model_folder`` without loading either.

    Raises:
        DataError: not an adapter folder, another task type, another base model (named config field or
            tensor shape), or an unreadable adapter_config.json / weights header.
    """
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise DataError(f"--adapter {adapter}: adapter folder not found")
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise DataError(f"--adapter {adapter}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        acfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{config_file}: cannot read ({one_line(exc)})") from None
    task = str(acfg.get("task_type") or "")
    wanted = "CAUSAL_LM" if causal else "SEQ_CLS"
    if task and task != wanted:
        kind = "a causal LM" if causal else "a classifier"
        raise DataError(f"{config_file}: task_type {task}, but --model {model_folder} is {kind} (needs {wanted}); "
                        "give --model the base the adapter was trained on")
    notes: list[str] = []
    model_cfg = _config(model_folder)
    base = acfg.get("base_model_name_or_path")
    if base and Path(str(base)).expanduser().is_dir() and (Path(str(base)).expanduser() / "config.json").is_file():
        base_dir = Path(str(base)).expanduser()
        if base_dir.resolve() != Path(model_folder).resolve():
            base_cfg = _config(base_dir)
            for key in _ARCH_KEYS:
                if key in base_cfg and key in model_cfg and base_cfg[key] != model_cfg[key]:
                    raise DataError(f"--adapter {adapter}: trained on another base model: adapter_config.json names "
                                    f"{base_dir} ({key} {base_cfg[key]}), but --model {model_folder} has {key} "
                                    f"{model_cfg[key]}; give --model the base it was trained on")
            notes.append(f"adapter_config.json of {adapter} names base {base_dir}; --model {model_folder} has the "
                         "same architecture")
    elif base:
        notes.append(f"adapter_config.json of {adapter} names base {base!r} (not a folder here): checked by shapes")
    head = _check_shapes(adapter, model_cfg, model_folder)
    return AdapterInfo(head, notes)


def _check_shapes(adapter: Path, model_cfg: dict[str, Any], model_folder: Path) -> int | None:
    """The adapter's tensor shapes against the base config (hidden size, layers); returns the head's classes."""
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return None  # a .bin adapter: shapes are checked when it loads
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 — safetensors raises its own error types for a corrupt header
        raise DataError(f"{weights}: cannot read the adapter's weights ({one_line(exc)})") from None
    hidden = _first(model_cfg, _HIDDEN_KEYS)
    layers = _first(model_cfg, _LAYER_KEYS)
    head: tuple[int, int] | None = None
    for key, shape in sorted(shapes.items()):
        parts = key.split(".")
        leaf = parts[-3] if len(parts) >= 3 and parts[-2] in ("lora_A", "lora_B") else None
        if leaf in _ATTENTION_INPUTS and parts[-2] == "lora_A" and hidden and len(shape) == 2 and shape[1] != hidden:
            raise DataError(f"--adapter {adapter}: trained on another base model: its LoRA matrix {key} reads "
                            f"{shape[1]} features, but --model {model_folder} has hidden size {hidden}")
        m = _LAYER_INDEX.search(key)
        if m and layers and int(m.group(1)) >= layers:
            raise DataError(f"--adapter {adapter}: trained on another base model: it has weights for layer "
                            f"{m.group(1)} ({key}), but --model {model_folder} has {layers} layers")
        if "lora_" not in key and key.endswith(".weight") and len(shape) == 2 and \
                any(p in ("classifier", "score", "out_proj") for p in parts):
            if head is None or shape[0] < head[0]:
                head = (shape[0], shape[1])
    return None if head is None else head[0]


def align_target_labels(train: TextDataset, target: TextDataset, train_path: Path, target_path: Path,
                        column: str) -> TextDataset:
    """``target`` with its labels as class ids of ``train`` (a classifier's classes come from the training file).

    Raises:
        DataError: a target label the training file never uses (named by file, line and column).
    """
    to_id = {n: i for i, n in enumerate(train.label_names)}
    for i, y in enumerate(target.labels):
        name = target.label_names[y]
        if name not in to_id:
            raise DataError(f"{target_path}: line {target.row(i)}, column '{column}': label {name!r} does not "
                            f"occur in {train_path} (its classes: {', '.join(train.label_names)})")
    return TextDataset(list(target.texts), [to_id[target.label_names[y]] for y in target.labels],
                       list(train.label_names), rows=target.rows, notes=target.notes)


_DEFAULT_LABEL = re.compile(r"LABEL_\d+")


def folder_head_label_names(folder: Path, classes: int) -> list[str] | None:
    """The class names of the head in ``folder``'s config.json by class id (its ``id2label``), when it names
    all ``classes`` outputs with names of its own (not transformers' placeholders LABEL_k); else None."""
    id2label = _config(folder).get("id2label")
    if not isinstance(id2label, dict) or len(id2label) != classes:
        return None
    try:
        names = [str(id2label.get(str(k), id2label.get(k))).strip() for k in range(classes)]
    except (TypeError, ValueError):
        return None
    if any(n in ("", "None") or _DEFAULT_LABEL.fullmatch(n) for n in names) or len(set(names)) != classes:
        return None
    return names


def _integer_labels(ds: TextDataset) -> bool:
    return ds.label_names == [str(k) for k in range(len(ds.label_names))]


def labels_for_head(ds: TextDataset, path: Path, column: str, classes: int, names: list[str] | None,
                    whose: str) -> tuple[TextDataset, str | None]:
    """``ds`` with its labels as class ids of a fixed classification head of ``classes`` outputs, and a note
    (None: nothing to say).  Integer labels are the head's ids as written.  Class names are looked up in the
    head's own ``names`` when it has them; without them they are taken in sorted order as the head's classes
    0..k−1, which only a file naming all ``classes`` classes can do (said in the note).

    Raises:
        DataError: a label that is not a class of the head (file, line, column, label and the head's classes),
            or names a nameless head cannot be matched to (fewer classes than the head has).
    """
    if _integer_labels(ds) or (names is None and ds.num_classes > classes):
        for i, y in enumerate(ds.labels):
            if y >= classes:
                raise DataError(f"{path}: line {ds.row(i)}, column '{column}': label {ds.label_names[y]!r} is class "
                                f"{y} of the data's {ds.num_classes} ({', '.join(ds.label_names)}), outside the "
                                f"{classes} classes of {whose}")
        return ds, None
    if names is not None:
        to_id = {n: k for k, n in enumerate(names)}
        for i, y in enumerate(ds.labels):
            if ds.label_names[y] not in to_id:
                raise DataError(f"{path}: line {ds.row(i)}, column '{column}': label {ds.label_names[y]!r} is not a "
                                f"class of {whose} ({', '.join(names)})")
        mapped = TextDataset(list(ds.texts), [to_id[ds.label_names[y]] for y in ds.labels], list(names),
                             rows=ds.rows, notes=ds.notes)
        return mapped, None
    if ds.num_classes < classes:
        raise DataError(f"{path}: column '{column}' names {ds.num_classes} classes ({', '.join(ds.label_names)}), "
                        f"but {whose} has {classes} and names none of them, so which output is which label is "
                        f"unknown; write the labels as its class ids 0..{classes - 1}, or give --model a folder "
                        "whose config.json names the classes (id2label)")
    return ds, (f"{whose} names no classes: the labels of {path.name} are taken in sorted order as its classes "
                + ", ".join(f"{k} = {n}" for k, n in enumerate(ds.label_names))
                + " (if it was trained with another numbering, write the labels as class ids)")


def labelled_encodings(ds: InstructionDataset, rows: UserRows, response_column: str, tokenizer: Any,
                       max_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids of every example of ``ds`` (read from ``rows``), each with at least one labelled token, and
    how many prompts lost tokens to ``max_length``.

    Raises:
        DataError: an example whose response cannot be scored, named by file, line and column.
    """
    def where(i: int) -> str:
        line = ds.row(i)
        return f"{rows.path}: line {line}, column '{rows.column_of(line, 'messages', response_column)}'"

    encoded = encode_instructions(ds, tokenizer, max_length, where=where)
    for i, enc in enumerate(encoded.encodings):
        if not any(t != -100 for t in enc["labels"]):
            raise DataError(f"{where(i)}: no token of the response is labelled, so the example has no loss to score")
    return encoded.encodings, encoded.truncated
