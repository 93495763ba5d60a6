"""Which weight matrices of a PEFT model have their per-sample gradients captured.

:func:`find_gradient_layers` lists the LoRA ``lora_A``/``lora_B`` matrices of every active adapter
(and, with ``include_heads``, the trainable heads kept by ``modules_to_save``) as
:class:`GradientLayer` records; :mod:`.hooks` captures their gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

__all__ = ["GradientLayer", "find_gradient_layers"]


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
