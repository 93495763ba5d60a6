"""Per-example losses of a batch, and the model inputs taken from a batch.

Each loss returns a ``[B]`` tensor (one value per example), as per-sample gradients need; an
example without a valid loss raises :class:`ExampleError` naming its batch rows.
"""
from __future__ import annotations

import functools
import inspect
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
    "token_classification_loss",
    "seq2seq_lm_loss",
    "default_loss_fn",
]

#: Batch keys forwarded to the model by :func:`model_inputs`, in the influence passes and in fine-tuning
#: and evaluation (:mod:`hyperinf_ext.app.models.training`) alike: the token keys our Collator makes
#: (:data:`hyperinf_ext.app.data.batching.TOKEN_KEYS`) plus what other loaders may carry for the model, and
#: the image inputs of vision-language models (what their processors give: LLaVA ``pixel_values``,
#: Idefics3/SmolVLM ``pixel_attention_mask``, LLaVA-NeXT ``image_sizes``, Qwen2-VL ``image_grid_thw``).
#: An encoder-decoder's decoder inputs (``decoder_input_ids``, ``decoder_attention_mask``) are forwarded too.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
                    "pixel_values", "pixel_attention_mask", "image_sizes", "image_grid_thw",
                    "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds")

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
    ``attention_mask``, ``token_type_ids``, ``position_ids``, ``inputs_embeds``, a VLM's image
    inputs and an encoder-decoder's decoder inputs); ``labels``, ``index`` and anything else are dropped.
    """
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and batch[k] is not None}


def _hf_model(model: Any) -> nn.Module | None:
    """The transformers model inside ``model`` (itself, or the one a PEFT / other wrapper holds), else ``None``."""
    if not isinstance(model, nn.Module):
        return None
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    for m in model.modules():  # the model itself first, then PeftModel -> LoraModel -> the transformers model
        if isinstance(m, PreTrainedModel):
            return m
    return None


@functools.lru_cache(maxsize=None)
def _token_level_class_names() -> frozenset[str]:
    """transformers' token-classification and masked-LM classes: one unshifted target per token."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:  # pragma: no cover
        return frozenset()
    names: set[str] = set()
    for mapping in ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"):
        for v in getattr(auto, mapping, {}).values():
            names.update([v] if isinstance(v, str) else v)
    return frozenset(names)


def _model_kind(model: Any) -> str | None:
    """``"seq2seq"`` (encoder-decoder), ``"token"`` (token classification / masked LM: no shift), ``"causal"``
    (any other transformers model), or ``None`` (not a transformers model: token labels are taken as causal)."""
    hf = _hf_model(model)
    if hf is None:
        return None
    if getattr(hf.config, "is_encoder_decoder", False):
        return "seq2seq"
    name = type(hf).__name__
    if not getattr(hf.config, "is_decoder", False) and (
            name.endswith(("ForTokenClassification", "ForMaskedLM")) or name in _token_level_class_names()):
        return "token"
    return "causal"


def _takes_position_ids(model: Any) -> bool:
    hf = _hf_model(model)
    target = hf if hf is not None else model
    if hf is not None:
        # Multimodal-RoPE models (Qwen2-VL & co.) build 3-D positions from the image grid themselves: 2-D
        # positions would replace them.  Their own positions already follow attention_mask.
        for m in (hf, getattr(hf, "model", None)):
            if m is not None and (hasattr(m, "get_rope_index") or hasattr(m, "compute_3d_position_ids")):
                return False
    try:
        params = inspect.signature(target.forward if isinstance(target, nn.Module) else target).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params


def _forward_inputs(model: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`model_inputs`, plus ``position_ids`` counted from ``attention_mask`` for a left-padded batch.

    Without them a model with absolute position embeddings (GPT-2, BERT) would place a left-padded
    example's first real token at position (number of pads), not 0, so its loss and gradient would depend
    on its batch's padding; ``generate()`` passes the same ids.  Unpadded and right-padded batches (where
    the ids would change nothing) are forwarded as they are, and so are batches that carry ``position_ids``.
    """
    inputs = model_inputs(batch)
    mask = inputs.get("attention_mask")
    if ("position_ids" not in inputs and isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] > 0
            and bool((mask[:, 0] == 0).any()) and _takes_position_ids(model)):
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return inputs


def _call(model: Any, inputs: Mapping[str, Any]) -> Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def _logits(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    return _call(model, _forward_inputs(model, batch))


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
    if logits.dim() == 2 and labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # [B, 1]: one class id per example, unambiguous
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        multi = " (multi-label or soft targets?)" if labels.dim() == 2 and labels.shape == logits.shape else ""
        raise ValueError(
            f"labels of shape {list(labels.shape)}{multi} for logits of shape {list(logits.shape)}: the default "
            "loss is single-label cross-entropy, one class id per example (labels [B], logits [B, C]), or a "
            "per-token loss for labels shaped like input_ids; give a loss_fn(model, batch) -> [B] for these "
            "targets (e.g. binary_cross_entropy_with_logits(..., reduction='none').mean(-1) for multi-label)")
    labels = _class_ids(labels.to(logits.device), "class labels")
    _check_targets(labels, logits.shape[-1], "class labels")
    _require_labelled((labels != -100).long(), "label -100 (ignored)")
    return F.cross_entropy(_upcast(logits), labels, reduction="none")


def _mask_like(mask: Any, labels: Tensor) -> Tensor | None:
    """A 2-D attention mask of the labels' shape as a bool "padding" tensor, else ``None``."""
    if isinstance(mask, Tensor) and tuple(mask.shape) == tuple(labels.shape):
        return mask.to(labels.device) == 0
    return None


def _mean_token_loss(logits: Tensor, labels: Tensor, what: str) -> Tensor:
    """Per-example mean cross-entropy of ``logits [B, T, V]`` against ``labels [B, T]`` (-100 ignored)."""
    _check_targets(labels, logits.shape[-1], "token labels")
    count = (labels != -100).sum(dim=1)
    _require_labelled(count, what)
    tok = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    return tok.sum(dim=1) / count.to(tok.dtype)


def token_from_logits(logits: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Per-example mean cross-entropy of token ``t``'s logits against ``labels[:, t]`` (no shift), ignoring
    labels -100 and positions whose ``attention_mask`` is 0."""
    labels = _class_ids(labels.to(logits.device), "token labels")
    pad = _mask_like(attention_mask, labels)
    if pad is not None:
        labels = labels.masked_fill(pad, -100)
    return _mean_token_loss(_upcast(logits), labels, "no labelled token (labels all -100 or on padding)")


def causal_from_logits(logits: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Per-example mean next-token cross-entropy (see :func:`causal_lm_loss`) from logits ``[B, T, V]``."""
    labels = _class_ids(labels.to(logits.device), "token labels")
    shift_logits = _upcast(logits[:, :-1])
    shift_labels = labels[:, 1:]
    pad = _mask_like(attention_mask, labels)
    if pad is not None:
        # A target predicted from a pad position (the first real token, with left padding) and a target that is
        # itself padding (the first pad after the text, with right padding and labels = input_ids) are not
        # scored: either would make an example's loss depend on how much its batch is padded.
        shift_labels = shift_labels.masked_fill(pad[:, :-1] | pad[:, 1:], -100)
    return _mean_token_loss(shift_logits, shift_labels,
                            "no labelled token to predict (labels all -100 after the shift/padding)")


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
    """Per-example mean next-token cross-entropy, independent of the batch's padding.

    Logits ``[n, T, V]`` at position ``t`` are scored against ``labels[:, t + 1]``
    (the shift transformers applies); tokens labelled ``-100`` are ignored, and so
    are targets where ``attention_mask`` is 0 at the predicting position (with left
    padding, the first real token "predicted" from a pad) or at the target itself
    (with right padding and ``labels = input_ids``, the first pad token).  A
    left-padded batch without ``position_ids`` gets them counted from
    ``attention_mask`` (as ``generate()`` does), so absolute position embeddings
    (GPT-2) see each example at positions 0, 1, …  Each example's loss and gradient
    are those of the example alone, unpadded: the mean over its labelled tokens.

    Raises:
        ExampleError: an example has no labelled token (it has no loss), or a
            label is outside the vocabulary.

    Args:
        batch: model inputs (optional ``attention_mask [n, T]``) plus ``labels`` (int ``[n, T]``).

    Returns:
        ``[n]`` losses.
    """
    return causal_from_logits(_logits(model, batch), _labels(batch), batch.get("attention_mask"))


def token_classification_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Per-example mean cross-entropy of each token's logits against its own label (no shift).

    For token classification (``…ForTokenClassification``) and masked-LM heads: logits ``[n, T, C]`` at
    position ``t`` are scored against ``labels[:, t]``; labels ``-100`` and positions whose
    ``attention_mask`` is 0 are ignored; each example's loss is the mean over its labelled tokens.

    Raises:
        ExampleError: an example has no labelled token, or a label is outside the model's classes.

    Returns:
        ``[n]`` losses.
    """
    return token_from_logits(_logits(model, batch), _labels(batch), batch.get("attention_mask"))


def seq2seq_lm_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Per-example mean cross-entropy of an encoder-decoder (BART, T5) against its decoder ``labels``.

    ``labels [n, T_dec]`` are the decoder's targets, as transformers takes them: the decoder's logit at
    ``t`` is scored against ``labels[:, t]`` (no shift; the decoder inputs are the labels shifted right,
    made by the model's ``prepare_decoder_input_ids_from_labels`` unless the batch carries
    ``decoder_input_ids``).  Labels ``-100`` are ignored, and so are positions where
    ``decoder_attention_mask`` is 0 or, without one, labels equal to the pad token (when it is not
    the end-of-sequence token), so padding the targets changes no example's loss.  The encoder takes
    ``input_ids`` / ``attention_mask`` (pad it on the right).

    Raises:
        ExampleError: an example has no labelled token, or a label is outside the vocabulary.
        ValueError: no ``decoder_input_ids`` and the model cannot make them from the labels.

    Returns:
        ``[n]`` losses.
    """
    labels = _labels(batch)
    inputs = model_inputs(batch)
    hf = _hf_model(model)
    if "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs:
        prepare = getattr(hf, "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            raise ValueError("seq2seq loss: the batch has no 'decoder_input_ids' and the model has no "
                             "prepare_decoder_input_ids_from_labels to make them from the labels: add them to "
                             "the batch or give a loss_fn")
        inputs["decoder_input_ids"] = prepare(labels=labels.long().to(_device_of(inputs, labels)))
    logits = _call(model, inputs)
    targets = _class_ids(labels.to(logits.device), "token labels")
    dmask = batch.get("decoder_attention_mask")
    pad = _mask_like(dmask, targets)
    if pad is None and dmask is None and hf is not None:
        pad_id, eos_id = getattr(hf.config, "pad_token_id", None), getattr(hf.config, "eos_token_id", None)
        eos = set(eos_id) if isinstance(eos_id, (list, tuple)) else {eos_id}
        if isinstance(pad_id, int) and pad_id not in eos:
            pad = targets == pad_id
    if pad is not None:
        targets = targets.masked_fill(pad, -100)
    return _mean_token_loss(_upcast(logits), targets, "no labelled token (labels all -100 or padding)")


def _device_of(inputs: Mapping[str, Any], labels: Tensor) -> torch.device:
    for k in ("input_ids", "inputs_embeds", "attention_mask"):
        if isinstance(inputs.get(k), Tensor):
            return inputs[k].device
    return labels.device


def default_loss_fn(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """The loss that fits the model and the labels.

    * an encoder-decoder (``config.is_encoder_decoder``: BART, T5): :func:`seq2seq_lm_loss`;
    * token-level labels (``labels`` shaped like ``input_ids``, or ``inputs_embeds[..., 0]``, and 3-D logits
      ``[n, T, V]``): :func:`token_classification_loss` (no shift) for a token-classification or
      masked-LM model (``…ForTokenClassification``, ``…ForMaskedLM``), else :func:`causal_lm_loss`
      (next-token; also for a model that is not a transformers model);
    * otherwise :func:`classification_loss` (labels ``[n]``, or ``[n, 1]`` class ids).  Other labels
      (multi-label ``[n, C]``, regression) raise a ``ValueError``: give a ``loss_fn``.

    Returns:
        ``[n]`` losses.
    """
    kind = _model_kind(model)
    if kind == "seq2seq":
        return seq2seq_lm_loss(model, batch)
    labels = _labels(batch)
    logits = _logits(model, batch)
    if "input_ids" in batch and batch["input_ids"] is not None:
        token_shape = tuple(batch["input_ids"].shape)
    elif "inputs_embeds" in batch and batch["inputs_embeds"] is not None:
        token_shape = tuple(batch["inputs_embeds"].shape[:2])
    else:
        token_shape = None
    if logits.dim() == 3 and tuple(labels.shape) == token_shape:
        if kind == "token":
            return token_from_logits(logits, labels, batch.get("attention_mask"))
        return causal_from_logits(logits, labels, batch.get("attention_mask"))
    return _classification_from_logits(logits, labels)
