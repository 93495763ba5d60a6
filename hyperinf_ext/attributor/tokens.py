"""Per-token attribution for causal LMs: each labelled token's exact share of an influence score.

An example's loss is the mean over its T labelled tokens, L = (1/T)·Σ_t ℓ_t (``causal_lm_loss``:
token t is the label at position p ≥ 1, predicted from position p − 1, counted when that position is
attended), so its LoRA gradient is a sum of per-token terms g = Σ_t g_t with g_t = ∇((1/T)·ℓ_t).
With the sign of ``config.SIGN_CONVENTION``, score[q, k] = −Σ_l ⟨q̃_l, g_k,l⟩ (q̃ = the query gradient
preconditioned by the current method) splits exactly, on either side:

* training side: token t of training example k gets −Σ_l ⟨q̃_l, g_k,t,l⟩;
* query side: token s of query q gets −Σ_l ⟨(q_s)~_l, g_k,l⟩, (q_s)~ its per-token gradient
  preconditioned by the same method (every method's preconditioning is linear in the query).

Per-token gradients come from the attributor's own per-sample machinery: copy t of an example keeps
only label t (all others −100) and is otherwise the same row — padding, attention mask and all — so its
per-sample gradient is ∇ℓ_t, scaled here by 1/T.  The copies of the kept examples are processed
``batch_size`` rows per forward pass, and only the examples named by ``pairs`` are ever run: memory is
O(kept examples × their length), never O(n_train × length).  Each example's full row is run too; the
mean of its token losses must equal its loss (else the loss is not the mean token loss: ValueError).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from ..capture import PerSampleGradients
from .config import QueryGradients, torch_dtype
from .fitting import _batch_index, _batch_size, _compute, check_finite
from .topk import TopKScores

__all__ = ["TokenShares", "TokenAttribution", "TokenScoring", "SIDES"]

SIDES = ("train", "query", "both")
CAUSAL_ONLY = ("per-token attribution needs a causal LM with token labels (labels [B, T] shaped like "
               "input_ids, −100 on unlabelled tokens)")


@dataclass
class TokenShares:
    """One example's tokens and, when computed, each labelled token's share of a score.

    ``input_ids`` [L] int64: the example's tokens without padding (attended positions);
    ``positions`` [T] int64: where its labelled tokens (the ones its loss predicts) sit in ``input_ids``;
    ``token_ids`` [T] int64: their labels; ``shares`` [T] in the factor dtype (None when that side was
    not asked for), summing to the pair's score.
    """

    index: int
    input_ids: Tensor
    positions: Tensor
    token_ids: Tensor
    shares: Tensor | None = None


@dataclass
class TokenAttribution:
    """Per-token shares of ``score`` = ``attr.scores(...)[query_index, train_index]`` (SIGN_CONVENTION).

    ``train.shares.sum()`` and ``query.shares.sum()`` equal ``score`` up to float rounding.
    """

    query_index: int
    train_index: int
    score: float
    train: TokenShares
    query: TokenShares


@dataclass
class _Kept:
    """A kept example: its row in a (filtered) source batch, target positions in that row, display data."""

    row: int
    targets: Tensor  # [T] int64 positions in the padded row
    tokens: TokenShares
    loss: float | None = None
    token_loss_sum: float = 0.0


def _pair_list(pairs: Any) -> list[tuple[int, int]] | None:
    """(query index, train index) pairs, first occurrences in order; None = every kept combination."""
    if pairs is None:
        return None
    if isinstance(pairs, TopKScores):
        raw = [(q, int(k)) for q in range(pairs.positive_index.shape[0])
               for side in (pairs.positive_index, pairs.negative_index) for k in side[q].tolist()
               if 0 <= int(k) < pairs.n_train]
    elif isinstance(pairs, Mapping):
        raw = [(int(q), int(k)) for q, ks in pairs.items() for k in ks]
    else:
        if isinstance(pairs, Tensor):
            if pairs.dim() != 2 or pairs.shape[1] != 2:
                raise ValueError(f"pairs: expected a [P, 2] tensor of (query, train) indices, got {tuple(pairs.shape)}")
            pairs = pairs.tolist()
        raw = []
        for p in pairs:
            if len(p) != 2:
                raise ValueError(f"pairs: expected (query index, train index) pairs, got {p!r}")
            raw.append((int(p[0]), int(p[1])))
    return list(dict.fromkeys(raw))


def _targets(labels: Tensor, mask: Tensor | None) -> Tensor:
    """[B, L] bool: the positions whose label the causal-LM loss predicts (shifted; predicted from an
    attended position, and attended itself: a pad left in the labels is no target, as in ``causal_lm_loss``)."""
    tgt = torch.zeros_like(labels, dtype=torch.bool)
    tgt[:, 1:] = labels[:, 1:] != -100
    if mask is not None:
        m = mask.to(labels.device) != 0
        tgt[:, 1:] &= m[:, :-1] & m[:, 1:]
    return tgt


def _rows(batch: Mapping[str, Any], rows: Tensor, n: int) -> dict[str, Any]:
    """``batch`` restricted to ``rows`` (every tensor with the batch axis first; other values as they are)."""
    return {k: v[rows.to(v.device)] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n else v
            for k, v in batch.items()}


class TokenScoring:
    """Per-token attribution, a mixin of :class:`~hyperinf_ext.attributor.hyperinf.HyperINF`.

    Uses the attributor's ``model``, ``layers``, ``loss_fn``, ``config``, ``fdtype``, ``_require_fit``,
    ``_precondition`` (the scoring path of ``scores``), ``_score_options``/``_curvature``/``_moments`` (the
    mixed curvature of ``mix_queries``), ``query_gradients``, ``_timed`` and ``_bar``.
    """

    def token_scores(self, queries: Iterable | Mapping[str, Any], train: Iterable | Mapping[str, Any], *,
                     pairs: Any = None, side: str = "both", train_loader: Iterable | None = None,
                     batch_size: int = 16, mix_queries: float = 0.0,
                     mix_with: Iterable | QueryGradients | None = None) -> list[TokenAttribution]:
        """Per-token shares of the scores of the given (query, training example) pairs.

        Args:
            queries: the query batches (a loader, an iterable of batches, or one batch), each with its
                ``index`` ([B] int64, the query's row in ``attr.scores``) and token ``labels`` [B, T].
            train: batches holding the kept training examples with their training ``index``; rows not
                named by ``pairs`` are dropped before any forward pass, so the whole training loader may
                be passed and only the kept examples are run.
            pairs: which (query, train) pairs: None = every query with every training example given;
                a ``TopKScores`` (``attr.scores(q, top_k=K)``: each query with its K most positive and K
                most negative examples); a mapping {query index: training indices}; or (q, k) pairs.
            side: "train" (shares over the training example's labelled tokens), "query" (over the query's)
                or "both".
            train_loader: as in ``scores``: the training data for methods whose preconditioning re-reads
                the training gradients (datainf, lissa) when the fit cached none.
            batch_size: rows (example copies) per forward pass.
            mix_queries, mix_with: split the scores of ``scores(..., mix_queries=w)`` over the query set
                ``mix_with`` (a loader or ``query_gradients(...)``: the whole query set whose GFIM was mixed
                in, of which ``queries`` may hold only the kept rows); required together.

        Returns:
            One :class:`TokenAttribution` per pair, in the order of ``pairs`` (repeats dropped), or ordered
            by (query, train index) when ``pairs`` is None; shares in the factor dtype, on the CPU.

        Raises:
            ValueError: labels not token-shaped (a classifier), an example without a labelled token
                (naming its index), a pair whose example was not given, a loss that is not the mean of
                its token losses, an unknown ``side``.
        """
        self._require_fit()
        if side not in SIDES:
            raise ValueError(f"side: expected one of {SIDES}, got {side!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a whole number ≥ 1, got {batch_size!r}")
        wanted = _pair_list(pairs)
        want_q = None if wanted is None else {q for q, _ in wanted}
        want_k = None if wanted is None else {k for _, k in wanted}
        names = [l.name for l in self.layers]
        weight, _ = self._score_options(mix_queries, False)
        if bool(weight) != (mix_with is not None):
            raise ValueError("mix_with: give it with mix_queries > 0 (the query set whose GFIM is mixed in) and "
                             f"only then; got mix_queries={mix_queries!r} and mix_with "
                             f"{'None' if mix_with is None else 'given'}")
        curvature = (self._curvature(weight, self._moments(weight, self.query_gradients(mix_with, "mixed query "
                                                                                        "gradients").grads))
                     if weight else (None, None))

        # 1. the kept queries: full-row gradients → preconditioned once, as in scores
        q_batches: list[tuple[dict, dict[int, _Kept]]] = []
        q_index: list[int] = []
        q_kept: dict[int, _Kept] = {}
        q_grads: list[dict[str, Tensor]] = []
        for batch, kept in self._kept_batches(queries, want_q, "query"):
            q_batches.append((batch, kept))
            for idx, ex in kept.items():
                if idx in q_kept:
                    raise ValueError(f"query: index {idx} given twice")
                q_kept[idx] = ex
            for jobs, grads in self._job_grads(batch, kept, [(i, -1) for i in kept], batch_size, "query"):
                q_index += [i for i, _ in jobs]
                q_grads.append(grads)
        self._check_given(want_q, q_kept, "query")
        pairs_of_k = self._pairs_by_train(wanted, list(q_kept))
        qt = self._precondition({n: torch.cat([g[n] for g in q_grads]) for n in names}, train_loader, *curvature)
        qflat = self._flat(qt, names)  # [Q, P]
        q_row = {i: r for r, i in enumerate(q_index)}

        # 2. the kept training examples: full rows (score, g_k) and, for the train side, per-token rows
        scores: dict[tuple[int, int], float] = {}
        train_shares: dict[tuple[int, int], Tensor] = {}
        t_kept: dict[int, _Kept] = {}
        g_full: dict[int, Tensor] = {}
        for batch, kept in self._kept_batches(train, want_k, "train"):
            for idx in kept:
                if idx in t_kept:
                    raise ValueError(f"train: index {idx} given twice")
            t_kept.update(kept)
            jobs = [(i, -1) for i in kept]
            if side != "query":
                jobs += [(i, t) for i, ex in kept.items() for t in range(ex.targets.numel())]
            for chunk, grads in self._job_grads(batch, kept, jobs, batch_size, "train"):
                g = self._flat(grads, names)
                for (k, t), gk in zip(chunk, g):
                    qs = pairs_of_k(k)
                    if not qs:
                        continue
                    with self._timed("dot"):
                        vals = -(qflat[[q_row[q] for q in qs]].to(gk.device) @ gk).cpu()
                    for q, v in zip(qs, vals):
                        if t < 0:
                            scores[(q, k)] = float(v)
                        else:
                            train_shares.setdefault((q, k), torch.zeros(kept[k].targets.numel(),
                                                                        dtype=self.fdtype))[t] = v
                    if t < 0 and side != "train":
                        g_full[k] = gk.clone()  # not a view: the chunk's [c, P] block is freed
            self._check_token_losses(kept, "train", side != "query")
        self._check_given(want_k, t_kept, "train")

        # 3. the query side: per-token query rows, preconditioned chunk by chunk, dotted with g_k
        query_shares: dict[tuple[int, int], Tensor] = {}
        if side != "train":
            ks_of_q: dict[int, list[int]] = {}
            for q, k in (wanted if wanted is not None else [(q, k) for k in t_kept for q in q_kept]):
                ks_of_q.setdefault(q, []).append(k)
            for batch, kept in q_batches:
                jobs = [(i, t) for i, ex in kept.items() for t in range(ex.targets.numel())]
                for chunk, grads in self._job_grads(batch, kept, jobs, batch_size, "query"):
                    pre = self._flat(self._precondition(grads, train_loader, *curvature), names)  # [c, P]
                    for (q, t), qs in zip(chunk, pre):
                        ks = ks_of_q.get(q, [])
                        if not ks:
                            continue
                        with self._timed("dot"):
                            vals = -(torch.stack([g_full[k] for k in ks]) @ qs.to(g_full[ks[0]].device)).cpu()
                        for k, v in zip(ks, vals):
                            query_shares.setdefault((q, k), torch.zeros(kept[q].targets.numel(),
                                                                        dtype=self.fdtype))[t] = v
                self._check_token_losses(kept, "query", True)

        order = wanted if wanted is not None else sorted((q, k) for q in q_kept for k in t_kept)
        return [TokenAttribution(q, k, scores[(q, k)],
                                 replace(t_kept[k].tokens, shares=train_shares.get((q, k))),
                                 replace(q_kept[q].tokens, shares=query_shares.get((q, k))))
                for q, k in order]

    # ------------------------------------------------------------------------------------ helpers

    def _flat(self, grads: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
        """{layer: [n, r, d]} → [n, P] in the factor dtype (layers in ``names`` order)."""
        n = next(iter(grads.values())).shape[0]
        return torch.cat([grads[name].reshape(n, -1).to(self.fdtype) for name in names], dim=1)

    @staticmethod
    def _check_given(want: set[int] | None, kept: dict[int, _Kept], what: str) -> None:
        missing = sorted(want - set(kept)) if want is not None else []
        if missing:
            raise ValueError(f"pairs: {what} examples {missing[:10]} (index) were not in the {what} batches given")
        if not kept:
            raise ValueError(f"{what}: no examples given")

    @staticmethod
    def _pairs_by_train(wanted: list[tuple[int, int]] | None, queries: list[int]):
        """train index → the query indices paired with it (every query when ``wanted`` is None)."""
        if wanted is None:
            return lambda k: queries
        by: dict[int, list[int]] = {}
        for q, k in wanted:
            by.setdefault(k, []).append(q)
        return lambda k: by.get(k, [])

    def _kept_batches(self, source: Iterable | Mapping[str, Any], want: set[int] | None,
                      what: str) -> Iterator[tuple[dict, dict[int, _Kept]]]:
        """The batches of ``source`` restricted to the wanted rows, with each kept example's targets.

        Checked before any forward pass: token-shaped labels (else a causal-LM ValueError) and at least
        one labelled token per kept example (else a ValueError naming its index)."""
        batches = [source] if isinstance(source, Mapping) else source
        offset = 0
        for b, batch in enumerate(self._bar(batches, f"{what} tokens")):
            n = _batch_size(batch)
            index = _batch_index(batch, n, offset, f"{what}: batch {b}")
            offset += n
            labels = batch.get("labels")
            ids = batch.get("input_ids")
            embeds = batch.get("inputs_embeds")
            shape = tuple(ids.shape) if ids is not None else tuple(embeds.shape[:2]) if embeds is not None else None
            if not isinstance(labels, Tensor) or labels.dim() != 2 or tuple(labels.shape) != shape:
                got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
                raise ValueError(f"{what}: batch {b}: {CAUSAL_ONLY}; got labels {got} for inputs {shape}")
            keep = [r for r, i in enumerate(index.tolist()) if want is None or i in want]
            if not keep:
                continue
            rows = torch.tensor(keep, dtype=torch.long)
            sub = _rows(batch, rows, n)
            lab, mask = sub["labels"].cpu(), sub.get("attention_mask")
            mask = None if mask is None else mask.cpu()
            tgt = _targets(lab, mask)
            kept: dict[int, _Kept] = {}
            for r, idx in enumerate(index[rows].tolist()):
                if idx in kept:
                    raise ValueError(f"{what}: batch {b}: index {idx} given twice")
                pos = tgt[r].nonzero().squeeze(1)
                if pos.numel() == 0:
                    raise ValueError(f"{what} example {idx} (index): no labelled token to predict (labels all −100 "
                                     "after the shift/padding), so it has no loss and no per-token shares")
                real = tgt[r] | (mask[r] != 0 if mask is not None else torch.ones_like(tgt[r]))
                seq = sub["input_ids"][r].cpu() if "input_ids" in sub else lab[r]
                kept[idx] = _Kept(r, pos, TokenShares(idx, seq[real], (real.cumsum(0) - 1)[pos], lab[r, pos]))
            yield sub, kept

    def _job_grads(self, batch: dict, kept: dict[int, _Kept], jobs: list[tuple[int, int]], batch_size: int,
                   what: str) -> Iterator[tuple[list[tuple[int, int]], dict[str, Tensor]]]:
        """Gradients of ``jobs`` (example index, token t or −1 for the whole example), ``batch_size`` rows a pass.

        Token t's row is the example's row with every label but its t-th target set to −100; its
        gradient is scaled by 1/T (the example's normalisation).  Yields (the chunk's jobs,
        {layer: [c, r, d]}); the hooks are removed before each yield, so the caller may run other
        gradient passes (e.g. a preconditioning that re-reads the training data) in between."""
        n = _batch_size(batch)
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            rows = torch.tensor([kept[i].row for i, _ in chunk], dtype=torch.long)
            sub = _rows(batch, rows, n)
            labels = sub["labels"].clone()
            scale = torch.ones(len(chunk), dtype=torch.float64)
            for c, (i, t) in enumerate(chunk):
                if t >= 0:
                    p = int(kept[i].targets[t])
                    value = labels[c, p].clone()
                    labels[c] = -100
                    labels[c, p] = value
                    scale[c] = 1.0 / kept[i].targets.numel()
            sub["labels"] = labels
            index = torch.tensor([i for i, _ in chunk], dtype=torch.long)
            with self._timed("token gradients"):
                with PerSampleGradients(self.model, self.layers, dtype=torch_dtype(self.config.grad_dtype)) as psg:
                    grads = _compute(psg, sub, self.loss_fn, index, what)
                    losses = psg.last_losses.detach().double().cpu()
                check_finite(losses, grads.values(), index, what, stacked=False)
                for c, (i, t) in enumerate(chunk):
                    if t < 0:
                        kept[i].loss = float(losses[c])
                    else:
                        kept[i].token_loss_sum += float(losses[c])
                grads = {name: g * scale.to(g.device, g.dtype).view(-1, 1, 1) for name, g in grads.items()}
            yield chunk, grads

    def _check_token_losses(self, kept: dict[int, _Kept], what: str, tokens_done: bool) -> None:
        """The mean of an example's token losses must be its loss: the loss is the mean token loss."""
        if not tokens_done:
            return
        dtype = torch_dtype(self.config.grad_dtype) or self.layers[0].module.weight.dtype
        rtol = torch.finfo(dtype).eps ** 0.5
        for idx, ex in kept.items():
            if ex.loss is None:
                continue
            mean = ex.token_loss_sum / ex.targets.numel()
            if abs(mean - ex.loss) > rtol * max(abs(ex.loss), abs(mean), 1e-30):
                raise ValueError(f"{what} example {idx} (index): its loss {ex.loss:.6g} is not the mean of its "
                                 f"{ex.targets.numel()} token losses ({mean:.6g}); {CAUSAL_ONLY} and the default "
                                 "mean-token loss (loss_fn)")
