"""The committed state of a factor or checkpoint directory: reading it back with every check, installing
it into an attributor, writing a new generation atomically; ``save``/``load`` and score files."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from ..methods import LayerFactor, make_method
from . import files
from .files import json_field, json_int, read_json, read_tensors, save_tensors_atomic, write_bytes_atomic

if TYPE_CHECKING:  # the attributor imports this package
    from ..attributor import HyperINF

FORMAT_VERSION = 2
"""Format 2: meta.json names its generation's factors file; format 1 (read only) used factors.safetensors."""
META = "meta.json"
_FACTORS_RE = re.compile(r"^factors-(\d+)\.safetensors$")


@dataclasses.dataclass
class StoredState:
    """A committed state read back and checked against itself (not yet against a model)."""

    directory: Path
    meta: dict
    factors_path: Path
    layers: list[dict]  # {"name", "rank", "dim", "count", "damping"} per layer, in stored order
    tensors: dict[str, torch.Tensor]

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", True))  # format 1 stored finished fits only

    @property
    def method_state(self) -> dict[str, torch.Tensor]:
        return {k[len("method_state."):]: v for k, v in self.tensors.items() if k.startswith("method_state.")}


def read_state(directory: str | Path) -> StoredState:
    """Read and check the committed state of a factor or checkpoint directory.

    Checks: meta.json's keys and types, that the factors file belongs to this commit (generation),
    that every layer has its tensors with the shapes meta.json states ([d, d] GFIM sums and inverses,
    [r, r] rank sums) and that every tensor is finite.
    """
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.exists():
        raise ValueError(f"{directory}: no saved HyperINF factors ({META} missing)")
    meta = read_json(meta_path, "HyperINF metadata")
    where = str(meta_path)
    fmt = meta.get("format")
    if fmt not in (1, FORMAT_VERSION):
        raise ValueError(f"{where}: unsupported factor format {fmt!r} (this version reads 1 and {FORMAT_VERSION})")
    json_field(meta, "config", dict, where)
    json_int(meta, "n_train", where)
    json_int(meta, "batches_done", where)
    layers = json_field(meta, "layers", list, where)
    for i, layer in enumerate(layers):
        lw = f"{where}: layers[{i}]"
        if not isinstance(layer, dict):
            raise ValueError(f"{lw}: must be an object, got {layer!r}")
        json_field(layer, "name", str, lw)
        json_int(layer, "rank", lw, 1)
        json_int(layer, "dim", lw, 1)
        json_int(layer, "count", lw)
        damping = json_field(layer, "damping", (int, float), lw)
        if not (math.isfinite(damping) and damping >= 0):
            raise ValueError(f"{lw}: 'damping' must be finite and ≥ 0, got {damping!r}")
    if fmt == 1:
        factors_name, generation = "factors.safetensors", None
    else:
        factors_name = json_field(meta, "factors", str, where)
        generation = json_int(meta, "generation", where, 1)
        json_field(meta, "complete", bool, where)
        if _FACTORS_RE.match(factors_name) is None:
            raise ValueError(f"{where}: 'factors' must name a factors-<generation>.safetensors file, got {factors_name!r}")
    factors_path = directory / factors_name
    tensors, tmeta = read_tensors(factors_path, "HyperINF factors")
    if generation is not None and tmeta.get("generation") != str(generation):
        raise ValueError(f"{factors_path}: generation {tmeta.get('generation')!r} does not match {META}'s "
                         f"{generation}; the directory mixes two commits")
    for layer in layers:
        n, r, d = layer["name"], layer["rank"], layer["dim"]
        expected = {f"gfim_sum.{n}": (d, d), f"rank_sum.{n}": (r, r), f"method_state.{n}": (d, d)}
        if f"gfim_sum.{n}" not in tensors:
            raise ValueError(f"{factors_path}: missing tensor 'gfim_sum.{n}' for layer {n!r}")
        for key, shape in expected.items():
            t = tensors.get(key)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{factors_path}: tensor {key!r} has shape {tuple(t.shape)}, but {META} "
                                 f"states r={r}, d={d} for layer {n!r} (expected {shape})")
    known = {f"{kind}.{l['name']}" for l in layers for kind in ("gfim_sum", "rank_sum", "method_state")}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise ValueError(f"{factors_path}: tensors {unknown[:3]} belong to no layer listed in {META}")
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{factors_path}: tensor {key!r} has dtype {t.dtype}, expected a floating dtype")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{factors_path}: tensor {key!r} contains NaN or Inf; the saved factors are corrupt")
    return StoredState(directory, meta, factors_path, layers, tensors)


def check_layers(attr: "HyperINF", stored: StoredState) -> None:
    """``ValueError`` unless ``stored`` has ``attr``'s layers, in its order, with its (r, d) shapes."""
    model_layers = {l.name: l for l in attr.layers}
    names = list(model_layers)
    saved = [l["name"] for l in stored.layers]
    if saved != names:
        missing = [n for n in names if n not in saved][:3]
        extra = [n for n in saved if n not in model_layers][:3]
        raise ValueError(
            f"{stored.directory}: the saved layers do not match the model's ({len(saved)} saved, {len(names)} in "
            f"the model; model layers not saved: {missing}; saved layers not in the model: {extra}"
            + ("; same names in another order" if not missing and not extra else "") + ")"
        )
    for layer in stored.layers:
        m = model_layers[layer["name"]]
        if (layer["rank"], layer["dim"]) != (m.rank, m.dim):
            raise ValueError(
                f"{stored.directory}: layer {layer['name']!r}: saved GFIM shape [{layer['dim']}, {layer['dim']}] with "
                f"rank {layer['rank']} (gradient [r, d] = [{layer['rank']}, {layer['dim']}]), but the model's layer "
                f"has gradient shape [{m.rank}, {m.dim}]; was the model built with another LoRA rank or hidden size?"
            )


def apply_state(attr: "HyperINF", stored: StoredState) -> None:
    """Install ``stored`` into ``attr`` after checking every layer's name and shape against its model."""
    check_layers(attr, stored)
    fdtype = attr.fdtype
    t = stored.tensors
    attr.factors = {
        l["name"]: LayerFactor(
            l["name"], l["rank"], l["dim"], t[f"gfim_sum.{l['name']}"].to(fdtype), l["count"], float(l["damping"]),
            rank_sum=t[f"rank_sum.{l['name']}"].to(fdtype) if f"rank_sum.{l['name']}" in t else None,
        )
        for l in stored.layers
    }
    attr.n_train, attr.batches_done = stored.meta["n_train"], stored.meta["batches_done"]


# ---------------------------------------------------------------------------------------- writing


def _next_generation(directory: Path) -> int:
    gens = [int(m.group(1)) for p in directory.iterdir() if (m := _FACTORS_RE.match(p.name))]
    return max(gens, default=0) + 1


def write_state(
    attr: "HyperINF",
    directory: str | Path,
    *,
    complete: bool,
    method_state: Mapping[str, torch.Tensor] | None = None,
    fingerprint: "DataFingerprint | None" = None,
    model_digest: str | None = None,
) -> Path:
    """Commit ``attr``'s factors (and ``method_state``, per-layer [d, d]) to ``directory`` atomically.

    The factors go to a new ``factors-<generation>.safetensors``; replacing meta.json is the commit;
    files of older generations are removed afterwards.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for n, f in attr.factors.items():
        tensors[f"gfim_sum.{n}"] = f.gfim_sum.cpu().contiguous()
        if f.rank_sum is not None:
            tensors[f"rank_sum.{n}"] = f.rank_sum.cpu().contiguous()
    for n, x in (method_state or {}).items():
        tensors[f"method_state.{n}"] = x.cpu().contiguous()
    for key, t in tensors.items():
        # never commit a state that load would refuse
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{key}: contains NaN or Inf; refusing to write it to {directory}")
    generation = _next_generation(directory)
    name = f"factors-{generation:06d}.safetensors"
    save_tensors_atomic(directory / name, tensors, {"generation": str(generation)}, step="factors")
    files.crash_point("factors_written")
    meta = {
        "format": FORMAT_VERSION,
        "generation": generation,
        "factors": name,
        "complete": complete,
        "config": dataclasses.asdict(attr.config),
        "n_train": attr.n_train,
        "batches_done": attr.batches_done,
        "data": fingerprint.as_dict() if fingerprint is not None else None,
        "model": model_digest,
        "layers": [
            {"name": f.name, "rank": f.rank, "dim": f.dim, "count": f.count, "damping": f.damping}
            for f in attr.factors.values()
        ],
    }
    write_bytes_atomic(directory / META, json.dumps(meta, indent=1).encode(), step="meta")
    files.crash_point("meta_committed")
    for p in directory.iterdir():  # older generations and temporaries left by killed writers
        if p.name != name and (p.name.startswith(("factors-", f"{META}.tmp")) or p.name == "factors.safetensors"):
            p.unlink(missing_ok=True)
    return directory


# ----------------------------------------------------------------------------- save / load / scores


def save(attr: "HyperINF", directory: str | Path) -> Path:
    """``HyperINF.save``: factors, the current method's inverses and the configuration."""
    attr._require_fit()
    attr._prepare()  # the stored inverses must belong to the stored factors and configuration
    state = getattr(attr.method, "state", None) or {}
    return write_state(attr, directory, complete=True, method_state=state)


def load(cls: type, directory: str | Path, model: torch.nn.Module, *, loss_fn=None, progress: bool = True) -> "HyperINF":
    """``HyperINF.load``: rebuild an attributor from ``save`` (or a finished fit checkpoint) for ``model``."""
    from ..config import HyperINFConfig

    stored = read_state(directory)
    if not stored.complete:
        raise ValueError(f"{stored.directory}: an unfinished fit checkpoint ({stored.meta['batches_done']} batches); "
                         f"finish it with fit(train_loader, checkpoint_dir=...) before loading it")
    try:
        config = HyperINFConfig(**stored.meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{stored.directory / META}: invalid 'config': {e}") from None
    attr = cls(model, loss_fn=loss_fn, progress=progress, config=config)
    apply_state(attr, stored)
    prepare_from_stored(attr, stored.method_state)
    return attr


def prepare_from_stored(attr: "HyperINF", method_state: Mapping[str, torch.Tensor]) -> None:
    """Reuse stored inverses bit for bit when they cover every layer; otherwise prepare afresh."""
    attr._prepared_for = None
    if method_state and set(method_state) == set(attr.factors):
        cfg = attr.config
        attr.method = make_method(cfg.method, backend=cfg.backend, tol=cfg.tol, depth=cfg.lissa_depth,
                                  scale_factor=cfg.lissa_scale_factor, solver=cfg.solver)
        attr.method.state = {n: t.to(attr.fdtype) for n, t in method_state.items()}
        attr._prepared_for = attr._prepare_key()
    else:
        attr._prepare()


def save_scores(path: str | Path, scores: torch.Tensor, sign: str, **metadata: str) -> None:
    """Write a score tensor (any shape) to a safetensors file atomically; metadata values are strings."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores: expected a tensor, got {type(scores).__name__}")
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"metadata: values must be strings ({bad[0]!r} is {type(metadata[bad[0]]).__name__})")
    save_tensors_atomic(path, {"scores": scores.detach().cpu().contiguous()}, {"sign": sign, **metadata})


def load_scores(path: str | Path) -> torch.Tensor:
    """The score tensor written by ``save_scores``."""
    tensors, _ = read_tensors(path, "scores")
    if "scores" not in tensors:
        raise ValueError(f"{path}: no tensor named 'scores' (found {sorted(tensors)[:3]})")
    return tensors["scores"]
