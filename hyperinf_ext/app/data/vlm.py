"""Image + text instruction data for vision-language models: loading, the processor's chat template, batches.

A row of a JSONL (or CSV) file holds an image path (``image``) or several (``images``: a list; in CSV a
JSON list) plus ``prompt``/``response`` columns or a chat ``messages`` list, as for a causal LM
(:mod:`.instruction`).  Relative image paths are resolved against the data file's folder.  Every image
is opened (PIL) when the file is read, so a missing or unreadable image is a one-line
:class:`DataError` naming the file, its line and the image path, before any model work.

:func:`encode_vlm` renders each example through the model's own processor (``AutoProcessor`` of the
model folder): the images go first in the first user turn (``{"type": "image"}`` entries, then the
text), the processor expands each image into its image tokens, and the labels are −100 on the whole
prompt (image tokens included) and on padding, so the loss is the mean over the response tokens only.
Prompts are never truncated (cutting an image's tokens would break the model's image/feature match).

:func:`make_vlm_loader` batches examples like :func:`~.batching.make_loader` (length-sorted, ``index``
per example), adding the processor's image tensors (``pixel_values`` and whatever else it gives,
e.g. ``pixel_attention_mask``, ``image_grid_thw``), recomputed per batch rather than held in memory.

``transformers`` is never imported here; the processor is passed in.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.data import DataLoader

from ..messages import one_line
from .batching import Collator, _IndexedTexts, _LengthBatchSampler
from .dataset import DataError
from .files import _CSV_SUFFIXES, _read_csv_rows, _read_json_rows
from .instruction import Encoded, InstructionDataset, ensure_pad_token, load_instruction_file

__all__ = ["VLMDataset", "load_processor", "load_vlm_file", "check_image", "encode_vlm", "VLMCollator",
           "make_vlm_loader", "IMAGE_COLUMNS"]

IMAGE_COLUMNS = ("image", "images")


@dataclass
class VLMDataset(InstructionDataset):
    """An :class:`InstructionDataset` whose examples each have one or more images (absolute paths).

    ``model_dir``: the VLM folder whose processor reads the data (:func:`load_vlm_file` sets it).  With it,
    :func:`~.instruction.encode_instructions` and :func:`~.batching.make_loader` hand the data set to
    :meth:`own_encoding` / :meth:`own_loader` (the processor's tokens and image batches), so every command
    that tokenizes and batches instruction data takes image data unchanged."""

    images: list[list[str]] = field(default_factory=list)
    model_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.images) != len(self.texts):
            raise ValueError(f"VLMDataset: {len(self.texts)} texts but {len(self.images)} image lists")

    @classmethod
    def from_examples(cls, prompts: Sequence[list[dict[str, str]]], responses: Sequence[str],
                      images: Sequence[Sequence[str]], rows: Sequence[int] | None = None,
                      model_dir: str | None = None) -> "VLMDataset":
        """Build from prompt messages, response strings and each example's image paths."""
        base = InstructionDataset.from_pairs(prompts, responses, rows)
        return cls(base.texts, base.labels, base.label_names, base.prompts, rows=base.rows,
                   images=[list(x) for x in images], model_dir=model_dir)

    def subset(self, indices: Iterable[int]) -> "VLMDataset":
        idx = [int(i) for i in indices]
        base = super().subset(idx)
        return VLMDataset(base.texts, base.labels, base.label_names, base.prompts, rows=base.rows,
                          images=[list(self.images[i]) for i in idx], model_dir=self.model_dir)

    def with_labels(self, labels: Sequence[int]) -> "VLMDataset":
        base = super().with_labels(labels)
        return VLMDataset(base.texts, base.labels, base.label_names, base.prompts, rows=base.rows,
                          images=[list(x) for x in self.images], model_dir=self.model_dir)

    def processor(self) -> Any:
        if self.model_dir is None:
            raise ValueError("VLMDataset.model_dir: not set; the data set does not know its model's processor")
        return load_processor(self.model_dir)

    def own_encoding(self, tokenizer: Any, max_length: int, where: Callable[[int], str] | None = None) -> Encoded:
        """What :func:`~.instruction.encode_instructions` returns for this data set (``tokenizer`` and
        ``max_length`` are unused: the processor's tokenizer reads it, and prompts are never truncated)."""
        return Encoded(encode_vlm(self, self.processor(), where), 0)

    def own_loader(self, tokenizer: Any, *, batch_size: int = 32, shuffle: bool = False,
                   sort_by_length: bool = False, seed: int = 0, max_length: int = 64,
                   encodings: Sequence[dict] | None = None) -> DataLoader:
        """What :func:`~.batching.make_loader` returns for this data set: :func:`make_vlm_loader`."""
        proc = self.processor()
        encodings = encode_vlm(self, proc) if encodings is None else encodings
        return make_vlm_loader(self, proc, encodings, batch_size=batch_size, shuffle=shuffle,
                               sort_by_length=sort_by_length, seed=seed)


@lru_cache(maxsize=4)
def load_processor(folder: str) -> Any:
    """``AutoProcessor`` of the model folder (tokenizer, image processor, chat template), offline.

    Raises:
        DataError: no processor, or one without a chat template (the data are rendered through it).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise DataError(f"{folder}: cannot load the model's processor ({one_line(exc)})") from None
    if not hasattr(proc, "tokenizer") or not hasattr(proc, "image_processor"):
        raise DataError(f"{folder}: {type(proc).__name__} is not an image+text processor")
    if not getattr(proc, "chat_template", None):
        raise DataError(f"{folder}: the processor has no chat template (chat_template.jinja)")
    return proc


def _image_paths(path: Path, where: int, row: dict[str, Any]) -> list[str]:
    value = next((row[c] for c in IMAGE_COLUMNS if row.get(c) not in (None, "", [])), None)
    if value is None:
        raise DataError(f"{path}: line {where}: no image; a vision-language model's rows need an 'image' path "
                        "or an 'images' list")
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {where}: 'images' is not a JSON list of paths") from None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise DataError(f"{path}: line {where}: 'image'/'images' must be a path or a list of paths")
    return [str((path.parent / v.strip()).resolve()) if not Path(v.strip()).is_absolute() else v.strip()
            for v in values]


def check_image(file: Path, where: int, image: str) -> None:
    """Open and verify ``image`` (PIL); a one-line DataError naming ``file``, its line and the image otherwise."""
    if not Path(image).is_file():
        raise DataError(f"{file}: line {where}: image {image}: file not found")
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading images needs Pillow (pip install pillow)") from None
    try:
        with Image.open(image) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types for a broken file
        raise DataError(f"{file}: line {where}: image {image}: cannot read ({one_line(exc)})") from None


def load_vlm_file(path: str | Path, prompt_column: str = "prompt", response_column: str = "response",
                  model_dir: str | Path | None = None) -> VLMDataset:
    """Prompt/response (or ``messages``) rows with their images; every image is checked here.

    Raises:
        DataError: what :func:`load_instruction_file` refuses, a row without an image, a missing or
            unreadable image (the file, line and image path in one line).
    """
    path = Path(path)
    ds = load_instruction_file(path, prompt_column, response_column)
    rows = _read_csv_rows(path)[1] if path.name.lower().endswith(_CSV_SUFFIXES) else _read_json_rows(path)
    by_line = {where: row for where, row in rows}
    images = []
    for where in ds.rows or []:
        paths = _image_paths(path, where, by_line[where])
        for image in paths:
            check_image(path, where, image)
        images.append(paths)
    return VLMDataset(ds.texts, ds.labels, ds.label_names, ds.prompts, rows=ds.rows, notes=ds.notes,
                      images=images, model_dir=None if model_dir is None else str(model_dir))


# ------------------------------------------------------------------------------ encoding


def vlm_messages(prompt: list[dict[str, str]], n_images: int, response: str | None = None) -> list[dict]:
    """Chat messages in the processors' format: the images first in the first user turn, then its text."""
    out, placed = [], False
    for m in prompt:
        content = [{"type": "text", "text": m["content"]}]
        if not placed and m["role"] == "user":
            content = [{"type": "image"} for _ in range(n_images)] + content
            placed = True
        out.append({"role": m["role"], "content": content})
    if not placed:
        raise ValueError("the prompt has no user turn to put the images in")
    if response is not None:
        out.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return out


def _load_images(paths: Sequence[str]) -> list[Any]:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def _prompt_text(processor: Any, prompt: list[dict], images: int, response: str) -> tuple[str, str]:
    head = processor.apply_chat_template(vlm_messages(prompt, images), add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(vlm_messages(prompt, images, response), tokenize=False)
    return head, (full[len(head):] if full.startswith(head) else response)


def image_inputs(processor: Any, head: str, paths: Sequence[str]) -> dict[str, Any]:
    """The processor's output for one prompt and its images (``input_ids`` and the image tensors)."""
    return dict(processor(text=[head], images=[_load_images(paths)], add_special_tokens=False, return_tensors="pt"))


def vision_rows(inputs: dict[str, Any]) -> int:
    """Rows one example gives the vision tower: images or tiles (``pixel_values [1, tiles, 3, H, W]``
    for Idefics3-style models, ``[images, 3, H, W]`` for LLaVA) or flattened patches (Qwen2-VL)."""
    pv = inputs.get("pixel_values")
    if pv is None:
        return 0
    return int(pv.shape[1]) if pv.dim() == 5 else int(pv.shape[0])


def encode_vlm(ds: VLMDataset, processor: Any, where: Callable[[int], str] | None = None) -> list[dict[str, Any]]:
    """Tokenize prompt (with its expanded image tokens) + response of every example; labels −100 on the prompt.

    Returns one dict per example: ``input_ids``, ``attention_mask``, ``labels`` (lists, as
    :func:`~.batching.make_loader` takes them), ``head`` (the rendered prompt, which the batches
    re-process with the images) and ``vision_rows`` (:func:`vision_rows`).

    Raises:
        DataError: a response that tokenizes to nothing or holds the image token, a template that drops
            the images, or a processor that refuses an example (names it).
    """
    name = where or (lambda i: f"example {i} (line {ds.row(i)})")
    tok = processor.tokenizer
    ensure_pad_token(tok)
    image_id = getattr(processor, "image_token_id", None)
    if image_id is None and getattr(processor, "image_token", None):
        image_id = tok.convert_tokens_to_ids(processor.image_token)
    encodings: list[dict[str, Any]] = []
    for i, (prompt, response, paths) in enumerate(zip(ds.prompts, ds.responses, ds.images)):
        head, tail = _prompt_text(processor, prompt, len(paths), response)
        try:
            inputs = image_inputs(processor, head, paths)
        except (ValueError, TypeError, KeyError, RuntimeError, OSError) as exc:
            raise DataError(f"{name(i)}: the processor cannot read this example ({one_line(exc)})") from None
        p = [int(t) for t in inputs["input_ids"][0].tolist()]
        r = [int(t) for t in tok(tail, add_special_tokens=False)["input_ids"]]
        if not r:
            raise DataError(f"{name(i)}: the response tokenizes to nothing, so the example has no token to score")
        if image_id is not None and image_id in r:
            raise DataError(f"{name(i)}: the response holds the image token {processor.image_token!r}")
        if image_id is not None and image_id not in p:
            raise DataError(f"{name(i)}: the chat template dropped the image(s): no image token in the prompt")
        ids = p + r
        encodings.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(p) + r,
                          "head": head, "vision_rows": vision_rows(inputs)})
    return encodings


# ------------------------------------------------------------------------------ batches


def _merge(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along axis 0 after zero-padding every other axis to the largest (Idefics3 pads a batch's
    image axis with all-zero images, which the model drops; LLaVA and Qwen2-VL stack images/patches)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape[1:]:
            z = t.new_zeros([t.shape[0]] + shape[1:])
            z[tuple(slice(0, s) for s in t.shape)] = t
            t = z
        padded.append(t)
    return torch.cat(padded, dim=0)


class VLMCollator:
    """:class:`~.batching.Collator` batches (``input_ids``, ``attention_mask``, token ``labels``, ``index``)
    plus the processor's image tensors of the batch's examples."""

    def __init__(self, processor: Any, ds: VLMDataset, encodings: Sequence[dict[str, Any]]):
        self.processor = processor
        self.ds = ds
        self.encodings = list(encodings)
        self.tokens = Collator(processor.tokenizer, max_length=max(2, max(len(e["input_ids"]) for e in encodings)),
                               cache=self.encodings)

    def __call__(self, items: Sequence[tuple[str, int, int]]) -> dict[str, torch.Tensor]:
        batch = self.tokens(items)
        per_key: dict[str, list[torch.Tensor]] = {}
        for _, _, i in items:
            inputs = image_inputs(self.processor, self.encodings[i]["head"], self.ds.images[i])
            for k, v in inputs.items():
                if k not in ("input_ids", "attention_mask", "token_type_ids") and isinstance(v, torch.Tensor):
                    per_key.setdefault(k, []).append(v)
        for k, vs in per_key.items():
            batch[k] = _merge(vs)
        return batch


def make_vlm_loader(ds: VLMDataset, processor: Any, encodings: Sequence[dict[str, Any]], *, batch_size: int = 1,
                    shuffle: bool = False, sort_by_length: bool = False, seed: int = 0) -> DataLoader:
    """DataLoader of :class:`VLMCollator` batches over ``ds`` (options as :func:`~.batching.make_loader`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(ds) == 0:
        raise DataError("cannot build a loader over an empty data set")
    if len(encodings) != len(ds):
        raise ValueError(f"encodings: {len(encodings)} for a data set of {len(ds)} examples")
    lengths = [len(e["input_ids"]) for e in encodings]
    collate = VLMCollator(processor, ds, encodings)
    items = _IndexedTexts(ds)
    if sort_by_length:
        loader = DataLoader(items, batch_sampler=_LengthBatchSampler(lengths, batch_size, shuffle, seed),
                            collate_fn=collate)
    else:
        gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
        loader = DataLoader(items, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=collate)
    loader.token_lengths = lengths  # type: ignore[attr-defined]
    return loader
