"""The committed state of a factor or checkpoint directory: reading it back with every check, writing a
new generation atomically, and score files.  Takes factors and configuration values, never the
attributor (which installs a state with hyperinf_ext/attributor/stored.py)."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from safetensors import safe_open

from ..curvature.methods import LayerFactor
from . import files, kinds
from .files import json_field, json_int, read_json, read_tensors, save_tensors_atomic, write_bytes_atomic

if TYPE_CHECKING:
    from .fingerprints import DataFingerprint

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


def read_state(directory: str | Path, accept: tuple[str, ...] = (kinds.FACTORS, kinds.CHECKPOINT),
               what: str = "saved HyperINF factors") -> StoredState:
    """Read and check the committed state of a factor or checkpoint directory.

    Checks: that the directory holds one of the kinds ``accept`` (kinds.py; ``what`` names them in the
    message), meta.json's keys and types, that the factors file belongs to this commit (generation),
    that every layer has its tensors with the shapes meta.json states ([d, d] GFIM sums and inverses,
    [r, r] rank sums) and that every tensor is finite.
    """
    directory = Path(directory)
    found = kinds.kind_of(directory)
    if found is not None and found not in accept:
        raise ValueError(f"{directory}: holds {kinds.describe(found)}, not {what}")
    meta_path = directory / META
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: is a file, not a directory of {what}")
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
    if meta.get("adapter_sha256") is not None:
        json_field(meta, "adapter_sha256", str, where)
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


def check_layers(stored: StoredState, layers: Sequence[tuple[str, int, int]]) -> None:
    """``ValueError`` unless ``stored`` has the model's ``layers`` [(name, rank, dim)], in their order, with
    their (r, d) shapes."""
    model_layers = {name: (rank, dim) for name, rank, dim in layers}
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
        m_rank, m_dim = model_layers[layer["name"]]
        if (layer["rank"], layer["dim"]) != (m_rank, m_dim):
            raise ValueError(
                f"{stored.directory}: layer {layer['name']!r}: saved GFIM shape [{layer['dim']}, {layer['dim']}] with "
                f"rank {layer['rank']} (gradient [r, d] = [{layer['rank']}, {layer['dim']}]), but the model's layer "
                f"has gradient shape [{m_rank}, {m_dim}]; was the model built with another LoRA rank or hidden size?"
            )


def check_adapter(stored: StoredState, digest: str, base_digest: str | None = None, *,
                  allow_other: bool = False, scaling: Mapping[str, float] | None = None) -> None:
    """``ValueError`` naming both fingerprints when ``stored`` was fitted on other adapter weights than
    those of ``digest``, or — where it records one — on another base than ``base_digest`` (the
    ``base_fingerprint`` of the model's other weights), unless ``allow_other``; a warning when ``stored``
    predates fingerprints (saves that predate the base fingerprint are checked on the adapter alone).
    ``scaling``: the model's LoRA scaling per attributed layer, checked against the ``lora_scaling`` the
    save records (same weights with another ``lora_alpha`` or ``use_rslora`` give other gradients; the
    fingerprints hash weights only); saves without it are not checked."""
    saved = stored.meta.get("adapter_sha256")
    if saved is None:
        warnings.warn(f"{stored.directory}: the saved factors carry no adapter fingerprint (saved by an older "
                      "version); they cannot be checked against the model's adapter weights", stacklevel=3)
    elif saved != digest and not allow_other:
        raise ValueError(
            f"{stored.directory}: the factors were fitted on other adapter weights (adapter_sha256 {saved}) than "
            f"the model's ({digest}); scores would mix two adapters.  Load the adapter they were fitted on, "
            "fit again, or pass allow_other_weights=True if you mean to use them anyway"
        )
    saved_base = stored.meta.get("base_sha256")
    if saved_base is not None and base_digest is not None and saved_base != base_digest and not allow_other:
        raise ValueError(
            f"{stored.directory}: the factors were fitted with other base weights (base_sha256 {saved_base}) than "
            f"the model's ({base_digest}): another base checkpoint or dtype, or other weights outside the attributed layers; the "
            "gradients, and so the scores, would differ.  Load the model they were fitted with, fit again, or "
            "pass allow_other_weights=True if you mean to use them anyway"
        )
    _check_scaling(stored, scaling, allow_other)


def _check_scaling(stored: StoredState, scaling: Mapping[str, float] | None, allow_other: bool) -> None:
    saved = stored.meta.get("lora_scaling")
    if saved is None or scaling is None:
        return
    where = f"{stored.directory / META}: 'lora_scaling'"
    if not isinstance(saved, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in saved.values()):
        raise ValueError(f"{where} must be an object of layer name → number, got {saved!r:.200}")
    if allow_other:
        return
    for name, now in scaling.items():
        was = saved.get(name)
        if was is not None and not math.isclose(was, now, rel_tol=1e-12):
            raise ValueError(
                f"{stored.directory}: layer {name!r} was fitted with LoRA scaling {was!r}, but the model's is {now!r} "
                "(lora_alpha / r, or lora_alpha / √r with use_rslora): the same weights with another scaling give "
                "other gradients, so the scores would be off.  Load the adapter with the LoRA configuration it was "
                "fitted with, fit again, or pass allow_other_weights=True if you mean to use them anyway"
            )


def stored_factors(stored: StoredState, dtype: torch.dtype) -> dict[str, LayerFactor]:
    """The per-layer factors of ``stored`` (sums in ``dtype``), in the saved layer order."""
    t = stored.tensors
    return {
        l["name"]: LayerFactor(
            l["name"], l["rank"], l["dim"], t[f"gfim_sum.{l['name']}"].to(dtype), l["count"], float(l["damping"]),
            rank_sum=t[f"rank_sum.{l['name']}"].to(dtype) if f"rank_sum.{l['name']}" in t else None,
        )
        for l in stored.layers
    }


# ---------------------------------------------------------------------------------------- writing


def _next_generation(directory: Path) -> int:
    gens = [int(m.group(1)) for p in directory.iterdir() if (m := _FACTORS_RE.match(p.name))]
    return max(gens, default=0) + 1


def write_state(
    directory: str | Path,
    *,
    factors: Mapping[str, LayerFactor],
    config: Mapping[str, object],
    n_train: int,
    batches_done: int,
    complete: bool,
    method_state: Mapping[str, torch.Tensor] | None = None,
    fingerprint: "DataFingerprint | None" = None,
    model_digest: str | None = None,
    adapter_digest: str | None = None,
    base_digest: str | None = None,
    kind: str = kinds.FACTORS,
    lora_scaling: Mapping[str, float] | None = None,
) -> Path:
    """Commit ``factors`` (and ``method_state``, per-layer [d, d]) with the attributor's ``config`` (a
    dict of plain values) and counts to ``directory`` atomically.

    The factors go to a new ``factors-<generation>.safetensors``; replacing meta.json is the commit;
    files of older generations are removed afterwards.  ``adapter_digest`` (``adapter_fingerprint`` of
    the weights the factors were fitted on) is stored as ``adapter_sha256`` and ``base_digest``
    (``base_fingerprint`` of the rest of the model) as ``base_sha256``, both for ``check_adapter`` (as is
    ``lora_scaling``, the LoRA scaling per attributed layer, when given).  The
    directory's write lock is held throughout (``files.writing``).
    ``kind`` (``kinds.FACTORS`` or ``kinds.CHECKPOINT``) goes into meta.json; a directory holding
    another kind is refused before anything is written.
    """
    what = "factors directory" if kind == kinds.FACTORS else "checkpoint_dir"
    directory = kinds.prepare_dir(directory, kind, what)
    with files.writing(directory, what):
        tensors: dict[str, torch.Tensor] = {}
        for n, f in factors.items():
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
            **kinds.manifest_kind(kind),
            "format": FORMAT_VERSION,
            "generation": generation,
            "factors": name,
            "complete": complete,
            "config": dict(config),
            "n_train": n_train,
            "batches_done": batches_done,
            "data": fingerprint.as_dict() if fingerprint is not None else None,
            "model": model_digest,
            "adapter_sha256": adapter_digest,
            "base_sha256": base_digest,
            **({"lora_scaling": dict(lora_scaling)} if lora_scaling is not None else {}),
            "layers": [
                {"name": f.name, "rank": f.rank, "dim": f.dim, "count": f.count, "damping": f.damping}
                for f in factors.values()
            ],
        }
        write_bytes_atomic(directory / META, json.dumps(meta, indent=1).encode(), step="meta")
        files.crash_point("meta_committed")
        for p in directory.iterdir():  # older generations and temporaries left by killed writers
            if p.name != name and (p.name.startswith(("factors-", f"{META}.tmp")) or p.name == "factors.safetensors"):
                p.unlink(missing_ok=True)
        return directory


# ------------------------------------------------------------------------------------------ scores


def _is_score_file(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return "scores" in f.keys() and "sign" in (f.metadata() or {})
    except Exception:  # not a safetensors file at all
        return False


def save_scores(path: str | Path, scores: torch.Tensor, sign: str, **metadata: str) -> None:
    """Write a score tensor (any shape) to a safetensors file atomically; metadata values are strings.

    ``ValueError`` naming ``path`` when it is a directory, when it exists and is not a score file (it is
    not overwritten), or when it cannot be written."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores: expected a tensor, got {type(scores).__name__}")
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"metadata: values must be strings ({bad[0]!r} is {type(metadata[bad[0]]).__name__})")
    path = Path(path)
    if path.is_dir():
        found = kinds.kind_of(path)
        held = f"; it holds {kinds.describe(found)}" if found is not None else ""
        raise ValueError(f"{path}: is a directory; save_scores writes one file, give a file name{held}")
    if path.exists() and not _is_score_file(path):
        raise ValueError(f"{path}: exists and is not a score file written by save_scores; refusing to overwrite "
                         "it — choose another path, or remove it first")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{path}: its parent {path.parent} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(path, {"scores": scores.detach().cpu().contiguous()}, {"sign": sign, **metadata})
    except OSError as e:
        raise ValueError(f"{path}: cannot write the score file ({e.strerror or e})") from None


def load_scores(path: str | Path) -> torch.Tensor:
    """The score tensor written by ``save_scores``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a score file (a score store of scores(out=...) is "
                         f"loaded with HyperINF.load_scores; this one holds {kinds.describe(kinds.kind_of(path))})")
    tensors, _ = read_tensors(path, "scores")
    if "scores" not in tensors:
        raise ValueError(f"{path}: no tensor named 'scores' (found {sorted(tensors)[:3]})")
    return tensors["scores"]
