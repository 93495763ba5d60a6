"""The fitting pass of the attributor: per-sample gradients of every batch, checked, and their
streaming into per-layer GFIM and r×r sums (with the gradient cache and fit checkpoints).

``FitPass`` is a mixin of :class:`~hyperinf_ext.attributor.hyperinf.HyperINF`; it uses the attributor's
``config``, ``model``, ``layers``, ``loss_fn``, ``factors``, ``cache``, counters, ``_timed`` and ``_bar``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from .. import ops, persistence
from .cache import GradientCache, GradientSink
from ..capture import ExampleError, PerSampleGradients
from .config import torch_dtype as _torch_dtype
from ..curvature.methods import LayerFactor


class FitPass:
    """Gradient batches (validated once for every method) and the GFIM accumulation of ``fit``."""

    def _grad_batches(
        self, loader: Iterable, desc: str, skip: int = 0, groups: dict[Any, list[str]] | None = None,
        read: list[torch.Tensor] | None = None,
    ) -> Iterator[tuple[torch.Tensor, dict]]:
        """Per-sample gradients of every batch of ``loader``: (index [B], {layer: [B, r, d]}).

        With ``groups`` ({key: layer names of equal (d, r)}), the gradients of each group are written
        into one fresh [L, B, r, d] tensor, yielded as a third item {key: tensor}; the per-layer
        tensors are its slices.

        Every batch is checked here, once for all methods: a ValueError names an empty batch, a bad
        or repeated ``index`` (over the whole pass), and by index the examples without a loss or
        with a non-finite loss/gradient (which would otherwise turn every score NaN or zero).

        ``read``: when given, receives (once the loader is exhausted) the bool bitmap of every index the
        pass read, skipped batches included — what a distributed fit checks the shards against.
        """
        offset = 0
        layer_of = {l.name: l for l in self.layers}
        taken = torch.zeros(0, dtype=torch.bool, device="cpu")  # indices already used in this pass
        with PerSampleGradients(self.model, self.layers, dtype=_torch_dtype(self.config.grad_dtype)) as psg:
            for b, batch in enumerate(self._bar(loader, desc)):
                n = _batch_size(batch)
                if n == 0:
                    raise ValueError(f"{desc}: batch {b} is empty (no examples)")
                index = _batch_index(batch, n, offset, f"{desc}: batch {b}")
                taken = _take(taken, index, f"{desc}: batch {b}")
                offset += n
                if b < skip:
                    continue
                if groups is None:
                    with self._timed("gradients"):
                        grads = _compute(psg, batch, self.loss_fn, index, desc)
                        check_finite(psg.last_losses, grads.values(), index, desc, stacked=False)
                    yield index, grads  # outside the timer: the consumer's work is not "gradients"
                    continue
                with self._timed("gradients"):
                    stacked, out, mixed = {}, {}, []
                    for key, names in groups.items():
                        ws = [layer_of[name].module.weight for name in names]
                        dtype = _torch_dtype(self.config.grad_dtype) or ws[0].dtype
                        forced = self.config.grad_dtype is not None
                        if any(w.device != ws[0].device or (not forced and w.dtype != ws[0].dtype) for w in ws):
                            mixed.append(key)  # rare: weights of one group in several dtypes/devices
                            continue
                        first = layer_of[names[0]]
                        buf = torch.empty(len(names), n, first.rank, first.dim, dtype=dtype, device=ws[0].device)
                        stacked[key] = buf
                        out.update({name: buf[i] for i, name in enumerate(names)})
                    grads = _compute(psg, batch, self.loss_fn, index, desc, out=out)
                    for key in mixed:
                        stacked[key] = torch.stack([grads[name].to(grads[groups[key][0]]) for name in groups[key]])
                    check_finite(psg.last_losses, stacked.values(), index, desc, stacked=True)
                yield index, grads, stacked
        if read is not None:
            read.append(taken)

    def _train_batches(self, train_loader: Iterable | None) -> Callable[[], Iterator[tuple[torch.Tensor, dict]]]:
        """A re-iterable source of training gradients: the fit cache, or passes over ``train_loader``."""
        if train_loader is not None:
            return lambda: self._grad_batches(train_loader, "train gradients")
        # batches_done == 0 with factors: this rank's shard of a distributed fit was empty, nothing to stream
        if not self.cache.enabled or self.cache.count != self.batches_done or not self.factors:
            raise ValueError(
                "train_loader: required — the training gradients were not cached during fit "
                "(cache='none', or fit was not run / was resumed without its cache)"
            )
        return lambda: iter(self.cache)


    def _accumulate(self, train_loader: Iterable, ckpt: "persistence.Checkpoint | None", checkpoint_every: int,
                    sink: "GradientSink | None" = None) -> None:
        """The streaming pass of ``fit``: per-layer GFIM sums, counts, the gradient cache and ``sink``."""
        fdtype = self.fdtype
        fingerprint = persistence.DataFingerprint()
        if ckpt is not None and ckpt.exists:
            self._restore_checkpoint(ckpt)  # factors and counts of the last commit, checked against model and settings
        else:
            self.factors = {
                l.name: LayerFactor(l.name, l.rank, l.dim, torch.zeros(l.dim, l.dim, dtype=fdtype, device="cpu"), 0,
                                    rank_sum=torch.zeros(l.rank, l.rank, dtype=fdtype, device="cpu"))
                for l in self.layers
            }
            self.n_train, self.batches_done = 0, 0
        # The sums live where the gradients are (a CUDA model accumulates on its GPU); factors
        # restored from a checkpoint come back on the CPU.
        device = self.layers[0].module.weight.device if self.layers else torch.device("cpu")
        skip = self.batches_done
        loader = ckpt.watch(train_loader, fingerprint) if ckpt is not None else train_loader
        mode = self.config.cache
        if ckpt is not None and mode != "none":
            mode = "disk"
        self.cache.close()
        self.cache = GradientCache("none")  # stays if the next line raises (e.g. a corrupt cache manifest)
        self.cache = GradientCache(mode, (ckpt.directory / "grads") if (ckpt is not None and mode == "disk") else None)
        if self.cache.count < self.batches_done:
            # the checkpoint's cached gradients are gone: cache nothing rather than a misnumbered tail
            self.cache = GradientCache("none")
        self.cache.truncate(self.batches_done)
        if sink is not None:
            if sink.count < self.batches_done:
                raise ValueError(f"gradient_sink: holds {sink.count} batches but the checkpoint resumes after "
                                 f"{self.batches_done}; the sink's data were lost: start over with a fresh "
                                 "checkpoint_dir and sink")
            sink.truncate(self.batches_done)
        # Layers of equal (d, r) share one batched GFIM call on their stacked gradients.
        groups: dict[tuple[int, int], list[str]] = {}
        for n, f in self.factors.items():
            groups.setdefault((f.dim, f.rank), []).append(n)
        accs = {k: torch.stack([self.factors[n].gfim_sum for n in names]).to(device) for k, names in groups.items()}
        rank_accs = {
            k: torch.stack([self.factors[n].rank_sum if self.factors[n].rank_sum is not None
                            else torch.zeros(k[1], k[1], dtype=fdtype, device="cpu") for n in names]).to(device)
            for k, names in groups.items()
        }
        scratch: dict[tuple[int, int], torch.Tensor] = {}
        read: list[torch.Tensor] = []
        for index, grads, stacked_groups in self._grad_batches(loader, "fit", skip=skip, groups=groups, read=read):
            with self._timed("gfim"):
                for key, names in groups.items():
                    stacked = stacked_groups[key]  # [L, B, r, d], contiguous; grads[n] are its slices
                    work = self._batch_gfim_dtype(stacked.dtype)
                    if work == fdtype:
                        ops.gfim_accumulate_(accs[key], stacked, backend=self.config.backend)
                    else:
                        # this batch's sums in the gradients' precision, the running sum in fdtype
                        buf = scratch.get(key)
                        if buf is None or buf.dtype != work:
                            buf = scratch[key] = torch.empty(accs[key].shape, dtype=work, device=accs[key].device)
                        buf.zero_()
                        ops.gfim_accumulate_(buf, stacked, backend=self.config.backend)
                        accs[key] += buf
                    # r×r side factor Σ_i g_i·g_iᵀ: one batched GEMM, n·r²·d flops (small next to the d×d one)
                    ops.rank_gram_accumulate_(rank_accs[key], stacked)
            with self._timed("cache"):
                self.cache.append(index, grads)
                if sink is not None:
                    sink.append(index, grads)
            self.n_train = max(self.n_train, int(index.max()) + 1)
            self.batches_done += 1
            for f in self.factors.values():
                f.count += index.numel()
            if ckpt is not None and checkpoint_every and self.batches_done % checkpoint_every == 0:
                self._sync_factors(accs, rank_accs, groups)
                if sink is not None:
                    sink.flush()  # what the checkpoint says is done must be in the sink first
                self._commit_checkpoint(ckpt, fingerprint, complete=False)
        self.fit_read = read[0] if read else None
        if self.batches_done == 0 and self._comm is None:  # a rank's shard may be empty: the reduction checks
            raise ValueError("train_loader: yielded no batches")
        self._sync_factors(accs, rank_accs, groups)
        if sink is not None:
            sink.flush()
        if ckpt is not None:
            self._commit_checkpoint(ckpt, fingerprint, complete=True)

    def _sync_factors(self, accs: dict, rank_accs: dict, groups: dict[tuple[int, int], list[str]]) -> None:
        for key, names in groups.items():
            for i, n in enumerate(names):
                self.factors[n].gfim_sum = accs[key][i].clone()
                self.factors[n].rank_sum = rank_accs[key][i].clone()

    def _batch_gfim_dtype(self, grad_dtype: torch.dtype) -> torch.dtype:
        """dtype of one batch's GFIM sums before they join the running sum in ``fdtype``."""
        if grad_dtype == torch.float64:
            return torch.float64  # exact as they come
        if self.fdtype == torch.float32:
            return torch.float32  # nothing finer to add into
        return _torch_dtype(self.config.gfim_dtype) or self.fdtype


def _batch_size(batch: Mapping[str, Any]) -> int:
    for k in ("input_ids", "labels", "inputs_embeds"):
        if k in batch and isinstance(batch[k], torch.Tensor):
            return batch[k].shape[0]
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    raise ValueError("batch: no tensor to take the batch size from")


def _batch_index(batch: Mapping[str, Any], n: int, offset: int, where: str) -> torch.Tensor:
    """The batch's ``index`` entry, checked ([n] non-negative integers), or positions from ``offset``."""
    if "index" not in batch:
        return torch.arange(offset, offset + n, device="cpu")
    index = batch["index"]
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"{where}: index must be a tensor of int64, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"{where}: index must be an integer tensor, got {index.dtype}")
    if index.dim() != 1 or index.numel() != n:
        raise ValueError(f"{where}: index must have shape [{n}] (one entry per example), got {tuple(index.shape)}")
    index = index.long().cpu()
    if bool((index < 0).any()):
        raise ValueError(f"{where}: index must be non-negative, got {index[index < 0][:5].tolist()}")
    return index


def _take(taken: torch.Tensor, index: torch.Tensor, where: str) -> torch.Tensor:
    """Mark ``index`` as used in this pass; a repeated index would merge two examples into one score."""
    top = int(index.max()) + 1
    if top > taken.numel():
        taken = torch.cat([taken, taken.new_zeros(max(top, 2 * taken.numel()) - taken.numel())])
    sorted_index = index.sort().values
    repeated = sorted_index[1:][sorted_index[1:] == sorted_index[:-1]]
    if repeated.numel():
        raise ValueError(f"{where}: index repeats {repeated.unique()[:5].tolist()} within the batch "
                         "(every example needs its own index)")
    again = index[taken[index]]
    if again.numel():
        raise ValueError(f"{where}: index {again[:5].tolist()} already used by an earlier batch of this pass "
                         "(every example needs its own index)")
    taken[index] = True
    return taken


def _compute(psg: PerSampleGradients, batch: Mapping[str, Any], loss_fn, index: torch.Tensor, desc: str,
             out: dict | None = None) -> dict[str, torch.Tensor]:
    """``psg.compute``, with a per-example problem of the loss reported by example index."""
    try:
        return psg.compute(batch, loss_fn, out=out)
    except ExampleError as exc:
        raise ValueError(f"{desc}: examples {index[exc.rows].tolist()[:10]} (index): {exc.problem}") from None


def check_finite(losses: torch.Tensor, grads: Iterable[torch.Tensor], index: torch.Tensor, desc: str,
                  *, stacked: bool) -> None:
    """Raise naming the examples whose loss or gradient is NaN/Inf (they would poison every score)."""
    bad = ~torch.isfinite(losses).cpu()
    for g in grads:
        # a sum is non-finite when any term is: one reduction instead of an isfinite mask per element
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32  # fp16 sums could overflow
        per_example = g.sum(dim=(-2, -1), dtype=acc)  # [L, B] or [B]
        if stacked:
            per_example = per_example.sum(0)
        bad |= ~torch.isfinite(per_example).cpu()
    if bool(bad.any()):
        raise ValueError(f"{desc}: examples {index[bad].tolist()[:10]} (index) have a non-finite (NaN/Inf) loss "
                         "or gradient; check their inputs and labels, or the model")

