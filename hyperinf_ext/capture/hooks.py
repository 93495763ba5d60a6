"""Per-sample gradients of the captured layers from one batched forward + backward pass.

A forward hook on every captured layer's module saves what its kind's rule needs (the input of an
``nn.Linear``; the token ids of an embedding LoRA; DoRA's base and LoRA terms), and a tensor hook on its
output receives the gradient of the loss w.r.t. that output; the rule (:mod:`.rules`) turns the pair
into each example's gradient, in the rank-first layout (see the package docstring of
:mod:`hyperinf_ext.capture`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .layers import GradientLayer, is_dtensor
from .losses import LossFn, default_loss_fn
from .rows import EXPERT_SIDE, IMAGE_SIDE, ROUTED_EXPERT, image_token_id, rows_hint, rows_key
from .rules import RULES

__all__ = ["PerSampleGradients"]

# Forward calls that would leave a layer's per-sample gradient silently zero: (counter, why) — refused.
_SILENT_ZEROS = (
    ("nograd_calls", "ran without gradient inside the forward pass: torch.utils.checkpoint(use_reentrant=True) in "
                     "eval mode, or torch.no_grad in loss_fn; torch.autograd.grad would not reach it and its "
                     "per-sample gradient would be silently zero. Use use_reentrant=False (transformers' "
                     "gradient_checkpointing_enable is off in the eval mode the capture runs in, either way)"),
    ("frozen_calls", "ran with gradients enabled but its output needs no gradient: the weights its forward used do "
                     "not require grad, so they are not the captured parameters (copies a wrapper swapped in, or "
                     "detached ones), and its per-sample gradient would silently be zero"),
)


class _LayerCapture:
    """Hook state of one layer during one ``compute`` call."""

    def __init__(self, owner: "PerSampleGradients", layer: GradientLayer, dtype: torch.dtype):
        self.owner = owner
        self.layer = layer
        self.dtype = dtype
        self.grad: Tensor | None = None  # [n, rank, dim], summed over calls and tokens
        self.out: Tensor | None = None  # caller's buffer for ``grad`` (see PerSampleGradients.compute)
        self.calls = 0
        self.nograd_calls = 0
        self.frozen_calls = 0
        self.rule = RULES[layer.kind]
        # a linear LoRA factor inside a mixture-of-experts block may see the batch's tokens flattened to
        # [n·T, d] in batch-major order (Qwen2-MoE's shared expert: the block's view(-1, d)).  Only there: a
        # routed expert's rows are the tokens routed to it, in the router's order, and elsewhere a 2-D input
        # of n·T rows could as well be time-major.
        self.flat_ok = (layer.kind in ("lora_A", "lora_B") and any(part in layer.name for part in EXPERT_SIDE)
                        and not ROUTED_EXPERT.search(layer.name))

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        owner = self.owner
        # Outside compute, or in a rule's own no-grad recomputation, nothing is recorded. A block
        # recomputed during backward by non-reentrant checkpointing is recorded too and still counts once:
        # the first forward's graph is the one differentiated, so the recomputed outputs' hooks never fire.
        if owner._phase not in ("forward", "backward") or not isinstance(output, Tensor):
            return
        if not output.requires_grad:
            if owner._phase == "forward":
                if not torch.is_grad_enabled():
                    self.nograd_calls += 1  # a reentrant checkpoint's first forward: refused in compute
                else:
                    self.frozen_calls += 1  # its forward used weights that need no grad: refused in compute
            return
        if owner._phase == "forward":
            owner._note_live(self.layer)
        tokens = self._flattened_tokens(args)
        if tokens is not None:
            args = (args[0].reshape(*tokens, args[0].shape[-1]), *args[1:])
        owner._phase, phase = "saving", owner._phase  # a rule's own no-grad recomputation is not a model call
        try:
            ctx = self.rule.save(self.layer, module, args, kwargs, output)
        finally:
            owner._phase = phase
        self.calls += 1
        # Closure pairs this call's input with its own output gradient, so a
        # module used several times per forward accumulates correctly.
        output.register_hook(lambda g, ctx=ctx, tokens=tokens: self._accumulate(
            ctx, g if tokens is None else g.reshape(*tokens, g.shape[-1])))

    def _flattened_tokens(self, args: tuple) -> tuple[int, int] | None:
        """(n, T) when this call's input is the batch's n·T tokens flattened to 2-D rows, else None."""
        shape = self.owner._tokens
        x = args[0] if args else None
        if (not self.flat_ok or shape is None or not isinstance(x, Tensor) or x.dim() != 2 or shape[1] < 2
                or x.shape[0] != shape[0] * shape[1]):
            return None
        return shape

    def _accumulate(self, ctx: Any, g: Tensor) -> None:
        got = self.rule.grad(self.layer, ctx, g, self.dtype)
        if isinstance(got, Tensor):
            self._add(got)
            return None
        a, b = got
        shape = (a.shape[0], a.shape[1], b.shape[2])  # [n, r, d] in the rank-first layout
        if self.grad is None and self.out is not None and tuple(self.out.shape) == shape:
            # straight into the caller's buffer (e.g. a slice of a stacked [L, n, r, d]): no copy later
            self.grad = torch.bmm(a, b, out=self.out)
            return None
        self._add(torch.bmm(a, b))
        return None

    def _add(self, contrib: Tensor) -> None:
        if self.grad is None:
            self.grad = contrib
        elif self.grad.shape != contrib.shape:
            raise RuntimeError(
                f"{self.layer.name}: calls disagree on per-sample gradient shape "
                f"({tuple(self.grad.shape)} vs {tuple(contrib.shape)}); is the batch axis first?"
            )
        else:
            self.grad += contrib


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
        foreign = [layer.name for layer in layers if id(layer.hooked) not in in_model]
        if foreign:
            raise ValueError(f"layers not part of the model: {foreign}")
        self.model = model
        self.layers = layers
        self.dtype = dtype
        self.last_losses = None
        self._handles: list[Any] = []
        self._captures: list[_LayerCapture] = []
        self._phase: str | None = None
        self._live: dict[int, Tensor] = {}  # id -> the weights the forward used (see _note_live)
        self._tokens: tuple[int, int] | None = None  # (n, T) of the batch's input_ids in compute
        # a vision tower's or projector's rows are images: with several examples per batch they line up with
        # the examples only when every example has one image (see _check_image_rows)
        self._image_rows = [layer.name for layer in layers if any(part in layer.name for part in IMAGE_SIDE)]
        self._image_token = image_token_id(model) if self._image_rows else None

    def _note_live(self, layer: GradientLayer) -> None:
        """Keep the weights ``layer``'s forward is using right now: what ``compute`` differentiates.

        They are ``layer.parameters`` themselves, except under FSDP2 ``fully_shard``, which swaps unsharded
        copies in for the forward (and the sharded DTensor parameters back after it). The sharded ones are
        then not in the graph: differentiating only them would run no backward at all, no tensor hook would
        fire and every gradient would silently be zero."""
        for p in layer.live_parameters():
            if is_dtensor(p):
                raise RuntimeError(
                    f"{layer.name}: its forward uses a DTensor weight ({tuple(p.placements)} over mesh "
                    f"{tuple(p.device_mesh.shape)}: tensor parallelism, or FSDP2 over DTensor parameters); per-sample "
                    "gradients need the plain full weight and full activations in the forward. FSDP2 fully_shard of "
                    "a model with plain parameters is supported"
                )
            self._live.setdefault(id(p), p)

    def _check_image_rows(self, batch: Mapping[str, Any]) -> None:
        """Refuse a batch of several examples with image inputs whose examples hold different numbers of image
        tokens (one with two images beside a text-only one): the image-side layers see one row per image, and
        when the rows happen to number the examples the shape check cannot tell that they belong to others."""
        ids = batch.get("input_ids")
        if (self._image_token is None or batch.get("pixel_values") is None or not isinstance(ids, Tensor)
                or ids.dim() != 2 or ids.shape[0] < 2):
            return
        counts = (ids == self._image_token).sum(1).tolist()
        if min(counts) == 0 or len(set(counts)) > 1:
            raise RuntimeError(
                f"{self._image_rows[0]}: the examples of this batch hold {counts} image tokens; the vision tower and "
                "projector see one row per image, so their per-example gradients need batches whose examples have "
                "one image each (as many image tokens), or batches of one example")

    def _check_adapter_state(self) -> None:
        """Refuse when the adapter the layers were found on no longer runs (another adapter set active,
        merged, disabled): the hooks watch its LoRA matrices, so every gradient would silently be zero."""
        problems = [(layer.name, why) for layer in self.layers if (why := layer.adapter_problem()) is not None]
        if problems:
            name, why = problems[0]
            more = f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""
            raise RuntimeError(
                f"{name}{more}: {why}. The captured LoRA matrices no longer run in the forward, so every per-sample "
                "gradient (and score) would silently be zero. Restore the adapter state (model.set_adapter, "
                "model.unmerge_adapter, leave disable_adapter()) or build a new attributor for the model as it is now"
            )

    def __enter__(self) -> "PerSampleGradients":
        if self._handles:
            raise RuntimeError("PerSampleGradients is already active")
        self._captures = [
            _LayerCapture(self, layer, self.dtype or layer.module.weight.dtype) for layer in self.layers
        ]
        try:
            for cap in self._captures:
                self._handles.append(cap.layer.hooked.register_forward_hook(cap.forward_hook, with_kwargs=True))
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

        Raises:
            RuntimeError: the adapter the layers were found on no longer runs (another adapter set active,
                merged, adapters disabled since): its gradients would silently be zero.
            ValueError: ``loss_fn`` returned other than ``[B]`` losses, B the rows of ``input_ids``
                (``inputs_embeds``, ``labels``).
        """
        if not self._handles:
            raise RuntimeError("PerSampleGradients.compute must be called inside its `with` block")
        if self._phase is not None:
            raise RuntimeError("PerSampleGradients.compute is not re-entrant")
        loss_fn = loss_fn or default_loss_fn
        self._check_adapter_state()
        self._check_image_rows(batch)
        batch = self._move(batch)
        params = [p for layer in self.layers for p in layer.parameters]
        modes = [(m, m.training) for m in self.model.modules()]
        flags = [(p, p.requires_grad) for p in params]
        out = dict(out or {})
        unknown = sorted(set(out) - {cap.layer.name for cap in self._captures})
        if unknown:
            raise ValueError(f"out: no captured layer named {unknown}")
        self._live = {}
        ids = batch.get("input_ids")
        self._tokens = (int(ids.shape[0]), int(ids.shape[1])) if isinstance(ids, Tensor) and ids.dim() == 2 else None
        for cap in self._captures:
            cap.grad, cap.calls, cap.nograd_calls, cap.frozen_calls = None, 0, 0, 0
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
                for counter, why in _SILENT_ZEROS:
                    named = [cap.layer.name for cap in self._captures if getattr(cap, counter)]
                    if named:
                        raise RuntimeError(f"{named[0]} (and {len(named) - 1} more) {why}")
                if not isinstance(losses, Tensor) or losses.dim() != 1:
                    shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                    raise ValueError(f"loss_fn must return per-example losses of shape [n], got {shape}")
                key = rows_key(batch)
                if key is not None and losses.shape[0] != batch[key].shape[0]:
                    rows = batch[key].shape[0]
                    raise ValueError(
                        f"loss_fn must return one loss per example, shape [B] = [{rows}] for this batch ({rows} rows "
                        f"of {key}), got {list(losses.shape)}: a batch mean (e.g. a transformers model's .loss "
                        "reshaped to [1]) is not per-example losses")
                if not losses.requires_grad:
                    raise RuntimeError("losses do not depend on any captured layer (no gradient)")
                # Only the captured parameters are differentiated, and their
                # summed gradients are thrown away: the tensor hooks do the work.
                # With FSDP2 the forward used unsharded copies of them: those are differentiated too.
                known = {id(p) for p in params}
                inputs = params + [p for i, p in self._live.items() if i not in known and p.requires_grad]
                summed = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
                if all(g is None for g in summed) and any(cap.calls for cap in self._captures):
                    # outputs of captured layers were recorded, yet the backward reached none of their
                    # weights: the tensor hooks did not fire and every gradient would silently be zero
                    raise RuntimeError(
                        "the backward reached none of the captured weights although their layers ran in the forward: "
                        "the forward used other tensors than the captured parameters (a wrapper that swaps weights "
                        "in, as FSDP does, not seen by the capture) or the losses do not depend on them"
                    )
                del summed
            n = losses.shape[0]
            self.last_losses = losses.detach()
            del losses
            result: dict[str, Tensor] = {}
            for cap in self._captures:
                layer = cap.layer
                g = cap.grad
                if g is not None and n == 1 and g.shape[0] != 1 and g.shape[1:] == (layer.rank, layer.dim):
                    # one example: every row of the layer input is its own (the images, tiles or flattened
                    # patches a vision tower or projector of a vision-language model sees)
                    g = g.sum(0, keepdim=True)
                if g is not None and g.shape != (n, layer.rank, layer.dim):
                    raise RuntimeError(
                        f"{layer.name}: per-sample gradient has shape {tuple(g.shape)}, expected "
                        f"{(n, layer.rank, layer.dim)}; the batch axis of the layer input must match the losses "
                        f"({rows_hint(layer.name)})"
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
            self._live = {}
            for cap in self._captures:
                cap.grad, cap.out = None, None
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, training in modes:
                m.training = training
