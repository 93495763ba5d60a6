"""Vision-language models (image + text → text): detecting a VLM folder, its processor, LoRA on it.

A VLM folder is what ``save_pretrained`` writes for a transformers image-text-to-text model (LLaVA,
Idefics3/SmolVLM, Qwen2-VL and kin) plus its processor: ``config.json`` with a ``vision_config`` and a
``...ForConditionalGeneration`` architecture, the tokenizer, the image processor and the chat template.
It loads with ``AutoModelForImageTextToText`` (or ``AutoModelForVision2Seq`` of older releases); its
processor with :func:`hyperinf_ext.app.data.vlm.load_processor`.

A fresh LoRA goes on the language model's q/v projections only (:func:`vlm_lora_targets`;
``projector=True`` adds the multimodal projector's linear layers, ``vision=True`` the vision tower's
q/v projections); a saved ``adapter`` keeps wherever its author put LoRA.  Influence is computed for
every LoRA matrix present (:func:`hyperinf_ext.capture.find_gradient_layers` finds them anywhere).

``transformers`` and ``peft`` are imported inside the functions.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.dataset import DataError
from ..messages import one_line

__all__ = ["is_vlm", "language_model_path", "vlm_lora_targets", "load_vlm_lora_model",
           "PROJECTOR_NAMES", "VISION_NAMES"]

#: Attribute names of the multimodal projector in transformers' VLMs (LLaVA, Idefics3/SmolVLM, Qwen2-VL, …).
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger", "mm_projector", "visual_projection")
#: LoRA target leaf names tried in order (as :data:`hyperinf_ext.app.models.causal.LORA_TARGETS`, which
#: imports this module, plus the fused ``qkv`` of Qwen2-VL's vision blocks).
LORA_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("query_key_value",), ("Wqkv",), ("qkv",),
)
#: Attribute names of the vision tower.
VISION_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder")


def is_vlm(folder: str | Path | None) -> bool:
    """Whether ``folder`` holds an image-text-to-text model (a ``vision_config`` and a conditional-generation
    architecture)."""
    if folder is None:
        return False
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    archs = [str(a) for a in config.get("architectures") or []]
    return "vision_config" in config and any(a.endswith(("ForConditionalGeneration", "ForImageTextToText"))
                                             for a in archs)


def _module_path(model: torch.nn.Module, target: torch.nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is target), None)


def language_model_path(model: torch.nn.Module) -> str:
    """Module path of the language model inside a VLM (``model.language_model``, ``model.text_model``, …)."""
    lm = model.get_decoder() if hasattr(model, "get_decoder") else None
    path = None if lm is None else _module_path(model, lm)
    if not path:
        for name, _ in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("language_model", "text_model"):
                return name
        raise DataError(f"{type(model).__name__}: cannot find the language model inside the VLM")
    return path


def _linears_under(model: torch.nn.Module, prefixes: Sequence[str], leaves: Sequence[str] | None) -> list[str]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.startswith(p + ".") for p in prefixes):
            if leaves is None or name.rsplit(".", 1)[-1] in leaves:
                out.append(name)
    return out


def vlm_lora_targets(model: torch.nn.Module, *, projector: bool = False, vision: bool = False) -> list[str]:
    """Full module names for LoRA: the language model's q/v projections (the first entry of
    :data:`LORA_TARGETS` it has), plus every linear layer of the projector and/or the vision tower's q/v
    projections when asked."""
    lm = language_model_path(model)
    leaves = {n.rsplit(".", 1)[-1] for n in _linears_under(model, [lm], None)}
    pair = next((t for t in LORA_TARGETS if all(x in leaves for x in t)), None)
    if pair is None:
        raise DataError(f"no known attention projection in the language model {lm} (looked for {LORA_TARGETS})")
    names = _linears_under(model, [lm], pair)
    if projector:
        found = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTOR_NAMES]
        more = _linears_under(model, found, None)
        if not more:
            raise DataError(f"{type(model).__name__}: no projector ({', '.join(PROJECTOR_NAMES)}) with linear layers")
        names += more
    if vision:
        found = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in VISION_NAMES]
        vleaves = {n.rsplit(".", 1)[-1] for n in _linears_under(model, found, None)}
        vpair = next((t for t in LORA_TARGETS if all(x in vleaves for x in t)), None)
        if not found or vpair is None:
            raise DataError(f"{type(model).__name__}: no vision tower attention projections to put LoRA on")
        names += [n for n in _linears_under(model, found, vpair) if n not in names]
    return names


def _auto_classes() -> list[Any]:
    import transformers

    return [getattr(transformers, n) for n in ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
            if hasattr(transformers, n)]


def load_vlm_lora_model(
    path: str | Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] | None = None,
    adapter: str | Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    projector: bool = False,
    vision: bool = False,
) -> Any:
    """VLM in folder ``path`` + LoRA, as a ``peft.PeftModel`` in eval mode.

    A fresh LoRA (seeded with ``seed`` in a forked RNG) goes on ``target_modules`` (default
    :func:`vlm_lora_targets` with ``projector``/``vision``); ``adapter`` loads a saved adapter instead.

    Raises:
        DataError: not a model folder, an invalid adapter folder, or loading fails.
    """
    from .training import _model_dir, _offline, _quiet_hf, attach_lora, check_adapter_folder

    p = _model_dir(path)
    check_adapter_folder(adapter)
    _offline()
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]), _quiet_hf():
        torch.manual_seed(int(seed))
        base, errors = None, []
        for cls in _auto_classes():
            try:
                base = cls.from_pretrained(str(p), local_files_only=True, dtype=dtype)
                break
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
                errors.append(one_line(exc))
        if base is None:
            raise DataError(f"{p}: cannot load vision-language model ({errors[-1] if errors else 'no auto class'})")
        return attach_lora(base, p, adapter, lambda: LoraConfig(
            r=int(rank), lora_alpha=alpha, lora_dropout=0.0,
            target_modules=list(target_modules or vlm_lora_targets(base, projector=projector, vision=vision))))
