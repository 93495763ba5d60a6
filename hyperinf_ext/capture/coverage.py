"""What the captured layers leave out of a model's trainable parameters: refused or named, never silent.

Two rules (:func:`check_coverage`):

* an **active LoRA layer the hooks cannot capture exactly** (LoRA on Conv or MultiheadAttention, on a
  bare parameter — PEFT's ``target_parameters``, e.g. fused MoE experts —, a LoRA variant other than
  DoRA, a LoRA layer class whose forward is unknown) is an **error**: the LoRA matrices are what the
  scores are about, and leaving some out changes every score. The message names each module, why, its
  parameter count and its share. Choosing layers explicitly (``layers=[...]``) turns it into a warning:
  the user then asked for a subset.
* **other trainable parameters** no captured layer covers (a ``modules_to_save`` copy that is not
  ``nn.Linear``, e.g. an embedding or a transformers ``Conv1D``; base weights or biases left trainable,
  e.g. LoRA's ``bias="all"``; PEFT's trainable tokens) give a **warning** naming them and their share:
  the LoRA scores stay exact, and fine-tuning a few extra parameters is common enough that refusing
  would block ordinary setups.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

__all__ = ["Skipped", "check_coverage"]


@dataclass
class Skipped:
    """A module (path) whose parameters get no influence, and why."""

    path: str
    params: list = field(repr=False)
    reason: str

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.params}.values())


def _describe(items: list[Skipped], total: int, limit: int = 8) -> str:
    lines = []
    for s in items[:limit]:
        share = 100.0 * s.numel / total if total else 0.0
        lines.append(f"  - {s.path}: {s.reason} ({s.numel:,} parameters = {share:.3g}% of the {total:,} the "
                     "adapter trains)")
    if len(items) > limit:
        rest = sum(s.numel for s in items[limit:])
        lines.append(f"  - ... and {len(items) - limit} more ({rest:,} parameters)")
    return "\n".join(lines)


def _uncovered_trainable(model: nn.Module, accounted: set[int], lora_cls, wrapper_cls) -> list[Skipped]:
    """Trainable parameters outside the LoRA layers and modules_to_save wrappers, grouped by module."""
    for path, module in model.named_modules():
        if isinstance(module, lora_cls):
            # a LoRA layer's own parameters (inactive adapters too) are the LoRA logic's business;
            # its base layer's are not
            accounted.update(id(p) for n, p in module.named_parameters() if not n.startswith("base_layer."))
        elif isinstance(module, wrapper_cls):
            accounted.update(id(p) for p in module.parameters())
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in accounted:
            accounted.add(id(p))
            groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(p)
    return [Skipped(path, ps, "trainable parameters outside the LoRA layers") for path, ps in groups.items()]


def check_coverage(model: nn.Module, found: list, lora_skipped: list[Skipped], other_skipped: list[Skipped], *,
                   chosen: bool, lora_cls, wrapper_cls) -> None:
    """Raise for LoRA layers that cannot be captured (warn when ``chosen``); warn for other trainable
    parameters that get no influence. Shares are of every parameter the captured layers, the skipped
    LoRA layers and the other trainable parameters hold together."""
    accounted = {id(p) for g in found for p in g.parameters}
    for s in lora_skipped + other_skipped:
        accounted.update(id(p) for p in s.params)
    extra = _uncovered_trainable(model, accounted, lora_cls, wrapper_cls)
    params = {id(p): p for g in found for p in g.parameters}
    for s in lora_skipped + other_skipped + extra:
        params.update({id(p): p for p in s.params})
    total = sum(p.numel() for p in params.values())
    if lora_skipped:
        text = (f"{len(lora_skipped)} LoRA layer(s) cannot be attributed exactly (per-sample gradients through "
                f"hooks need nn.Linear or embedding LoRA, plain, rsLoRA or DoRA):\n{_describe(lora_skipped, total)}")
        if not chosen:
            raise ValueError(text + "\nAttributing without them would change every score. Pass layers=[...] naming "
                             "the supported layers to attribute only those (these are then named in a warning), "
                             "or leave these modules out of the LoRA target_modules.")
        warnings.warn(text + "\nThey get no influence (layers= was given).", UserWarning, stacklevel=3)
    rest = other_skipped + extra
    if rest:
        warnings.warn(f"{len(rest)} module(s) with trainable parameters get no influence (only LoRA matrices and "
                      f"nn.Linear heads are attributed):\n{_describe(rest, total)}", UserWarning, stacklevel=3)
