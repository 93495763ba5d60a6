"""What the ranks of a distributed run exchange: factor sums, per-layer method state, scores.

Bytes per collective (d = a layer's input dim, r = its LoRA rank, b = bytes of the factor dtype):

* fit: one all-reduce of the GFIM sums' upper triangles and the rank-side sums, b·(d(d+1)/2 + r(r+1)/2)
  per layer, in buckets of ``BUCKET_BYTES``; two int64 all-reduces (count, n_train) and an int32
  coverage vector of n_train (the shards must partition the training indices);
* prepare: every layer's inverse is computed on one rank (layers dealt out by cost d³) and broadcast
  from it — the symmetric inverses as upper triangles, b·d(d+1)/2 per layer for hyperinf (plus
  b·r(r+1)/2 for kronecker) — one broadcast per owner and dtype;
* scores: b·n_query·n_local per rank to rank 0 (or to every rank), plus an int32 coverage vector of
  n_train; top-k only 2·n_query·K values and indices per rank.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import Comm

if TYPE_CHECKING:
    from ..curvature.methods import LayerFactor, Method

BUCKET_BYTES = 64 << 20  # one all-reduce per ~64 MB: bounded extra memory, few collectives


# ----------------------------------------------------------------------------------------------- fit


def _triu(x: torch.Tensor) -> torch.Tensor:
    """The upper triangle (with the diagonal) of a symmetric [d, d] matrix, flattened: d(d+1)/2."""
    i, j = torch.triu_indices(x.shape[0], x.shape[1], device=x.device)
    return x[i, j]


def _untriu(v: torch.Tensor, d: int) -> torch.Tensor:
    i, j = torch.triu_indices(d, d, device=v.device)
    out = v.new_empty(d, d)
    out[i, j] = v
    out[j, i] = v
    return out


def reduce_factors(comm: Comm, factors: dict[str, "LayerFactor"], n_train: int,
                   read: torch.Tensor | None = None) -> int:
    """Sum every rank's GFIM sums, rank-side sums and counts in ``factors`` (in place); returns n_train =
    the largest index + 1 over ranks (``n_train``: this rank's).

    ``read``: this rank's bitmap of the training indices its fit pass read.  Before any sum travels, the
    ranks check that their shards partition 0..n_train-1 (each index read by exactly one rank) and all
    raise the same ValueError otherwise: equal counts do not rule out an example read on two ranks and
    another on none, whose sums would be off.  Without ``read`` only the counts are checked.  A rank
    may have read nothing (an empty shard).  The sums are symmetric, so only upper triangles travel.
    """
    names = sorted(factors)
    local = factors[names[0]].count
    counts = torch.tensor([local], dtype=torch.int64, device="cpu")
    comm.all_reduce_(counts, "fit: example counts")
    top = torch.tensor([n_train], dtype=torch.int64, device="cpu")
    comm.all_reduce_(top, "fit: n_train", op=torch.distributed.ReduceOp.MAX)
    total, n_train = int(counts), int(top)
    if total == 0:
        raise ValueError("train_loader: no rank read any example (every shard is empty)")
    if read is not None:
        check_coverage(comm, read, n_train, "fit", verb="read")
    elif total > n_train:
        raise ValueError(f"train_loader: the ranks read {total} examples but the largest index is {n_train - 1}: "
                         "some examples were read by more than one rank (each must be on exactly one; see "
                         "hyperinf_ext.distributed.ShardSampler)")
    parts: list[tuple[str, str]] = [(n, kind) for n in names for kind in ("gfim_sum", "rank_sum")
                                    if getattr(factors[n], kind) is not None]
    bucket: list[tuple[str, str]] = []
    size = 0
    for part in parts + [None]:  # None flushes the last bucket
        if part is not None:
            x = getattr(factors[part[0]], part[1])
            bucket.append(part)
            size += x.shape[0] * (x.shape[0] + 1) // 2 * x.element_size()
            if size < BUCKET_BYTES:
                continue
        if bucket:
            tensors = [getattr(factors[n], k) for n, k in bucket]
            flat = torch.cat([_triu(t).to(tensors[0].dtype) for t in tensors])
            comm.all_reduce_(flat, "fit: factor sums")
            for (n, k), piece in zip(bucket, flat.split([t.shape[0] * (t.shape[0] + 1) // 2 for t in tensors])):
                t = getattr(factors[n], k)
                setattr(factors[n], k, _untriu(piece, t.shape[0]).to(t))
        bucket, size = [], 0
    for f in factors.values():
        f.count = total
    return n_train


# ------------------------------------------------------------------------------------------- prepare


def assign_layers(factors: dict[str, "LayerFactor"], world: int) -> dict[str, int]:
    """Layer → owning rank: largest cost (d³ + r³) first, each to the least loaded rank (deterministic)."""
    load = [0] * world
    owner = {}
    for name in sorted(factors, key=lambda n: (-(factors[n].dim ** 3 + factors[n].rank ** 3), n)):
        p = min(range(world), key=lambda q: (load[q], q))
        owner[name] = p
        load[p] += factors[name].dim ** 3 + factors[name].rank ** 3
    return owner


def _per_layer_dicts(method: "Method", names: set[str]) -> dict[str, dict]:
    """The method's attributes that map layer names to per-layer state (state, info, left, right, …)."""
    return {a: v for a, v in vars(method).items() if isinstance(v, dict) and v and set(v) <= names}


def prepare_shared(comm: Comm, method: "Method", factors: dict[str, "LayerFactor"]) -> None:
    """``method.prepare(factors)`` with each layer's work done once, on its owner, and the results broadcast.

    Per-layer tensors travel by broadcast (one per owner and dtype), small per-layer values (iteration
    counts, scales) as objects.  A method whose per-layer state is not data (e.g. closures) is prepared
    on every rank instead — the same result, without the saving.
    """
    if method.needs_train_pass:
        raise ValueError(f"distributed: method {method.name!r} streams every training gradient while "
                         "preconditioning, which a sharded training set does not give it")
    names = set(factors)
    owner = assign_layers(factors, comm.world)
    from . import reported

    with reported(comm, "prepare"):
        method.prepare({n: factors[n] for n in sorted(factors) if owner[n] == comm.rank})
    layouts: dict[str, dict[str, Any]] = {}
    shareable = True
    for attr, per_layer in _per_layer_dicts(method, names).items():
        for n, v in per_layer.items():
            if isinstance(v, torch.Tensor):
                # an exactly symmetric matrix (the inverses are symmetrised) travels as its upper triangle
                sym = v.dim() == 2 and v.shape[0] == v.shape[1] and bool(torch.equal(v, v.T))
                layouts.setdefault(attr, {})[n] = ("tensor", tuple(v.shape), str(v.dtype).replace("torch.", ""),
                                                   v.device.type, sym)
            elif not _plain_data(v):
                shareable = False
            else:
                layouts.setdefault(attr, {})[n] = ("object", v)
    every = comm.all_gather_object((shareable, layouts), "prepare: layouts")
    if not all(ok for ok, _ in every):
        method.prepare(factors)
        return
    for src, (_, layout) in enumerate(every):
        by_dtype: dict[str, list[tuple[str, str]]] = {}
        for attr, per_layer in sorted(layout.items()):
            for n, spec in sorted(per_layer.items()):
                if spec[0] == "tensor":
                    by_dtype.setdefault(spec[2], []).append((attr, n))
                elif src != comm.rank:
                    _slot(method, attr)[n] = spec[1]
        for dtype, entries in sorted(by_dtype.items()):
            specs = [layout[a][n] for a, n in entries]
            sizes = [s[1][0] * (s[1][0] + 1) // 2 if s[4] else int(torch.Size(s[1]).numel()) for s in specs]
            if src == comm.rank:
                flat = torch.cat([(_triu(t) if spec[4] else t.reshape(-1)).to(comm.device) for spec, t in
                                  zip(specs, (getattr(method, a)[n] for a, n in entries))])
            else:
                flat = torch.empty(sum(sizes), dtype=getattr(torch, dtype), device=comm.device)
            flat = comm.broadcast(flat, src, "prepare: per-layer state")
            if src == comm.rank:
                continue
            for (a, n), spec, piece in zip(entries, specs, flat.split(sizes)):
                device = comm.device if spec[3] == comm.device.type else torch.device(spec[3])
                full = _untriu(piece, spec[1][0]) if spec[4] else piece.reshape(spec[1]).clone()
                _slot(method, a)[n] = full.to(device)


def _slot(method: "Method", attr: str) -> dict:
    if not isinstance(getattr(method, attr, None), dict):
        setattr(method, attr, {})
    return getattr(method, attr)


def _plain_data(v: Any) -> bool:
    """True for values that travel safely as pickled objects: numbers, strings and containers of them.

    Tensors inside containers, callables and arbitrary objects (e.g. a factorisation holding closures)
    are not: the method is then prepared on every rank instead."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain_data(x) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return all(_plain_data(x) for x in v)
    return False


# -------------------------------------------------------------------------------------------- scores


def check_same_queries(comm: Comm, qidx: torch.Tensor) -> None:
    """Every rank scores the same query set (the training set is what is sharded)."""
    mine = (qidx.numel(), int(qidx.sum()) if qidx.numel() else 0)
    every = comm.all_gather_object(mine, "scores: query sets")
    if any(e != every[0] for e in every):
        raise ValueError(f"query_loader: every rank must read the whole query set (only the training set is "
                         f"sharded), got (count, index sum) {every}")


def check_coverage(comm: Comm, seen: torch.Tensor, n_train: int, stage: str, verb: str = "scored") -> None:
    """Every training index 0..n_train-1 ``verb`` on exactly one rank, else the same ValueError on every rank.

    ``seen``: this rank's count (or bitmap) per index; one int32 all-reduce of n_train entries.  The one
    home of the partition check: the fit (indices read), scores and self-influence (indices scored).
    """
    counts = torch.zeros(n_train, dtype=torch.int32, device="cpu")
    k = min(seen.numel(), n_train)
    counts[:k] = seen[:k].to(torch.int32)
    beyond = torch.tensor([int(seen[n_train:].any()) if seen.numel() > n_train else 0], dtype=torch.int64,
                          device="cpu")
    comm.all_reduce_(counts, f"{stage}: coverage")
    comm.all_reduce_(beyond, f"{stage}: coverage")
    missing = (counts == 0).nonzero().squeeze(1)[:5].tolist()
    twice = (counts > 1).nonzero().squeeze(1)[:5].tolist()
    if int(beyond) or missing or twice:
        problems = ([f"training examples {twice} {verb} by more than one rank"] if twice else []) + \
                   ([f"no gradient for training examples {missing} ({verb} by no rank)"] if missing else []) + \
                   (["indices beyond n_train"] if int(beyond) else [])
        raise ValueError(f"train_loader: over all ranks, {'; '.join(problems)} — the shards must partition the "
                         f"training indices 0..{n_train - 1}, each example on exactly one rank (see "
                         "hyperinf_ext.distributed.ShardSampler)")


def gather_columns(comm: Comm, values: torch.Tensor, index: torch.Tensor, n_train: int,
                   all_ranks: bool, stage: str) -> torch.Tensor | None:
    """Each rank's columns values [Q, n_local] at training ``index`` [n_local] → [Q, n_train] on rank 0.

    One source rank at a time (point-to-point to rank 0, or a broadcast with ``all_ranks``), so the
    receiver holds the result plus one shard.
    """
    sizes = comm.all_gather_object(index.numel(), f"{stage}: shard sizes")
    receives = all_ranks or comm.rank == 0
    out = values.new_empty(values.shape[0], n_train) if receives else None
    for src, size in enumerate(sizes):
        if size == 0:
            continue
        mine = src == comm.rank
        v = values if mine else values.new_empty(values.shape[0], size)
        i = index if mine else index.new_empty(size)
        if all_ranks:
            v, i = comm.broadcast(v, src, stage), comm.broadcast(i, src, stage)
        else:
            v, i = comm.send_to_0(v, src, stage), comm.send_to_0(i, src, stage)
        if out is not None:
            out[:, i.cpu()] = v.cpu()
    return out
