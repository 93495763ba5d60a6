"""Per-sample gradients of the LoRA layers (and trainable heads) of a PEFT model.

One batched forward + backward pass is enough: a forward hook on every captured
``nn.Linear`` records the input it was fed, and a tensor hook on its output
receives the gradient of the loss w.r.t. that output.  For a linear layer
``y = x W^T + b`` the gradient of example ``i``'s loss w.r.t. ``W`` is
``sum_t delta[i, t]^T x[i, t]``, so per-sample gradients come from one einsum
over the token axis.  This works because every example's loss depends only on
its own row of the batch (true for the supported transformer models as long as
padding is masked and the model runs in eval mode).

All gradients are returned *rank-first*, i.e. as ``[n, r, d]`` with ``r`` the
LoRA rank, which is the layout the GFIM / Schulz kernels expect:

* ``lora_A``  (weight ``[r, d_in]``):   gradient ``[n, r, d_in]``
* ``lora_B``  (weight ``[d_out, r]``):  gradient transposed, ``[n, r, d_out]``
* ``head``    (weight ``[out, in]`` + bias ``[out]``): ``[n, out, in + 1]``,
  the bias gradient being the last column.

Only plain ``nn.Linear``-based LoRA is supported (``peft.tuners.lora.Linear``
and its quantised look-alikes); models must not use gradient checkpointing
(transformers switches it off in eval mode, which :meth:`PerSampleGradients.compute`
uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GradientLayer",
    "find_gradient_layers",
    "PerSampleGradients",
    "classification_loss",
    "causal_lm_loss",
    "default_loss_fn",
    "model_inputs",
    "MODEL_INPUT_KEYS",
    "ExampleError",
]

#: Batch keys forwarded to the model by :func:`model_inputs`.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")

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


# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class GradientLayer:
    """One weight matrix whose per-sample gradient is captured.

    Attributes:
        name: unique name, ``"<LoRA module path>.lora_A"`` / ``".lora_B"`` or
            ``"<modules_to_save wrapper path>[.<sub path>].head"``.
        kind: ``"lora_A"``, ``"lora_B"`` or ``"head"``.
        rank: ``r``, rows of the rank-first gradient. LoRA rank for
            ``lora_A``/``lora_B`` (``r + 1`` for a ``lora_B`` with bias, whose
            bias gradient is appended as an extra row); ``out_features`` for heads.
        dim: ``d``, columns of the rank-first gradient: ``in_features`` for
            ``lora_A``, ``out_features`` for ``lora_B``, ``in_features (+1 with
            bias)`` for heads.
        module: the ``nn.Linear`` the hooks are installed on (the active
            adapter's ``lora_A[adapter]`` / ``lora_B[adapter]`` /
            ``modules_to_save[adapter]`` copy).
    """

    name: str
    kind: str
    rank: int
    dim: int
    module: nn.Module = field(compare=False, repr=False)

    @property
    def transposed(self) -> bool:
        """True when the rank-first gradient is the transpose of the weight gradient."""
        return self.kind == "lora_B"

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def parameters(self) -> list[nn.Parameter]:
        """Weight (and bias) of :attr:`module`."""
        ps = [self.module.weight]
        if self.has_bias:
            ps.append(self.module.bias)
        return ps


def _lora_classes():
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import layer as lora_layer

    # Linear-shaped lora_A/lora_B but a forward that bypasses them (merges
    # weights or uses parametrisations), so hooks on lora_A/lora_B would see nothing.
    bypassing = tuple(
        c for c in (getattr(lora_layer, "MultiheadAttention", None), getattr(lora_layer, "ParamWrapper", None)) if c
    )
    return LoraLayer, bypassing


def _modules_to_save_class():
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - very old peft
        from peft.utils import ModulesToSaveWrapper
    return ModulesToSaveWrapper


def _active_adapters(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", [])
    if isinstance(active, str):
        return [active]
    return list(active)


def _linear_layer(name: str, kind: str, lin: nn.Linear) -> GradientLayer:
    out_f, in_f = lin.weight.shape
    extra = 1 if lin.bias is not None else 0
    if kind == "lora_B":
        return GradientLayer(name, kind, in_f + extra, out_f, lin)
    return GradientLayer(name, kind, out_f, in_f + extra, lin)


def _lora_layers(path: str, module: nn.Module, bypassing: tuple) -> list[GradientLayer]:
    if getattr(module, "disable_adapters", False):
        return []
    adapters = [a for a in _active_adapters(module) if a in getattr(module, "lora_A", {})]
    embedding_adapters = [a for a in _active_adapters(module) if a in getattr(module, "lora_embedding_A", {})]
    if embedding_adapters:
        raise ValueError(
            f"{path}: LoRA on {type(module).__name__} (embedding LoRA) is not supported; only nn.Linear LoRA is"
        )
    if not adapters:
        return []
    if len(adapters) > 1:
        raise ValueError(
            f"{path}: several active adapters {adapters}; per-sample gradients need exactly one "
            "(call model.set_adapter(name))"
        )
    adapter = adapters[0]
    if isinstance(module, bypassing):
        raise ValueError(f"{path}: LoRA on {type(module).__name__} is not supported; only nn.Linear LoRA is")
    if adapter in getattr(module, "lora_variant", {}):
        variant = type(module.lora_variant[adapter]).__name__
        raise ValueError(f"{path}: LoRA variant {variant} (e.g. DoRA) is not supported; only vanilla LoRA is")
    if adapter in getattr(module, "merged_adapters", []):
        raise ValueError(f"{path}: adapter {adapter!r} is merged into the base weights; unmerge it first")
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    if not (type(lora_a) is nn.Linear and type(lora_b) is nn.Linear):
        raise ValueError(
            f"{path}: LoRA on {type(module).__name__} with lora_A={type(lora_a).__name__}, "
            f"lora_B={type(lora_b).__name__} is not supported; only nn.Linear LoRA is"
        )
    return [_linear_layer(f"{path}.lora_A", "lora_A", lora_a), _linear_layer(f"{path}.lora_B", "lora_B", lora_b)]


def _head_layers(path: str, wrapper: nn.Module) -> list[GradientLayer]:
    if getattr(wrapper, "disable_adapters", False):
        return []
    copies = getattr(wrapper, "modules_to_save", {})
    active = _active_adapters(wrapper)
    # PEFT's wrapper falls back to the frozen original unless every active adapter has a copy.
    if not active or any(a not in copies for a in active):
        return []
    copy = copies[active[0]]
    out = []
    for sub, lin in copy.named_modules():
        if type(lin) is nn.Linear:
            out.append(_linear_layer(f"{path}.{sub}.head" if sub else f"{path}.head", "head", lin))
    return out


def find_gradient_layers(
    model: nn.Module,
    *,
    include_heads: bool = False,
    layers: Sequence[str] | None = None,
) -> list[GradientLayer]:
    """List the layers whose per-sample gradients can be captured.

    Args:
        model: a PEFT model (``PeftModel``, ``LoraModel`` or a module containing
            PEFT LoRA layers).
        include_heads: also return the ``nn.Linear`` modules kept trainable
            through PEFT ``modules_to_save`` (e.g. a classifier), using the
            active adapter's copy. Non-linear modules there are ignored.
        layers: optional names or substrings; only layers whose name equals or
            contains one of them are kept.

    Returns:
        ``GradientLayer`` list in ``model.named_modules()`` order, ``lora_A``
        before ``lora_B`` of each LoRA module. Only the active adapter is used;
        modules whose adapters are disabled or inactive are skipped.

    Raises:
        ValueError: the model has no active LoRA layer; an active LoRA layer is
            not ``nn.Linear``-based (Embedding/Conv/MHA LoRA, DoRA, ...) or is
            merged or has several active adapters; an entry of ``layers``
            matches nothing.
    """
    LoraLayer, bypassing = _lora_classes()
    wrapper_cls = _modules_to_save_class()
    found: list[GradientLayer] = []
    n_lora = 0
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            got = _lora_layers(path, module, bypassing)
            n_lora += len(got)
            found.extend(got)
        elif include_heads and isinstance(module, wrapper_cls):
            found.extend(_head_layers(path, module))
    if n_lora == 0:
        raise ValueError(
            f"{type(model).__name__} has no active LoRA layers (is it a PEFT LoRA model with adapters enabled?)"
        )
    if layers is not None:
        if isinstance(layers, str):
            layers = [layers]
        wanted = list(layers)
        missing = [w for w in wanted if not any(w == g.name or w in g.name for g in found)]
        if missing:
            names = [g.name for g in found]
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"layer name(s) {missing} match no gradient layer; available: {shown}")
        found = [g for g in found if any(w == g.name or w in g.name for w in wanted)]
    return found


# --------------------------------------------------------------------------- losses


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` a transformers model accepts as inputs.

    Returns the present, non-``None`` entries among ``input_ids``,
    ``attention_mask``, ``token_type_ids``, ``position_ids`` and
    ``inputs_embeds``; ``labels``, ``index`` and anything else are dropped.
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


def _classification_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    labels = labels.to(logits.device).long()
    if labels.dim() == 1 and logits.dim() == 2:
        _check_targets(labels, logits.shape[-1], "class labels")
        _require_labelled((labels != -100).long(), "label -100 (ignored)")
    return F.cross_entropy(_upcast(logits), labels, reduction="none")


def _causal_from_logits(logits: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    labels = labels.to(logits.device).long()
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
        ExampleError: a label is -100 (an ignored example has no loss) or not a
            class id of the model.
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
    return _causal_from_logits(_logits(model, batch), _labels(batch), batch.get("attention_mask"))


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
        return _causal_from_logits(logits, labels, batch.get("attention_mask"))
    return _classification_from_logits(logits, labels)


# --------------------------------------------------------------------------- capture


class _LayerCapture:
    """Hook state of one layer during one ``compute`` call."""

    def __init__(self, owner: "PerSampleGradients", layer: GradientLayer, dtype: torch.dtype):
        self.owner = owner
        self.layer = layer
        self.dtype = dtype
        self.grad: Tensor | None = None  # [n, rank, dim], summed over calls and tokens
        self.out: Tensor | None = None  # caller's buffer for ``grad`` (see PerSampleGradients.compute)
        self.calls = 0

    def forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        owner = self.owner
        if owner._phase == "backward":
            raise RuntimeError(
                f"{self.layer.name} ran forward during backward (gradient checkpointing / recomputation); "
                "per-sample gradient capture needs a model without gradient checkpointing"
            )
        if owner._phase != "forward" or not isinstance(output, Tensor) or not output.requires_grad:
            return
        if not args or not isinstance(args[0], Tensor):
            raise RuntimeError(f"{self.layer.name}: expected the input tensor as first positional argument")
        x = args[0].detach()
        if x.dim() < 2:
            raise RuntimeError(f"{self.layer.name}: input of shape {tuple(x.shape)} has no batch axis")
        self.calls += 1
        # Closure pairs this call's input with its own output gradient, so a
        # module used several times per forward accumulates correctly.
        output.register_hook(lambda g, x=x: self._accumulate(x, g))

    def _accumulate(self, x: Tensor, g: Tensor) -> None:
        n, d_in = x.shape[0], x.shape[-1]
        x = x.reshape(n, -1, d_in).to(self.dtype)
        g = g.reshape(n, -1, g.shape[-1]).to(self.dtype)
        if self.layer.has_bias:
            x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
        a, b = (x.transpose(1, 2), g) if self.layer.transposed else (g.transpose(1, 2), x)
        shape = (a.shape[0], a.shape[1], b.shape[2])  # [n, r, d] in the rank-first layout
        if self.grad is None and self.out is not None and tuple(self.out.shape) == shape:
            # straight into the caller's buffer (e.g. a slice of a stacked [L, n, r, d]): no copy later
            self.grad = torch.bmm(a, b, out=self.out)
            return None
        contrib = torch.bmm(a, b)
        if self.grad is None:
            self.grad = contrib
        elif self.grad.shape != contrib.shape:
            raise RuntimeError(
                f"{self.layer.name}: calls disagree on per-sample gradient shape "
                f"({tuple(self.grad.shape)} vs {tuple(contrib.shape)}); is the batch axis first?"
            )
        else:
            self.grad += contrib
        return None


class PerSampleGradients:
    """Context manager capturing per-sample gradients of ``layers`` from one batched pass.

    Hooks are installed on ``__enter__`` and removed on ``__exit__`` (also when
    an exception escapes). Hooks record nothing outside :meth:`compute`, so the
    model can be used normally inside the context.

    Args:
        model: the PEFT model ``loss_fn`` is called with.
        layers: layers from :func:`find_gradient_layers` (names must be unique).
        dtype: dtype of the returned gradients (and of the einsum computing
            them); default: each layer's weight dtype.

    Example::

        layers = find_gradient_layers(model, include_heads=True)
        with PerSampleGradients(model, layers) as psg:
            grads = psg.compute(batch)          # {name: [n, r, d]}
    """

    last_losses: Tensor | None
    """Detached ``[n]`` per-example losses of the last :meth:`compute`."""

    def __init__(self, model: nn.Module, layers: list[GradientLayer], *, dtype: torch.dtype | None = None):
        layers = list(layers)
        if not layers:
            raise ValueError("no layers to capture")
        names = [layer.name for layer in layers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate layer names: {dup}")
        in_model = {id(m) for m in model.modules()}
        foreign = [layer.name for layer in layers if id(layer.module) not in in_model]
        if foreign:
            raise ValueError(f"layers not part of the model: {foreign}")
        self.model = model
        self.layers = layers
        self.dtype = dtype
        self.last_losses = None
        self._handles: list[Any] = []
        self._captures: list[_LayerCapture] = []
        self._phase: str | None = None

    def __enter__(self) -> "PerSampleGradients":
        if self._handles:
            raise RuntimeError("PerSampleGradients is already active")
        self._captures = [
            _LayerCapture(self, layer, self.dtype or layer.module.weight.dtype) for layer in self.layers
        ]
        try:
            for cap in self._captures:
                self._handles.append(cap.layer.module.register_forward_hook(cap.forward_hook))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._captures = []
        self._phase = None

    def _move(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        device = self.layers[0].module.weight.device
        if all(not isinstance(v, Tensor) or v.device == device for v in batch.values()):
            return batch
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def compute(
        self, batch: Mapping[str, Any], loss_fn: LossFn | None = None, out: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Per-sample gradients of every captured layer for one batch.

        Runs ``loss_fn(model, batch)`` (default :func:`default_loss_fn`) with the
        model in eval mode, then backpropagates ``losses.sum()`` with
        ``torch.autograd.grad`` so no ``.grad`` attribute is touched. Training
        mode and ``requires_grad`` flags are restored afterwards.

        Args:
            batch: tensors with the batch axis first, e.g. ``input_ids [n, T]``,
                ``attention_mask [n, T]``, ``labels``; extra keys are allowed.
                Tensors are moved to the captured layers' device if needed.
            loss_fn: ``loss_fn(model, batch) -> Tensor[n]`` of per-example
                losses; example ``i``'s loss must depend only on row ``i``.
            out: optional ``{layer.name: Tensor[n, rank, dim]}`` buffers (the
                layer's dtype and device, any strides BLAS takes, e.g. slices
                of one stacked tensor) that receive the gradients; the returned
                dict then holds these very tensors.

        Returns:
            ``{layer.name: Tensor[n, layer.rank, layer.dim]}``, detached, in
            ``dtype`` (default: the layer's weight dtype). A layer the loss does
            not depend on gets zeros.
        """
        if not self._handles:
            raise RuntimeError("PerSampleGradients.compute must be called inside its `with` block")
        if self._phase is not None:
            raise RuntimeError("PerSampleGradients.compute is not re-entrant")
        loss_fn = loss_fn or default_loss_fn
        batch = self._move(batch)
        params = [p for layer in self.layers for p in layer.parameters]
        modes = [(m, m.training) for m in self.model.modules()]
        flags = [(p, p.requires_grad) for p in params]
        out = dict(out or {})
        unknown = sorted(set(out) - {cap.layer.name for cap in self._captures})
        if unknown:
            raise ValueError(f"out: no captured layer named {unknown}")
        for cap in self._captures:
            cap.grad, cap.calls = None, 0
            buf = out.get(cap.layer.name)
            if buf is not None and (buf.dtype != cap.dtype or buf.device != cap.layer.module.weight.device):
                raise ValueError(f"out[{cap.layer.name!r}]: expected dtype {cap.dtype} on "
                                 f"{cap.layer.module.weight.device}, got {buf.dtype} on {buf.device}")
            cap.out = buf
        try:
            self.model.eval()
            for p in params:
                # Models loaded for inference have frozen adapters; gradients must still flow to them.
                p.requires_grad_(True)
            with torch.enable_grad():
                self._phase = "forward"
                losses = loss_fn(self.model, batch)
                self._phase = "backward"
                if not isinstance(losses, Tensor) or losses.dim() != 1:
                    shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                    raise ValueError(f"loss_fn must return per-example losses of shape [n], got {shape}")
                if not losses.requires_grad:
                    raise RuntimeError("losses do not depend on any captured layer (no gradient)")
                # Only the captured parameters are differentiated, and their
                # summed gradients are thrown away: the tensor hooks do the work.
                torch.autograd.grad(losses.sum(), params, allow_unused=True)
            n = losses.shape[0]
            self.last_losses = losses.detach()
            del losses
            result: dict[str, Tensor] = {}
            for cap in self._captures:
                layer = cap.layer
                g = cap.grad
                if g is not None and g.shape != (n, layer.rank, layer.dim):
                    raise RuntimeError(
                        f"{layer.name}: per-sample gradient has shape {tuple(g.shape)}, expected "
                        f"{(n, layer.rank, layer.dim)}; the batch axis of the layer input must match the losses"
                    )
                if cap.out is not None:
                    if tuple(cap.out.shape) != (n, layer.rank, layer.dim):
                        raise ValueError(f"out[{layer.name!r}]: expected shape {(n, layer.rank, layer.dim)}, "
                                         f"got {tuple(cap.out.shape)}")
                    if g is None:
                        g = cap.out.zero_()
                    elif g is not cap.out:
                        g = cap.out.copy_(g)
                elif g is None:
                    g = torch.zeros(n, layer.rank, layer.dim, dtype=cap.dtype, device=layer.module.weight.device)
                result[layer.name] = g
            return result
        finally:
            self._phase = None
            for cap in self._captures:
                cap.grad, cap.out = None, None
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, training in modes:
                m.training = training
