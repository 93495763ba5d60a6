"""Per-kind formulas turning what a forward hook saw and its output's gradient into per-example gradients.

Each rule has ``save(layer, module, args, kwargs, output) -> ctx`` (called by the forward hook, in the
forward pass; what it keeps is detached) and ``grad(layer, ctx, g, dtype)`` (called by the tensor hook
with ``g`` = d(sum of losses)/d(output)), which returns the ``[n, rank, dim]`` rank-first gradient, or a
pair ``(a, b)`` whose batched product ``a @ b`` is that gradient (so it can be written straight into a
caller's buffer). The batch axis is the first axis of the hooked module's input.

* ``lora_A``/``lora_B``/``head`` (``nn.Linear``): ``sum_t delta[i, t]^T x[i, t]``.
* ``embedding_A``/``embedding_B`` (PEFT ``lora.Embedding``, hooked on the layer itself): the output is
  ``base(ids) + c * A^T[ids] @ B^T`` with ``c`` = scaling (× the base's ``embed_scale``), so
  ``dB^T = sum_t A^T[ids_t]^T (c g_t)`` and ``dA^T[v] = sum_{t: ids_t = v} c g_t B`` — a sum of one-hot
  rows, skipping the embedding's ``padding_idx`` (which ``F.embedding`` gives no gradient).
* ``magnitude`` (DoRA's ``lora_magnitude_vector``, hooked on the DoRA module): its output is
  ``(m / w - 1) * base + (m / w) * s * lora`` with the column norms ``w`` detached (as PEFT and the DoRA
  paper do), so ``dm_o = sum_t g_to (base_to + s * lora_to) / w_o``; base, lora and ``w`` are recomputed
  without gradient by PEFT's own functions.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RULES"]


def _batch_input(layer, args: tuple) -> Tensor:
    if not args or not isinstance(args[0], Tensor):
        raise RuntimeError(f"{layer.name}: expected the input tensor as first positional argument")
    x = args[0].detach()
    if x.dim() < 2:
        raise RuntimeError(f"{layer.name}: input of shape {tuple(x.shape)} has no batch axis")
    return x


def _rows(t: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    return t.reshape(n, -1, t.shape[-1]).to(dtype)


class LinearRule:
    @staticmethod
    def save(layer, module, args: tuple, kwargs: dict, output: Tensor) -> Any:
        return _batch_input(layer, args)

    @staticmethod
    def grad(layer, x: Tensor, g: Tensor, dtype: torch.dtype):
        n = x.shape[0]
        x, g = _rows(x, n, dtype), _rows(g, n, dtype)
        if layer.has_bias:
            x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
        return (x.transpose(1, 2), g) if layer.transposed else (g.transpose(1, 2), x)


def _embedding_scale(module, adapter: str) -> float:
    scale = float(module.scaling[adapter])
    embed_scale = module._get_embed_scale()  # PEFT's own reading of the base's embed_scale (e.g. Gemma)
    return scale * float(embed_scale) if embed_scale is not None else scale


class EmbeddingARule:
    @staticmethod
    def save(layer, module, args: tuple, kwargs: dict, output: Tensor) -> Any:
        ids = _batch_input(layer, args)
        adapter = layer.module.adapter
        return ids, module.lora_embedding_B[adapter].detach(), _embedding_scale(module, adapter), \
            module.get_base_layer().padding_idx

    @staticmethod
    def grad(layer, ctx, g: Tensor, dtype: torch.dtype) -> Tensor:
        ids, b, c, padding_idx = ctx
        n = ids.shape[0]
        ids = ids.reshape(n, -1)
        ga = (_rows(g, n, dtype) @ b.to(dtype)) * c  # [n, T, r]: gradient of the rows A^T[ids]
        if padding_idx is not None:
            ga = ga.masked_fill((ids == padding_idx).unsqueeze(-1), 0)
        out = torch.zeros(n, layer.rank, layer.dim, dtype=dtype, device=ga.device)
        return out.scatter_add_(2, ids.unsqueeze(1).expand(n, layer.rank, ids.shape[1]), ga.transpose(1, 2))


class EmbeddingBRule:
    @staticmethod
    def save(layer, module, args: tuple, kwargs: dict, output: Tensor) -> Any:
        ids = _batch_input(layer, args)
        adapter = layer.module.adapter
        after_a = F.embedding(ids, module.lora_embedding_A[adapter].detach().T)  # the forward's A^T[ids]
        return after_a, _embedding_scale(module, adapter)

    @staticmethod
    def grad(layer, ctx, g: Tensor, dtype: torch.dtype):
        after_a, c = ctx
        n = after_a.shape[0]
        return _rows(after_a, n, dtype).transpose(1, 2), _rows(g, n, dtype) * c


class MagnitudeRule:
    @staticmethod
    def save(layer, module, args: tuple, kwargs: dict, output: Tensor) -> Any:
        from peft.utils.integrations import dequantize_module_weight
        from peft.utils.other import transpose

        x = _batch_input(layer, args)
        lora_a, lora_b, s = kwargs["lora_A"], kwargs["lora_B"], kwargs["scaling"]
        base_layer, adapter = kwargs["base_layer"], kwargs.get("adapter_name", "default")
        with torch.no_grad():  # the hooks of lora_A/lora_B ignore these calls (their outputs need no grad)
            lora_weight = module.get_lora_weight(lora_A=lora_a, lora_B=lora_b, adapter_name=adapter).to(x.dtype)
            weight = dequantize_module_weight(base_layer).to(x.dtype)
            norm = module.get_weight_norm(weight=weight, lora_weight=lora_weight, scaling=s, adapter_name=adapter)
            base = kwargs.get("base_result")
            if base is None:
                base = F.linear(x, transpose(weight, module.fan_in_fan_out))
            elif getattr(base_layer, "bias", None) is not None:
                base = base - base_layer.bias
            return (base + lora_b(lora_a(x)) * s) / norm

    @staticmethod
    def grad(layer, feature: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
        n = feature.shape[0]
        return (_rows(g, n, dtype) * _rows(feature, n, dtype)).sum(1, keepdim=True)


RULES = {"lora_A": LinearRule, "lora_B": LinearRule, "head": LinearRule, "magnitude": MagnitudeRule,
         "embedding_A": EmbeddingARule, "embedding_B": EmbeddingBRule}
