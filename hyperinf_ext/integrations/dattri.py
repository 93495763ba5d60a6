"""HyperINF's curvature inside dattri's ``cache``/``attribute`` workflow.

:class:`IFAttributorHyperINF` is a dattri ``BaseInnerProductAttributor``: dattri computes the per-sample
gradients (``vmap(grad(loss))`` of its ``AttributionTask``, flattened over the selected parameters) and
does the train × test dot products; this adapter reshapes each LoRA layer's slice of those flat
gradients rank-first — lora_A ``[r, d_in]`` as stored, lora_B ``[d_out, r]`` transposed to
``[r, d_out]``, biases as an extra column (heads, lora_A) or row (lora_B), as ``capture/layers.py`` does —
accumulates the per-layer GFIM during ``cache`` and preconditions test gradients with the chosen
method (``hyperinf``: damped GFIM, scaled Schulz inverse) in ``transform_test_rep``.

Sign: dattri's convention, like its own ``IFAttributor*`` classes: ``attribute`` returns
``[n_train, n_test]`` with entry ``g_train · H⁻¹ · g_test`` — positive = the training example
*lowers* the test loss (helps).  That is exactly ``-HyperINF.scores(...).T`` (our scores are
``−⟨∇L_q·H⁻¹, ∇L_k⟩``, positive = harmful).

dattri's ``attribute`` accumulates into a tensor of torch's default dtype; call it under
``torch.set_default_dtype(torch.float64)`` to keep float64 scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch

try:
    from dattri.algorithm.base import BaseInnerProductAttributor
except ImportError as exc:  # pragma: no cover - exercised only without dattri
    raise ImportError(
        "hyperinf_ext.integrations.dattri needs dattri 0.3: pip install 'hyperinf-ext[dattri]' "
        "(or: pip install --no-deps dattri==0.3.0 && pip install numpy scipy tqdm)"
    ) from exc

from .. import ops
from ..capture import GradientLayer, find_gradient_layers
from ..curvature.damping import damp_layers
from ..curvature.methods import METHODS, LayerFactor, make_method, resolve

if TYPE_CHECKING:
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader

__all__ = ["IFAttributorHyperINF", "LoraBlock"]

BATCH_FORMATS = ("a tuple or list of tensors with the examples along dim 0 (dattri's own format, e.g. "
                 "(inputs, labels) from a TensorDataset), or a dict of such tensors (HyperINF's batches: the "
                 "loss_func then gets a dict for each example)")


class _DictExample(dict):
    """One example of a dict batch, as dattri's loop hands it on (a 1-tuple); unwrapped before the loss."""

    def to(self, device: Any) -> "_DictExample":
        return _DictExample({k: v.to(device) for k, v in self.items()})

    def unsqueeze(self, dim: int) -> "_DictExample":
        return _DictExample({k: v.unsqueeze(dim) for k, v in self.items()})


def _as_dattri_batch(batch: Any, where: str) -> tuple:
    """A batch as dattri's loop takes it: a tuple of tensors, or a dict batch as a 1-tuple (``_DictExample``);
    ValueError naming the formats it needs for anything else."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, torch.Tensor) for t in batch):
        return tuple(batch)
    if isinstance(batch, Mapping) and batch and all(isinstance(t, torch.Tensor) for t in batch.values()):
        return (_DictExample(batch),)
    got = type(batch).__name__
    if isinstance(batch, (tuple, list, Mapping)):
        items = batch.values() if isinstance(batch, Mapping) else batch
        got += f" of {sorted({type(t).__name__ for t in items})}"
    raise ValueError(f"{where}: batches must be {BATCH_FORMATS}; got a {got}")


def _loss_data(data: Any) -> Any:
    """What the task's ``loss_func`` gets: the dict of a dict batch, the tuple otherwise."""
    if isinstance(data, tuple) and len(data) == 1 and isinstance(data[0], _DictExample):
        return dict(data[0])
    return data


class _Batches:
    """A loader whose batches are normalised by :func:`_as_dattri_batch`; dattri reads ``sampler`` and
    ``batch_size`` of the loader itself."""

    def __init__(self, loader: Any, where: str):
        if not hasattr(loader, "sampler") or getattr(loader, "batch_size", None) is None:
            raise ValueError(f"{where}: dattri's attribute needs a torch DataLoader with a batch_size (it places "
                             f"scores by batch), got {type(loader).__name__}")
        if getattr(loader, "drop_last", False):
            raise ValueError(f"{where}: drop_last=True leaves the last rows' scores at zero (dattri places scores "
                             "by batch position); use drop_last=False")
        self.loader, self.where = loader, where

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple]:
        pos = 0
        for batch in self.loader:
            out = _as_dattri_batch(batch, self.where)
            index = batch.get("index") if isinstance(batch, Mapping) else None
            n = next(iter(batch.values())).shape[0] if isinstance(batch, Mapping) else out[0].shape[0]
            # dattri puts a batch's rows at batch_number·batch_size: a batch that names other rows (this
            # library's ``index``, from a sorting or subset sampler) would have its scores put elsewhere
            if index is not None and not torch.equal(index.reshape(-1).cpu().long(), torch.arange(pos, pos + n)):
                raise ValueError(f"{self.where}: a batch's 'index' is {index.reshape(-1)[:5].tolist()}..., but dattri "
                                 f"places its scores at rows {pos}..{pos + n - 1} (by batch position); iterate the "
                                 "data in order (no sorting or subset sampler)")
            pos += n
            yield out


# Methods whose preconditioning needs only the fitted factors (datainf/lissa stream the training
# gradients again; dattri has its own IFAttributorDataInf / IFAttributorLiSSA for those).
SUPPORTED_METHODS = tuple(m for m in METHODS if not METHODS[m].needs_train_pass)


@dataclass(frozen=True)
class LoraBlock:
    """Where one captured layer sits in dattri's flat gradient and how it maps to rank-first.

    ``weight``/``bias`` are parameter names (keys of ``model.named_parameters()``); the flat gradient
    holds the weight (row-major, ``[out, in]``) followed by the bias (``[out]``) when there is one.  A
    one-dimensional weight (DoRA's magnitude vector ``[d_out]``) is the single row ``[1, d_out]``, as
    ``capture`` takes it (kind ``magnitude``: rank 1).
    """

    layer: GradientLayer
    weight: str
    bias: str | None

    @property
    def out_in(self) -> tuple[int, int]:
        shape = tuple(self.layer.module.weight.shape)
        return (1, shape[0]) if len(shape) == 1 else shape  # type: ignore[return-value]

    @property
    def numel(self) -> int:
        out_f, in_f = self.out_in
        return out_f * in_f + (out_f if self.bias is not None else 0)

    def rank_first(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat``: [B, numel] → [B, r, d] (lora_B transposed; bias as extra row/column)."""
        B = flat.shape[0]
        out_f, in_f = self.out_in
        w = flat[:, : out_f * in_f].reshape(B, out_f, in_f)
        if self.layer.transposed:
            w = w.transpose(1, 2)  # [B, r, d_out]
            return torch.cat([w, flat[:, out_f * in_f :].unsqueeze(1)], 1) if self.bias else w
        return torch.cat([w, flat[:, out_f * in_f :].unsqueeze(2)], 2) if self.bias else w

    def flatten(self, g: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rank_first`: [B, r, d] → [B, numel] in dattri's layout."""
        B = g.shape[0]
        out_f, in_f = self.out_in
        if self.layer.transposed:
            w, b = g[:, :in_f].transpose(1, 2), g[:, in_f:].reshape(B, -1)
        else:
            w, b = g[:, :, :in_f], g[:, :, in_f:].reshape(B, -1)
        parts = [w.reshape(B, -1)] + ([b] if self.bias else [])
        return torch.cat(parts, 1)


def lora_blocks(model: torch.nn.Module, *, layers: Sequence[str] | None, include_heads: bool) -> list[LoraBlock]:
    """The captured layers of ``model`` with their trainable parameter names (ValueError if frozen)."""
    found = find_gradient_layers(model, include_heads=include_heads, layers=layers)
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = []
    for layer in found:
        params = layer.parameters
        for p in params:
            if id(p) not in names:
                raise ValueError(f"{layer.name}: its parameter is not among model.named_parameters()")
            if not p.requires_grad:
                raise ValueError(
                    f"{names[id(p)]}: does not require grad; dattri only differentiates trainable parameters "
                    "(call requires_grad_(True) on the LoRA parameters)"
                )
        blocks.append(LoraBlock(layer, names[id(params[0])], names[id(params[1])] if len(params) > 1 else None))
    return blocks


class IFAttributorHyperINF(BaseInnerProductAttributor):
    """dattri attributor with HyperINF's per-layer GFIM curvature on LoRA layers.

    >>> task = AttributionTask(loss_func=f, model=peft_model, checkpoints=peft_model.state_dict())
    >>> attributor = IFAttributorHyperINF(task)
    >>> attributor.cache(train_loader)                    # per-layer GFIM + damping + inverse
    >>> scores = attributor.attribute(train_loader, test_loader)   # [n_train, n_test], dattri's sign

    Args:
        task: dattri ``AttributionTask`` over a PEFT LoRA model; ``loss_func(params, data)`` is the
            loss of the one example ``data`` (dattri vmaps it over the batch).
        layers: names or substrings of captured layers (as ``HyperINF(layers=...)``); None = every
            LoRA layer of the active adapter (plus heads with ``include_heads``).
        device: where dattri puts the data and the scores.
        method: ``hyperinf`` (default), ``exact``, ``kronecker``, ``tracin`` or ``paper``.
        damping, damping_scale: as ``HyperINF`` (default: the method's own rule).
        include_heads: also use the linear heads PEFT keeps trainable via ``modules_to_save``.
        dtype: dtype of the factors and of the preconditioned gradients (float32/float64).
        backend, tol: kernel backend and Schulz tolerance, as ``HyperINF``.

    Batches: tuples/lists of tensors (dattri's format; ``loss_func`` gets the tuple) or dicts of tensors
    (HyperINF's; ``loss_func`` gets a dict per example); anything else raises ValueError.
    """

    def __init__(
        self,
        task: "AttributionTask",
        layers: Sequence[str] | None = None,
        device: str = "cpu",
        *,
        method: str = "hyperinf",
        damping: float | str = "auto",
        damping_scale: float | None = None,
        include_heads: bool = True,
        dtype: torch.dtype = torch.float64,
        backend: str | None = None,
        tol: float | None = None,
    ) -> None:
        if method not in SUPPORTED_METHODS:
            raise ValueError(f"method: {method!r} is not supported here; expected one of {SUPPORTED_METHODS}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        self.rule, self.scale = resolve(method, damping, damping_scale)  # validates the damping rule
        self.blocks = lora_blocks(task.get_model(), layers=layers, include_heads=include_heads)
        param_names = [n for b in self.blocks for n in (b.weight, b.bias) if n is not None]
        super().__init__(task, layer_name=param_names, device=device)
        self.method_name, self.dtype, self.backend, self.tol = method, dtype, backend, tol
        self.factors: dict[int, dict[str, LayerFactor]] = {}  # per checkpoint index
        self.methods: dict[int, object] = {}

    # ------------------------------------------------------------------------------ reshaping

    def _split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, P] flat gradients over ``layer_name`` → {layer: [B, r, d]}."""
        total = sum(b.numel for b in self.blocks)
        if flat.dim() != 2 or flat.shape[1] != total:
            raise ValueError(f"representation: expected [B, {total}] flat LoRA gradients, got {tuple(flat.shape)}")
        out, o = {}, 0
        for b in self.blocks:
            out[b.layer.name] = b.rank_first(flat[:, o : o + b.numel])
            o += b.numel
        return out

    def _join(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([b.flatten(grads[b.layer.name]) for b in self.blocks], 1)

    # ---------------------------------------------------------------------------------- dattri

    def cache(self, full_train_dataloader: "DataLoader") -> None:
        """One pass per checkpoint over the training data: per-layer GFIM, damping, inverse."""
        self._set_full_train_data(full_train_dataloader)
        self.factors, self.methods = {}, {}
        for ckpt in range(len(self.task.get_checkpoints())):
            self.factors[ckpt] = self._fit(ckpt, full_train_dataloader)
            self.methods[ckpt] = self._prepare(self.factors[ckpt])

    def _empty_factor(self, layer: GradientLayer) -> LayerFactor:
        def zeros(k: int) -> torch.Tensor:
            return torch.zeros(k, k, dtype=self.dtype, device=self.device)

        return LayerFactor(layer.name, layer.rank, layer.dim, zeros(layer.dim), 0, rank_sum=zeros(layer.rank))

    def _fit(self, ckpt: int, loader: Iterable) -> dict[str, LayerFactor]:
        """Σ_i g_iᵀg_i ([d, d]) and Σ_i g_i·g_iᵀ ([r, r]) per layer over ``loader``, for checkpoint ``ckpt``."""
        factors = {b.layer.name: self._empty_factor(b.layer) for b in self.blocks}
        for batch in loader:
            data = tuple(t.to(self.device).unsqueeze(0) for t in _as_dattri_batch(batch, "full_train_dataloader"))
            grads = self._split(self.generate_train_rep(ckpt_idx=ckpt, data=data).detach())
            for name, g in grads.items():
                # products in the factor dtype (HyperINF sums fp32 gradients batch-wise in fp32 by default)
                f, g = factors[name], g.to(self.dtype)
                ops.gfim_accumulate_(f.gfim_sum, g, backend=self.backend)
                f.rank_sum += torch.einsum("nrd,nsd->rs", g, g)  # r×r side factor (kronecker method)
                f.count += g.shape[0]
        if not factors or next(iter(factors.values())).count == 0:
            raise ValueError("full_train_dataloader: yielded no examples")
        return factors

    def _prepare(self, factors: dict[str, LayerFactor]):
        damp_layers(factors, self.rule, self.scale)
        method = make_method(self.method_name, backend=self.backend, tol=self.tol)
        method.prepare(factors)
        return method

    def generate_train_rep(self, ckpt_idx: int, data: Any) -> torch.Tensor:
        return super().generate_train_rep(ckpt_idx, _loss_data(data))

    def generate_test_rep(self, ckpt_idx: int, data: Any) -> torch.Tensor:
        return super().generate_test_rep(ckpt_idx, _loss_data(data))

    def transform_test_rep(self, ckpt_idx: int, test_rep: torch.Tensor) -> torch.Tensor:
        """[B, P] test gradients → [B, P] preconditioned (q·H_l⁻¹ per layer), in ``dtype``."""
        if ckpt_idx not in self.methods:
            raise RuntimeError("IFAttributorHyperINF: call cache(full_train_dataloader) before attribute")
        q = {n: g.to(self.dtype) for n, g in self._split(test_rep.detach()).items()}
        qt = self.methods[ckpt_idx].precondition(q, self.factors[ckpt_idx], lambda: iter(()))
        return self._join(qt)

    def transform_train_rep(self, ckpt_idx: int, train_rep: torch.Tensor) -> torch.Tensor:
        """Training gradients in ``dtype``, so the dot products run in the factors' precision."""
        return train_rep.detach().to(self.dtype)

    def attribute(self, train_dataloader, test_dataloader, relatif_method=None) -> torch.Tensor:
        """dattri's ``attribute``; ``cache`` must have run (HyperINF needs the full-data GFIM)."""
        if not self.methods:
            raise RuntimeError("IFAttributorHyperINF: call cache(full_train_dataloader) before attribute")
        return super().attribute(_Batches(train_dataloader, "train_dataloader"),
                                 _Batches(test_dataloader, "test_dataloader"), relatif_method)

    def _compute_denom(self, ckpt_idx, train_batch_rep, test_batch_rep=None, relatif_method=None):
        """RelatIF normalisers: "l" = sqrt(g·H⁻¹g), "theta" = ‖H⁻¹g‖ (as dattri's IF attributors)."""
        transformed = self.transform_test_rep(ckpt_idx, train_batch_rep)
        if relatif_method == "l":
            return (test_batch_rep.to(self.dtype) * transformed).sum(1).clamp_min(1e-12).sqrt()
        if relatif_method == "theta":
            return transformed.norm(dim=1).clamp_min(1e-12)
        raise ValueError(f"relatif_method: unknown {relatif_method!r}; expected 'l', 'theta' or None")
