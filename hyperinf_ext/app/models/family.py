"""What differs between a classifier run, a causal-LM run and a vision-language run of the pipeline.

A causal LM (``--model smollm2`` or a folder whose config names a ``...ForCausalLM``) takes instruction
data (:mod:`hyperinf_ext.app.data.instruction`): the embedded Rotten Tomatoes set becomes sentiment
instructions, a ``--data`` file holds prompt/response columns or chat messages.

A vision-language model (a folder with a ``vision_config`` and a ``...ForConditionalGeneration``
architecture, :func:`~.vlm.is_vlm`) is run as a causal LM over image + text instructions
(:mod:`hyperinf_ext.app.data.vlm`): the file's rows name their images, the model's processor renders
them, and the data set tokenizes and batches itself, so the commands' instruction path takes it as is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.dataset import DataError
from ..data.instruction import (
    InstructionDataset,
    encode_instructions,
    ensure_pad_token,
    load_instruction_file,
    rotten_tomatoes_instructions,
    truncation_note,
)
from ..data.vlm import VLMDataset, load_vlm_file
from .llm import is_causal_lm, resolve_model
from .vlm import is_vlm

__all__ = ["model_dir", "is_causal", "is_vlm_model", "load_instruction", "encode_instruction_splits",
           "default_fit_batch"]

#: Influence batch size of a VLM whose examples give the vision tower one row each (one image, one tile):
#: the vision tower and projector then see one row per example, as per-sample gradients need.
VLM_FIT_BATCH_SIZE = 8


def model_dir(cfg: Any, log: Callable[[str], None] | None = None) -> Path:
    """The base model folder of ``cfg.model`` (the embedded SmolLM2 is de-quantised and cached on first use)."""
    return resolve_model(cfg.model, log=log)


def is_vlm_model(cfg: Any) -> bool:
    """Whether ``cfg.model`` is a vision-language model folder (image + text instruction data)."""
    return cfg.model not in (None, "minilm", "smollm2") and is_vlm(cfg.model)


def is_causal(cfg: Any) -> bool:
    """Whether ``cfg.model`` is a causal LM or a VLM (instruction data) rather than a classifier."""
    return str(cfg.model) == "smollm2" or (cfg.model not in (None, "minilm") and
                                           (is_causal_lm(cfg.model) or is_vlm(cfg.model)))


def load_instruction(path: Path | None, cfg: Any) -> InstructionDataset:
    """Instruction file ``path`` (``cfg``'s prompt/response columns), or the embedded Rotten Tomatoes set;
    for a VLM, image + text rows read with the model folder's processor (every image checked here)."""
    if is_vlm_model(cfg):
        if path is None:
            raise DataError(f"--model {cfg.model} is a vision-language model: give a data file whose rows name "
                            "their images ('image' or 'images'); there is no embedded image data set")
        return load_vlm_file(path, cfg.prompt_column, cfg.response_column, model_dir=str(Path(cfg.model)))
    if path is None:
        return rotten_tomatoes_instructions()
    return load_instruction_file(path, cfg.prompt_column, cfg.response_column)


def encode_instruction_splits(
    train: InstructionDataset, val: InstructionDataset, tokenizer: Any, max_length: int,
) -> tuple[list[dict], list[dict], list[str]]:
    """Token ids with response-only labels of both splits, and notes for the log (pad token, truncations)."""
    notes = []
    note = ensure_pad_token(tokenizer)
    if note:
        notes.append(note)
    train_encoded = encode_instructions(train, tokenizer, max_length)
    val_encoded = encode_instructions(val, tokenizer, max_length)
    truncated = truncation_note(train_encoded.truncated + val_encoded.truncated, max_length)
    notes += [truncated] if truncated else []
    if isinstance(train, VLMDataset):
        notes.append("vision-language model: prompts are read whole with their image tokens (--max-length unused)")
    return train_encoded.encodings, val_encoded.encodings, notes


def default_fit_batch(ds: InstructionDataset, encodings: Sequence[Sequence[dict]], otherwise: int) -> int:
    """The influence batch size when none is set: ``otherwise``, but for VLM data 1 unless every example
    gives the vision tower exactly one row (:data:`VLM_FIT_BATCH_SIZE` then): a LoRA on the vision tower or
    projector is captured per example only when its rows are the examples (or the batch holds one)."""
    if not isinstance(ds, VLMDataset):
        return otherwise
    one_row = all(e.get("vision_rows") == 1 for enc in encodings for e in enc)
    return VLM_FIT_BATCH_SIZE if one_row else 1
