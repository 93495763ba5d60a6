"""Per-example losses of a batch, and the model inputs taken from a batch.

Each loss returns a ``[B]`` tensor (one value per example), as per-sample gradients need; an
example without a valid loss raises :class:`ExampleError` naming its batch rows.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MODEL_INPUT_KEYS",
    "LossFn",
    "ExampleError",
    "model_inputs",
    "classification_loss",
    "causal_lm_loss",
    "default_loss_fn",
]

#: Batch keys forwarded to the model by :func:`model_inputs`, in the influence passes and in fine-tuning
#: and evaluation (:mod:`hyperinf_ext.app.models.training`) alike: the token keys our Collator makes
#: (:data:`hyperinf_ext.app.data.batching.TOKEN_KEYS`) plus what other loaders may carry for the model, and
#: the image inputs of vision-language models (what their processors give: LLaVA ``pixel_values``,
#: Idefics3/SmolVLM ``pixel_attention_mask``, LLaVA-NeXT ``image_sizes``, Qwen2-VL ``image_grid_thw``).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
                    "pixel_values", "pixel_attention_mask", "image_sizes", "image_grid_thw")

LossFn = Callable[[nn.Module, Mapping[str, Any]], Tensor]


class ExampleError(ValueError):
    """Some examples of a batch have no valid loss (e.g. no labelled token, a label out of range).

    ``rows`` are their positions in the batch and ``problem`` says what is wrong;
    :class:`~hyperinf_ext.HyperINF` re-raises it naming the examples' ``index``.
    """

    def __init__(self, problem: str, rows: Sequence[int]):
        self.problem = problem
        self.rows = list(rows)
        super().__init__(f"batch rows {self.rows[:10]}: {problem}")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` a transformers model accepts as inputs.

    Returns the present, non-``None`` entries of :data:`MODEL_INPUT_KEYS` (``input_ids``,
    ``attention_mask``, ``token_type_ids``, ``position_ids``, ``inputs_embeds`` and a VLM's image
    inputs); ``labels``, ``index`` and anything else are dropped.
    """
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and batch[k] is not None}


def _logits(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    out = model(**model_inputs(batch))
    return out.logits if hasattr(out, "logits") else out[0]


def _labels(batch: Mapping[str, Any]) -> Tensor:
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("batch has no 'labels'")
    return labels


def _upcast(logits: Tensor) -> Tensor:
    # Softmax/log-sum-exp in half precision loses too much for influence scores.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _check_targets(targets: Tensor, n_classes: int, what: str) -> None:
    """Targets other than -100 must be valid class ids (cross_entropy fails with a raw error otherwise)."""
    bad = (targets != -100) & ((targets < 0) | (targets >= n_classes))
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().squeeze(1).tolist()
        values = targets[bad].unique()[:5].tolist()
        raise ExampleError(f"{what} {values} outside [0, {n_classes}) of the model's {n_classes} outputs", rows)


def _require_labelled(count: Tensor, what: str) -> None:
    # An example without a labelled target has no loss, so any influence score for it would be a
    # meaningless zero: refuse rather than return it.
    empty = (count == 0).nonzero().squeeze(1).tolist()
    if empty:
        raise ExampleError(f"{what}, so they have no loss; drop them from the data", empty)


def _class_ids(labels: Tensor, what: str) -> Tensor:
    """Labels as class ids.  Floating labels are taken only where every value is a whole number: ``.long()``
    would truncate soft or regression targets (0.7 → class 0) into a loss that means nothing."""
    if labels.is_floating_point() or labels.is_complex():
        frac = labels != labels.round() if labels.is_floating_point() else labels.imag != 0
        if bool(frac.any()):
            rows = frac.reshape(frac.shape[0], -1).any(1).nonzero().squeeze(1).tolist() if frac.dim() else [0]
            values = labels[frac].unique()[:5].tolist()
            raise ExampleError(f"{what} {values} are not class ids (soft or regression labels, {labels.dtype}): a "
                               "classification loss needs integer labels; give a loss_fn for other targets", rows)
    return labels.long()


def _classification_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    if logits.dim() >= 1 and logits.shape[-1] == 1:
        raise ValueError("logits: the model has one output (a regression head); cross-entropy over one class is 0 "
                         "for every example, so every score would be 0: give a loss_fn (e.g. squared error)")
    labels = _class_ids(labels.to(logits.device), "class labels")
    if labels.dim() == 1 and logits.dim() == 2:
        _check_targets(labels, logits.shape[-1], "class labels")
        _require_labelled((labels != -100).long(), "label -100 (ignored)")
    return F.cross_entropy(_upcast(logits), labels, reduction="none")


def causal_from_logits(logits: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    labels = _class_ids(labels.to(logits.device), "token labels")
    shift_logits = _upcast(logits[:, :-1])
    shift_labels = labels[:, 1:]
    if attention_mask is not None:
        # With left padding the first real token would be "predicted" from a pad
        # position; dropping it keeps an example's loss independent of its padding.
        shift_labels = shift_labels.masked_fill(attention_mask[:, :-1].to(labels.device) == 0, -100)
    _check_targets(shift_labels, shift_logits.shape[-1], "token labels")
    count = (shift_labels != -100).sum(dim=1)
    _require_labelled(count, "no labelled token to predict (labels all -100 after the shift/padding)")
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    return tok.sum(dim=1) / count.to(tok.dtype)


def classification_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Per-example cross-entropy of ``model(**model_inputs(batch)).logits``.

    Args:
        batch: model inputs plus ``labels`` (int ``[n]``).

    Returns:
        ``[n]`` losses (float32 for half-precision logits, else the logits' dtype).

    Raises:
        ExampleError: a label is -100 (an ignored example has no loss), not a
            class id of the model, or a float that is not a whole number (soft labels).
        ValueError: a one-output (regression) head.
    """
    return _classification_from_logits(_logits(model, batch), _labels(batch))


def causal_lm_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Per-example mean next-token cross-entropy.

    Logits ``[n, T, V]`` at position ``t`` are scored against ``labels[:, t + 1]``
    (the shift transformers applies); tokens labelled ``-100`` are ignored, and
    so are targets predicted from a position whose ``attention_mask`` is 0 (with
    left padding transformers would score the first real token from a pad
    token; ignoring it makes the loss independent of padding).
    Each example's loss is the mean over its labelled tokens.

    Raises:
        ExampleError: an example has no labelled token (it has no loss), or a
            label is outside the vocabulary.

    Args:
        batch: model inputs (optional ``attention_mask [n, T]``) plus ``labels`` (int ``[n, T]``).

    Returns:
        ``[n]`` losses.
    """
    return causal_from_logits(_logits(model, batch), _labels(batch), batch.get("attention_mask"))


def default_loss_fn(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """:func:`causal_lm_loss` for token-level labels, else :func:`classification_loss`.

    Token-level means ``labels`` has the shape of ``input_ids`` (or of
    ``inputs_embeds[..., 0]``) and the logits are 3-D ``[n, T, V]``.

    Returns:
        ``[n]`` losses.
    """
    labels = _labels(batch)
    logits = _logits(model, batch)
    if "input_ids" in batch and batch["input_ids"] is not None:
        token_shape = tuple(batch["input_ids"].shape)
    elif "inputs_embeds" in batch and batch["inputs_embeds"] is not None:
        token_shape = tuple(batch["inputs_embeds"].shape[:2])
    else:
        token_shape = None
    if logits.dim() == 3 and tuple(labels.shape) == token_shape:
        return causal_from_logits(logits, labels, batch.get("attention_mask"))
    return _classification_from_logits(logits, labels)
