"""Which weight matrices of a PEFT model have their per-sample gradients captured.

:func:`find_gradient_layers` lists the LoRA matrices of every active adapter — ``lora_A``/``lora_B`` of
linear LoRA (plain, rsLoRA, quantised bases, DoRA with its magnitude vector), ``lora_embedding_A``/``_B``
of embedding LoRA — and, with ``include_heads``, the trainable heads kept by ``modules_to_save`` as
:class:`GradientLayer` records; :mod:`.hooks` captures their gradients. What cannot be captured exactly
is refused or named in a warning by :mod:`.coverage`, never silently left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from torch import nn

from .coverage import Skipped, check_coverage

__all__ = ["GradientLayer", "find_gradient_layers", "KINDS"]

#: Layer kinds and the weight each captures: ``lora_A`` [r, d_in], ``lora_B`` [d_out, r] (transposed),
#: ``head`` [out, in] (+ bias column), ``magnitude`` (DoRA's [d_out] vector, as rank 1), ``embedding_A``
#: [r, vocab] and ``embedding_B`` [d_out, r] (transposed) of embedding LoRA.
KINDS = ("lora_A", "lora_B", "head", "magnitude", "embedding_A", "embedding_B")


class ParameterHolder:
    """Stands in for a module where the captured weight is a bare parameter (embedding LoRA)."""

    bias = None

    def __init__(self, weight: nn.Parameter, adapter: str):
        self.weight = weight
        self.adapter = adapter

    def __repr__(self) -> str:
        return f"ParameterHolder({tuple(self.weight.shape)})"


@dataclass(frozen=True)
class GradientLayer:
    """One weight matrix whose per-sample gradient is captured.

    Attributes:
        name: unique name, ``"<LoRA module path>.lora_A"`` / ``".lora_B"`` / ``".lora_magnitude_vector"`` /
            ``".lora_embedding_A"`` / ``".lora_embedding_B"`` or
            ``"<modules_to_save wrapper path>[.<sub path>].head"``.
        kind: one of :data:`KINDS`.
        rank: ``r``, rows of the rank-first gradient. LoRA rank for
            ``lora_A``/``lora_B``/``embedding_*`` (``r + 1`` for a ``lora_B`` with bias, whose
            bias gradient is appended as an extra row); ``out_features`` for heads; 1 for ``magnitude``.
        dim: ``d``, columns of the rank-first gradient: ``in_features`` for
            ``lora_A``, ``out_features`` for ``lora_B`` and ``magnitude``, the vocabulary size for
            ``embedding_A``, the embedding width for ``embedding_B``, ``in_features (+1 with bias)`` for heads.
        module: holds the captured ``weight`` (and ``bias``): the active adapter's ``lora_A[adapter]`` /
            ``lora_B[adapter]`` / ``modules_to_save[adapter]`` copy / ``lora_magnitude_vector[adapter]``, or
            a :class:`ParameterHolder` of the embedding LoRA parameter.
        host: the module the hooks are installed on when it is not ``module`` (the ``lora.Embedding`` layer).
        fsdp: the model has modules wrapped by FSDP2 ``fully_shard``, so every forward is a collective of
            all ranks (and the layer's weights are DTensor shards between forwards when it lies in one).
        owner: the PEFT ``LoraLayer`` (or ``modules_to_save`` wrapper) the matrix belongs to, and ``adapter``
            the adapter that was active there when the layer was found: :meth:`adapter_problem` tells whether
            that adapter still runs, :attr:`scaling` is its LoRA scaling.
    """

    name: str
    kind: str
    rank: int
    dim: int
    module: Any = field(compare=False, repr=False)
    host: nn.Module | None = field(default=None, compare=False, repr=False)
    fsdp: bool = field(default=False, compare=False)
    owner: nn.Module | None = field(default=None, compare=False, repr=False)
    adapter: str | None = field(default=None, compare=False)

    @property
    def scaling(self) -> float | None:
        """The LoRA scaling (``lora_alpha / r``, ``/ √r`` with rsLoRA) applied to this matrix; None for a head."""
        table = getattr(self.owner, "scaling", None) if self.kind != "head" else None
        value = table.get(self.adapter) if isinstance(table, dict) else None
        return None if value is None else float(value)

    def adapter_problem(self) -> str | None:
        """Why the adapter this layer was found on no longer runs in the forward (set_adapter to another
        one, merged, adapters disabled), or None while it still does (or the layer has no recorded owner)."""
        owner, adapter = self.owner, self.adapter
        if owner is None or adapter is None:
            return None
        since = "since the gradient layers were found (HyperINF(model) / find_gradient_layers)"
        if getattr(owner, "disable_adapters", False):
            return (f"the adapters were disabled (model.disable_adapter() / disable_adapter_layers()) {since}, "
                    f"so adapter {adapter!r} no longer runs")
        active = _active_adapters(owner)
        if self.kind == "head":
            copies = getattr(owner, "modules_to_save", {})
            running = [active[0]] if active and all(a in copies for a in active) else []
        else:
            owned = {a for d in ("lora_A", "lora_embedding_A") for a in getattr(owner, d, {})}
            running = [a for a in active if a in owned]
        if running != [adapter]:
            return f"the active adapter changed from {adapter!r} to {', '.join(map(repr, active)) or 'none'} {since}"
        if self.kind != "head" and adapter in getattr(owner, "merged_adapters", []):
            return f"adapter {adapter!r} was merged into the base weights (merge_adapter) {since}"
        return None

    @property
    def transposed(self) -> bool:
        """True when the rank-first gradient is the transpose of the weight gradient."""
        return self.kind in ("lora_B", "embedding_B")

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def hooked(self) -> nn.Module:
        """The module whose forward the hooks watch."""
        return self.module if self.host is None else self.host

    @property
    def parameters(self) -> list[nn.Parameter]:
        """Weight (and bias) of :attr:`module`."""
        ps = [self.module.weight]
        if self.has_bias:
            ps.append(self.module.bias)
        return ps

    def live_parameters(self) -> list[nn.Parameter]:
        """Weight (and bias) as the hooked module holds them now. Inside its forward that is what the forward
        uses: under FSDP2 ``fully_shard`` the unsharded copies swapped in for the forward, not the sharded
        parameters :attr:`parameters` gives between forwards (a :class:`ParameterHolder` keeps the parameter
        it was built with, so embedding LoRA reads its host's dict)."""
        if isinstance(self.module, ParameterHolder):
            host = self.hooked
            table = host.lora_embedding_A if self.kind == "embedding_A" else host.lora_embedding_B
            return [table[self.module.adapter]]
        return self.parameters


# Forwards that add ``lora_B(lora_A(dropout(x))) * scaling`` (or hand x to a LoRA variant) and nothing
# else: hooks on lora_A/lora_B see every per-example input and output gradient. PEFT's quantised
# wrappers (bitsandbytes 4/8-bit, GPTQ, HQQ, EETQ, AWQ, AQLM; torchao and INC inherit Linear.forward)
# compute the LoRA path this way too; the gradient is then exact for the quantised forward.
_EXACT_LINEAR_FORWARDS = {
    f"peft.tuners.lora.{m}.forward" for m in (
        "layer.Linear", "bnb.Linear8bitLt", "bnb.Linear4bit", "gptq.GPTQLoraLinear", "hqq.HqqLoraLinear",
        "eetq.EetqLoraLinear", "awq.AwqLoraLinear", "aqlm.AqlmLoraLinear")
}
_EMBEDDING_FORWARD = "peft.tuners.lora.layer.Embedding.forward"
_DORA_LINEAR = "DoraLinearVariant"


def _forward_name(module: nn.Module) -> str:
    f = type(module).forward
    return f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', '')}"


def _lora_classes():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


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


class _Unsupported(Exception):
    """A LoRA layer the hooks cannot capture exactly (the reason is the message)."""


# Why PEFT's other LoRA layers cannot be captured by hooks on lora_A/lora_B.
_WHY = {
    "ParamWrapper": "LoRA on a parameter (target_parameters, e.g. fused MoE experts) is applied as a "
                    "parametrisation of the weight: no hook sees a per-example input",
    "MultiheadAttention": "LoRA on nn.MultiheadAttention is merged into the packed in-projection weight in "
                          "forward: no hook sees a per-example input",
    "Conv1d": "convolution LoRA (per-sample gradients of a convolution are not implemented)",
    "Conv2d": "convolution LoRA (per-sample gradients of a convolution are not implemented)",
    "Conv3d": "convolution LoRA (per-sample gradients of a convolution are not implemented)",
}


def _linear_lora(path: str, module: nn.Module, adapter: str) -> list[GradientLayer]:
    if _forward_name(module) not in _EXACT_LINEAR_FORWARDS:
        why = _WHY.get(type(module).__name__) if type(module).__module__.startswith("peft.") else None
        raise _Unsupported(why or f"LoRA layer class {type(module).__name__} ({type(module).__module__}) has a "
                                  "forward the per-sample hooks are not verified against")
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    if not (type(lora_a) is nn.Linear and type(lora_b) is nn.Linear):
        raise _Unsupported(f"lora_A={type(lora_a).__name__}, lora_B={type(lora_b).__name__}: only nn.Linear LoRA "
                           "matrices are captured")
    found = [_linear_layer(f"{path}.lora_A", "lora_A", lora_a), _linear_layer(f"{path}.lora_B", "lora_B", lora_b)]
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        if type(variant).__name__ != _DORA_LINEAR:
            raise _Unsupported(f"LoRA variant {type(variant).__name__} changes the forward in a way the hooks "
                               "are not verified against (plain LoRA, rsLoRA and DoRA are)")
        mag = module.lora_magnitude_vector[adapter]
        if getattr(mag, "fan_in_fan_out", False):
            raise _Unsupported("DoRA on a fan_in_fan_out base (transformers Conv1D) is not supported")
        found.append(GradientLayer(f"{path}.lora_magnitude_vector", "magnitude", 1, mag.weight.shape[0], mag))
    return found


def _embedding_lora(path: str, module: nn.Module, adapter: str) -> list[GradientLayer]:
    base = module.get_base_layer()
    if _forward_name(module) != _EMBEDDING_FORWARD:
        raise _Unsupported(f"embedding LoRA class {type(module).__name__} has a forward the hooks are not "
                           "verified against")
    if adapter in getattr(module, "lora_variant", {}):
        raise _Unsupported(f"LoRA variant {type(module.lora_variant[adapter]).__name__} on an embedding (e.g. "
                           "DoRA) is not supported; plain embedding LoRA is")
    if any(getattr(module, f, {}).get(adapter) is not None for f in ("input_fns", "output_fns")):
        raise _Unsupported("tensor-parallel embedding LoRA is not supported")
    if getattr(base, "max_norm", None) is not None or getattr(base, "scale_grad_by_freq", False):
        raise _Unsupported("an embedding with max_norm or scale_grad_by_freq (its gradient is not a plain sum "
                           "over tokens) is not supported")
    a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
    r = a.shape[0]
    return [GradientLayer(f"{path}.lora_embedding_A", "embedding_A", r, a.shape[1], ParameterHolder(a, adapter), module),
            GradientLayer(f"{path}.lora_embedding_B", "embedding_B", r, b.shape[0], ParameterHolder(b, adapter), module)]


def _lora_layers(path: str, module: nn.Module) -> list[GradientLayer]:
    if getattr(module, "disable_adapters", False):
        return []
    owned = {a for d in ("lora_A", "lora_embedding_A") for a in getattr(module, d, {})}
    adapters = [a for a in _active_adapters(module) if a in owned]
    if not adapters:
        return []
    if len(adapters) > 1:
        raise ValueError(
            f"{path}: several active adapters {adapters}; per-sample gradients need exactly one "
            "(call model.set_adapter(name))"
        )
    adapter = adapters[0]
    if adapter in getattr(module, "merged_adapters", []):
        raise ValueError(f"{path}: adapter {adapter!r} is merged into the base weights; unmerge it first")
    kind = _embedding_lora if adapter in getattr(module, "lora_embedding_A", {}) else _linear_lora
    found = kind(path, module, adapter)
    return [replace(g, owner=module, adapter=adapter) for g in found]


def _head_layers(path: str, wrapper: nn.Module) -> tuple[list[GradientLayer], list[Skipped]]:
    if getattr(wrapper, "disable_adapters", False):
        return [], []
    copies = getattr(wrapper, "modules_to_save", {})
    active = _active_adapters(wrapper)
    # PEFT's wrapper falls back to the frozen original unless every active adapter has a copy.
    if not active or any(a not in copies for a in active):
        return [], []
    copy = copies[active[0]]
    out, linear_params = [], set()
    for sub, lin in copy.named_modules():
        if type(lin) is nn.Linear:
            out.append(replace(_linear_layer(f"{path}.{sub}.head" if sub else f"{path}.head", "head", lin),
                               owner=wrapper, adapter=active[0]))
            linear_params.update(id(p) for p in lin.parameters())
    rest = [(n, p) for n, p in copy.named_parameters() if id(p) not in linear_params]
    skipped = []
    if rest:
        owners = sorted({type(m).__name__ for m in copy.modules() if type(m) is not nn.Linear
                         and any(True for _ in m.parameters(recurse=False))})
        skipped.append(Skipped(f"{path}.modules_to_save.{active[0]}", [p for _, p in rest],
                               f"trainable {'/'.join(owners) or 'parameters'} outside nn.Linear (only nn.Linear "
                               "heads are captured)"))
    return out, skipped


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (e.g. a weight sharded by FSDP2 ``fully_shard``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def _uses_fsdp(model: nn.Module) -> bool:
    """True when a module of ``model`` (or the model itself) is wrapped by FSDP2 ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


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
            active adapter's copy. Their other trainable parameters (an
            ``nn.Embedding``, a LayerNorm, a transformers ``Conv1D``) are named in a warning.
        layers: optional names or substrings; only layers whose name equals or
            contains one of them are kept.

    Returns:
        ``GradientLayer`` list in ``model.named_modules()`` order, ``lora_A``
        before ``lora_B`` (then DoRA's ``lora_magnitude_vector``) of each LoRA module. Only the active
        adapter is used; modules whose adapters are disabled or inactive are skipped.

    Raises:
        ValueError: the model has no active LoRA layer; an active LoRA layer cannot be captured exactly
            (LoRA on Conv/MultiheadAttention, on a parameter — ``target_parameters``, e.g. fused MoE
            experts —, LoRA variants other than DoRA, an unknown LoRA layer class) — the message names each,
            its parameters and their share, and with ``layers`` given they are named in a warning instead;
            an active layer is merged or has several active adapters; an entry of ``layers`` matches nothing.

    Warns:
        UserWarning: trainable parameters no captured layer covers (see :mod:`.coverage`).
    """
    LoraLayer = _lora_classes()
    wrapper_cls = _modules_to_save_class()
    found: list[GradientLayer] = []
    lora_skipped: list[Skipped] = []
    other_skipped: list[Skipped] = []
    n_lora = 0
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            try:
                got = _lora_layers(path, module)
            except _Unsupported as e:
                params = [p for n, p in module.named_parameters() if not n.startswith("base_layer.")]
                lora_skipped.append(Skipped(path, params, f"{type(module).__name__}: {e}"))
                continue
            n_lora += len(got)
            found.extend(got)
        elif include_heads and isinstance(module, wrapper_cls):
            heads, skipped = _head_layers(path, module)
            found.extend(heads)
            other_skipped.extend(skipped)
    if n_lora == 0 and not lora_skipped:
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
        selected = [g for g in found if any(w == g.name or w in g.name for w in wanted)]
    else:
        selected = found
    check_coverage(model, found, lora_skipped, other_skipped, chosen=layers is not None,
                   lora_cls=LoraLayer, wrapper_cls=wrapper_cls)
    return [replace(g, fsdp=True) for g in selected] if _uses_fsdp(model) else selected
