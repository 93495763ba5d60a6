"""LoRA model loading, fine-tuning and evaluation for sequence classification.

``transformers`` and ``peft`` are imported inside the functions: importing
them costs seconds, and users of the rest of the package (e.g. the kernels)
should not pay for it.

Loading is strictly offline: only local folders are accepted and
``local_files_only=True`` is passed everywhere.

Typical use::

    tok = load_tokenizer()
    model = load_lora_model(seed=0)                      # PeftModel, 74,498 trainable
    loader = make_loader(train, tok, batch_size=16, shuffle=True, sort_by_length=True)
    history = finetune(model, loader, epochs=3)          # model ends in eval mode
    evaluate(model, make_loader(val, tok))               # {"accuracy": ..., "loss": ...}
    model.save_pretrained(out_dir)                       # adapter only; reload with adapter=
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

# The model inputs of a batch are chosen by the same rule as in the influence passes, so a model
# is fine-tuned, evaluated and attributed on the same inputs ("labels" and "index" are consumed here).
from ...capture.losses import MODEL_INPUT_KEYS, model_inputs
from ..data.dataset import DataError
from ..data.packaged import default_model_path
from ..messages import one_line

__all__ = ["load_tokenizer", "load_lora_model", "finetune", "evaluate", "MODEL_INPUT_KEYS"]


def _offline() -> None:
    # huggingface_hub reads these when first imported; setdefault leaves an
    # explicit user choice alone.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Silence the weight-loading progress bar, the expected "classifier
    MISSING" load report and library deprecation warnings, restoring the
    previous settings afterwards (we must not change global state)."""
    from transformers.utils import logging as hf_logging

    old_level = hf_logging.get_verbosity()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if bars_were_on:
        hf_logging.disable_progress_bar()
    peft_logger = logging.getLogger("peft")
    old_peft_level = peft_logger.level
    peft_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(old_level)
        if bars_were_on:
            hf_logging.enable_progress_bar()
        peft_logger.setLevel(old_peft_level)


def check_adapter_folder(adapter: str | Path | None) -> None:
    """``DataError`` when ``adapter`` is given but holds no adapter_config.json (before any model is loaded)."""
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise DataError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")


def attach_lora(base: torch.nn.Module, folder: Path, adapter: str | Path | None, config: Callable[[], Any]) -> Any:
    """``base`` with a fresh LoRA (``config()``: a ``peft.LoraConfig``) or the saved ``adapter`` (trainable), in
    eval mode; the one way the causal-LM and VLM loaders attach LoRA.  ``DataError`` naming the adapter
    folder (or ``folder``) when PEFT cannot attach it."""
    from peft import PeftModel, get_peft_model

    try:
        if adapter is None:
            model = get_peft_model(base, config())
        else:
            model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DataError(f"{adapter or folder}: cannot attach LoRA ({one_line(exc)})") from None
    model.eval()
    return model


def _model_dir(path: str | Path | None) -> Path:
    p = default_model_path() if path is None else Path(path)
    if not p.is_dir():
        raise DataError(f"{p}: model folder not found")
    if not (p / "config.json").is_file():
        raise DataError(f"{p}: not a model folder (no config.json)")
    return p


def load_tokenizer(path: str | Path | None = None) -> Any:
    """Tokenizer stored in model folder ``path`` (default: :func:`default_model_path`).

    Raises:
        DataError: ``path`` is not a model folder or holds no usable tokenizer.
    """
    p = _model_dir(path)
    _offline()
    from transformers import AutoTokenizer

    try:
        with _quiet_hf():
            return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{p}: cannot load tokenizer ({one_line(exc)})") from None


def load_lora_model(
    path: str | Path | None = None,
    *,
    num_labels: int = 2,
    rank: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] = ("query", "value"),
    dropout: float = 0.0,
    adapter: str | Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Sequence-classification base model + LoRA adapter, as a ``peft.PeftModel``.

    The base model (``path``, default :func:`default_model_path`) is loaded
    offline with ``attn_implementation="eager"``; its classification head is
    new (randomly initialised) unless the checkpoint has one.

    * ``adapter=None``: a fresh LoRA (``task_type="SEQ_CLS"``, rank ``rank``,
      ``lora_alpha=alpha`` on ``target_modules``). The classifier head is in
      ``modules_to_save`` and trainable too. For all-MiniLM-L6-v2 with the
      defaults: 73,728 LoRA + 770 classifier = 74,498 trainable parameters.
    * ``adapter=folder``: an adapter saved with ``model.save_pretrained``,
      loaded trainable; the LoRA hyper-parameters are then read from the
      folder and the arguments above are ignored (``num_labels`` must match).

    Random initialisation (classifier head, LoRA A matrices) is seeded with
    ``seed`` inside ``torch.random.fork_rng``, so the caller's global RNG
    stream is left as it was.

    Returns:
        ``PeftModel`` in eval mode, parameters of ``dtype`` (LoRA weights
        and classifier trainable, everything else frozen).

    Raises:
        DataError: ``path`` is not a model folder (no config.json), the
            adapter folder is missing/invalid, or loading fails.
    """
    p = _model_dir(path)
    if adapter is not None:
        a = Path(adapter)
        if not a.is_dir():
            raise DataError(f"{a}: adapter folder not found")
        if not (a / "adapter_config.json").is_file():
            raise DataError(f"{a}: not a PEFT adapter folder (no adapter_config.json)")
    stored = _head_labels(p)
    if stored is not None and stored != int(num_labels):
        raise DataError(f"{p}: the model's classification head has {stored} labels but {int(num_labels)} are "
                        f"needed (the data's classes); use data with {stored} classes or a base model without a head")
    _offline()
    from transformers import AutoModelForSequenceClassification
    from peft import LoraConfig, PeftModel, get_peft_model

    with torch.random.fork_rng(devices=[]), _quiet_hf():
        torch.manual_seed(int(seed))
        try:
            base = AutoModelForSequenceClassification.from_pretrained(
                str(p),
                num_labels=int(num_labels),
                attn_implementation="eager",
                local_files_only=True,
                dtype=dtype,
            )
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise DataError(f"{p}: cannot load model ({one_line(exc)})") from None
        if adapter is None:
            cfg = LoraConfig(
                task_type="SEQ_CLS",
                r=int(rank),
                lora_alpha=alpha,
                target_modules=list(target_modules),
                lora_dropout=float(dropout),
            )
            try:
                model = get_peft_model(base, cfg)
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{p}: cannot attach LoRA ({one_line(exc)})") from None
        else:
            try:
                model = PeftModel.from_pretrained(
                    base, str(adapter), is_trainable=True, local_files_only=True
                )
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
                shape = re.search(r"classifier\S*weight: copying a param with shape torch.Size\(\[(\d+), (\d+)\]\) "
                                  r"from checkpoint, the shape in current model is torch.Size\(\[(\d+), (\d+)\]\)", str(exc))
                if shape and shape.group(1) != shape.group(3):
                    raise DataError(f"{adapter}: the adapter's classification head has {shape.group(1)} labels but "
                                    f"{int(num_labels)} are needed (the data's classes)") from None
                if shape:  # same label count: the head reads another number of features, i.e. another base
                    raise DataError(f"{adapter}: the adapter was trained on another base model (its classification "
                                    f"head reads {shape.group(2)} features, this model's {shape.group(4)}); give "
                                    f"--model the base it was trained on") from None
                raise DataError(f"{adapter}: cannot load adapter ({one_line(exc)})") from None
    model.eval()
    return model


def _check_labels(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Class ids must index the model's outputs (cross_entropy raises a bare IndexError otherwise); float labels
    must be whole numbers (``cross_entropy`` would take them as probabilities or they would be truncated), and
    a one-output head is a regression head (cross-entropy over one class is 0 for every example)."""
    if n_classes < 2:
        raise DataError(f"model: its head has {n_classes} output (a regression head); classification needs at "
                        "least 2 classes")
    if labels.is_floating_point():
        frac = labels != labels.round()
        if bool(frac.any()):
            raise DataError(f"labels: {labels[frac].unique()[:5].tolist()} are not class ids (soft or regression "
                            "labels); classification needs integer class ids")
        labels = labels.long()
    bad = (labels < 0) | (labels >= n_classes)
    if bool(bad.any()):
        raise DataError(f"labels: class label(s) {labels[bad].unique()[:5].tolist()} outside [0, {n_classes}) "
                        f"of the model's {n_classes} outputs (the data has more classes than the model)")
    return labels


def _head_labels(p: Path) -> int | None:
    """Number of labels of the classification head stored in model folder ``p`` (None: no head)."""
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return None  # from_pretrained reports an unreadable config itself
    if not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return None
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def _inputs_on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in model_inputs(batch).items()}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def finetune(
    model: torch.nn.Module,
    loader: Any,
    *,
    epochs: int = 3,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
) -> list[dict]:
    """Train the trainable parameters of ``model`` with AdamW and cross-entropy.

    Constant learning rate, no warm-up, no gradient clipping. The model is in
    train mode during the loop (so base-model dropout is active) and is left
    in eval mode.

    Determinism: dropout randomness is drawn from a forked RNG seeded with
    ``seed`` (the caller's global RNG is not advanced). Batch order comes from
    ``loader`` (see ``make_loader(seed=...)``); note a shuffling loader
    continues its stream if reused, so build a fresh loader to repeat a run.

    Args:
        model: classifier returning ``.logits`` of shape ``(B, C)``.
        loader: yields dicts with ``input_ids``/``attention_mask``
            (``(B, L)`` long), optional ``token_type_ids`` and ``labels``
            (``(B,)`` long); other keys (e.g. ``index``) are ignored.
        log: optional callable receiving a one-line summary per epoch.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-example losses whose mean is minimised
            (e.g. :func:`~hyperinf_ext.capture.losses.causal_lm_loss` for instruction data);
            default: cross-entropy of ``logits (B, C)`` against class ``labels (B,)``.

    Returns:
        One dict per epoch: ``{"epoch": int (1-based), "loss": float (mean
        per-example training loss), "seconds": float}``.
    """
    from tqdm.auto import tqdm

    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    device = _device(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    history: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model.train()
        try:
            for epoch in range(1, int(epochs) + 1):
                t0 = time.perf_counter()
                total, count = 0.0, 0
                bar = tqdm(
                    loader, desc=f"epoch {epoch}/{epochs}", disable=not progress,
                    leave=False, unit="batch",
                )
                for batch in bar:
                    labels = batch["labels"].to(device)
                    if loss_fn is None:
                        logits = model(**_inputs_on_device(batch, device)).logits
                        labels = _check_labels(labels, logits.shape[-1])
                        # fp32 loss even for low-precision models: log-softmax in
                        # bf16 loses the small differences late in training.
                        loss = F.cross_entropy(logits.float(), labels)
                    else:
                        on_device = {**_inputs_on_device(batch, device), "labels": labels}
                        loss = loss_fn(model, on_device).float().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    n = labels.shape[0]
                    total += loss.item() * n
                    count += n
                    bar.set_postfix(loss=f"{total / count:.4f}")
                bar.close()
                if count == 0:
                    raise ValueError("loader yielded no examples")
                rec = {
                    "epoch": epoch,
                    "loss": total / count,
                    "seconds": time.perf_counter() - t0,
                }
                history.append(rec)
                if log is not None:
                    log(f"epoch {epoch}/{epochs}: loss {rec['loss']:.4f} ({rec['seconds']:.1f} s)")
        finally:
            model.eval()
    return history


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` over ``loader``.

    Runs in eval mode (no dropout) without gradients; the model's previous
    train/eval mode is restored.

    Returns:
        ``{"accuracy": float in [0, 1], "loss": float}`` (both averaged per example).
    """
    device = _device(model)
    was_training = model.training
    model.eval()
    correct, total_loss, count = 0, 0.0, 0
    try:
        for batch in loader:
            labels = batch["labels"].to(device)
            logits = model(**_inputs_on_device(batch, device)).logits.float()
            labels = _check_labels(labels, logits.shape[-1])
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(dim=-1) == labels).sum())
            count += labels.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("loader yielded no examples")
    return {"accuracy": correct / count, "loss": total_loss / count}
