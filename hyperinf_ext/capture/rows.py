"""Which rows of a captured layer's input belong to which example of the batch.

Most layers see ``[n, T, d]`` (examples first).  Some see other rows: a vision-language model's vision tower
and projector one row per image or tile; a mixture-of-experts block its tokens flattened to ``[n·T, d]``
(Qwen2-MoE's shared expert all of them in batch-major order, a routed expert only those routed to it, in the
router's order).  The names below tell these layers apart (:mod:`.hooks` uses them).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from torch import Tensor, nn

__all__ = ["IMAGE_SIDE", "EXPERT_SIDE", "ROUTED_EXPERT", "rows_key", "image_token_id", "rows_hint"]


def rows_key(batch: Mapping[str, Any]) -> str | None:
    """The batch entry that gives its number of examples (rows): ``input_ids``, ``inputs_embeds`` or ``labels``."""
    return next((k for k in ("input_ids", "inputs_embeds", "labels")
                 if isinstance(batch.get(k), Tensor) and batch[k].dim() >= 1), None)


IMAGE_SIDE = ("vision", "visual", "multi_modal_projector", "mm_projector", "connector")
"""Parts of a layer name that place it on a vision-language model's image side (rows = images)."""
EXPERT_SIDE = ("experts", "expert.", "block_sparse_moe", ".moe.")
"""Name parts of a mixture-of-experts expert layer (Qwen2-MoE, Mixtral, DeepSeek: ``mlp.experts.N.*``)."""
ROUTED_EXPERT = re.compile(r"\.experts\.\d+\.")
"""A routed expert's layer (``...experts.3.gate_proj``): its rows are the tokens routed to it."""


def image_token_id(model: nn.Module) -> int | None:
    """The image placeholder token of a vision-language model's config (``image_token_id``, LLaVA's
    ``image_token_index``), looked up through a PEFT wrapper; None when it has none."""
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        cfg = getattr(m, "config", None)
        for key in ("image_token_id", "image_token_index"):
            value = getattr(cfg, key, None)
            if isinstance(value, int):
                return value
    return None


def rows_hint(name: str) -> str:
    """Why a layer's input rows may not be the batch's examples, for the layer ``name`` names."""
    if any(part in name for part in EXPERT_SIDE):
        return ("a mixture-of-experts block flattens the batch's tokens before its experts, and a routed expert "
                "sees only those routed to it, in the router's order, so its rows cannot be told apart by example "
                "(a shared expert's [batch·tokens, d] rows can): give it batches of one example "
                "(fit_batch_size=1), or leave the routed experts out of the LoRA targets")
    return ("a vision-language model's vision tower or projector sees one row per image or tile: give it batches "
            "of one example, or of examples with one image each")
