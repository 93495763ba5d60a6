"""What differs between a classifier run and a causal-LM run of the pipeline: the model folder, the data, the encoding.

A causal LM (``--model smollm2`` or a folder whose config names a ``...ForCausalLM``) takes instruction
data (:mod:`hyperinf_ext.app.data.instruction`): the embedded Rotten Tomatoes set becomes sentiment
instructions, a ``--data`` file holds prompt/response columns or chat messages.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..data.instruction import (
    InstructionDataset,
    encode_instructions,
    ensure_pad_token,
    load_instruction_file,
    rotten_tomatoes_instructions,
)
from .llm import is_causal_lm, resolve_model

__all__ = ["model_dir", "is_causal", "load_instruction", "encode_instruction_splits"]


def model_dir(cfg: Any, log: Callable[[str], None] | None = None) -> Path:
    """The base model folder of ``cfg.model`` (the embedded SmolLM2 is de-quantised and cached on first use)."""
    return resolve_model(cfg.model, log=log)


def is_causal(cfg: Any) -> bool:
    """Whether ``cfg.model`` is a causal LM (instruction data) rather than a classifier."""
    return str(cfg.model) == "smollm2" or (cfg.model not in (None, "minilm") and is_causal_lm(cfg.model))


def load_instruction(path: Path | None, cfg: Any) -> InstructionDataset:
    """Instruction file ``path`` (``cfg``'s prompt/response columns), or the embedded Rotten Tomatoes set."""
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
    cut = train_encoded.truncated + val_encoded.truncated
    if cut:
        notes.append(f"{cut} prompt(s) longer than --max-length {max_length} lost tokens from their middle "
                     "(responses are never truncated)")
    return train_encoded.encodings, val_encoded.encodings, notes
