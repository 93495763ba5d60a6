"""LoRA causal LMs: loading (fresh LoRA or a saved adapter) and evaluation on instruction data.

Fine-tuning is :func:`hyperinf_ext.app.models.training.finetune` with ``loss_fn=causal_lm_loss`` (the mean
next-token loss over each example's response tokens, the loss the influence passes use).
``transformers`` and ``peft`` are imported inside the functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

# one forward serves loss and accuracy: the loss is taken from the logits
from ...capture.losses import causal_from_logits, model_inputs
from ..data.dataset import DataError
from ..messages import one_line

__all__ = ["LORA_TARGETS", "lora_targets", "load_causal_lora_model", "evaluate_causal"]

#: LoRA target modules tried in order: the first set whose names all occur in the model is used
#: (q/v projections as in the LoRA paper; fused projections for GPT-2 and GPT-NeoX style models).
LORA_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("query_key_value",), ("Wqkv",),
)


def lora_targets(model: torch.nn.Module) -> list[str]:
    """The LoRA target module names for ``model`` (see :data:`LORA_TARGETS`)."""
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              or type(m).__name__ == "Conv1D"}
    for targets in LORA_TARGETS:
        if all(t in leaves for t in targets):
            return list(targets)
    raise DataError(f"no known attention projection to put LoRA on (looked for {LORA_TARGETS}); "
                    f"linear layers present: {', '.join(sorted(leaves))[:200]}")


def load_causal_lora_model(
    path: str | Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] | None = None,
    adapter: str | Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Causal LM in folder ``path`` + LoRA (``task_type="CAUSAL_LM"``), as a ``peft.PeftModel`` in eval mode.

    A fresh LoRA goes on ``target_modules`` (default: :func:`lora_targets`), seeded with ``seed``
    inside a forked RNG; ``adapter`` loads a saved adapter instead (trainable).

    Raises:
        DataError: not a model folder, an invalid adapter folder, or loading fails.
    """
    from .training import _model_dir, _offline, _quiet_hf, attach_lora, check_adapter_folder
    from .vlm import is_vlm, load_vlm_lora_model

    p = _model_dir(path)
    if is_vlm(p):  # a vision-language model: LoRA on its language model (see models.vlm)
        return load_vlm_lora_model(p, rank=rank, alpha=alpha, target_modules=target_modules, adapter=adapter,
                                   seed=seed, dtype=dtype)
    check_adapter_folder(adapter)
    _offline()
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]), _quiet_hf():
        torch.manual_seed(int(seed))
        try:
            base = AutoModelForCausalLM.from_pretrained(str(p), attn_implementation="eager",
                                                        local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise DataError(f"{p}: cannot load causal LM ({one_line(exc)})") from None
        return attach_lora(base, p, adapter, lambda: LoraConfig(
            task_type="CAUSAL_LM", r=int(rank), lora_alpha=alpha, lora_dropout=0.0,
            target_modules=list(target_modules or lora_targets(base))))


@torch.no_grad()
def evaluate_causal(model: torch.nn.Module, loader: Any) -> dict[str, float]:
    """Mean response loss and answer exact-match accuracy over an instruction ``loader``.

    Exact match: every response token is the model's argmax given the true prefix — the same as
    greedy decoding reproducing the response token for token (end-of-turn tokens included).

    Returns:
        ``{"accuracy": float in [0, 1], "loss": float}``, both averaged per example.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, total, count = 0, 0.0, 0
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            logits = model(**model_inputs(batch)).logits
            labels = batch["labels"]
            total += float(causal_from_logits(logits, labels, batch.get("attention_mask")).sum())
            target = labels[:, 1:]
            hit = (logits[:, :-1].argmax(-1) == target) | (target == -100)
            correct += int(hit.all(dim=1).sum())
            count += labels.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("loader yielded no examples")
    return {"accuracy": correct / count, "loss": total / count}
