"""Memory and time of a fit and its scores, known before the run: ``HyperINF.plan(train_loader, ...)``.

The plan reads the loader once without a model pass (example count, batches, padded tokens, the largest
batch), then runs the fit's own per-sample-gradient and GFIM code on a few batches — the largest one
among them — measuring their time and the memory they take above what the process held before (peak
RSS on the CPU, the CUDA allocator's peak on a GPU).  Everything else is counted from shapes:

* factors: per layer the d×d GFIM sum and the r×r rank sum in the factor dtype; the fit works on a
  stacked copy of them per group of equal (d, r), plus one d×d scratch per group in ``gfim_dtype``;
* the method's prepared state (hyperinf, exact, paper, eigen, kronecker: one d×d matrix per layer) and
  the batched inverse's workspace (five [L, d, d] tensors of the largest group: ``SCHULZ_WORKSPACE``);
* the gradient cache in memory: n_train × Σ_l r·d numbers in the gradient dtype (nothing with
  ``cache="disk"`` or ``"none"``, which read one batch at a time);
* the query gradients (Q × Σ r·d, gradient dtype) and their preconditioned copy (factor dtype), the
  dense score matrix Q × n_train (factor dtype) or, with ``top_k``, 2·Q·k values and indices.

Predicted peak = what the process holds at plan time (the model, the data) + the largest phase (fit,
prepare, scores), where memory freed by one phase stays with the process (the allocator keeps it for
later transients) and the fit carries an allocator slack of 0.15 × its largest batch (measured).  Times: the fit from the measured seconds per padded token times the loader's tokens;
the inverse from the CPU cost model (Cholesky, which ``solver="auto"`` never exceeds on a CPU); the dot
products from the cost model's GEMM rate; a second gradient pass when nothing was cached.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

__all__ = ["Plan", "PlanProbe", "format_bytes", "parse_bytes", "batch_shape"]

STATE_D2_METHODS = frozenset({"hyperinf", "exact", "paper", "eigen", "kronecker"})
"""Methods whose prepared state is one d×d matrix per layer (an inverse or an eigenbasis)."""
ALLOCATOR_SLACK = 0.15
"""Fraction of the largest batch's measured memory the fit adds on top of it (heap fragmentation as the
batches change shape).  Measured (bench/PLAN.md, first run): 0.3 on the embedded classifier (63 batches of
32), about 0 on the embedded LLM (38 batches of 8); 0.15 keeps both within 25% of their measured peaks."""
SCHULZ_WORKSPACE = 5
"""[L, d, d] tensors alive at once in the batched inverse: the damped GFIM, X, A·X and the update in the
Schulz loop (four); the symmetric check after it (solvers.schulz.symmetric_schulz) holds five: A, X, its
symmetric part, the residual and the Newton step's X·R."""


# ----------------------------------------------------------------------------------------- the plan

def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """"8G", "512M", "1.5GiB", "2000000000" → bytes (binary units: K = 1024).

    Raises:
        ValueError: naming the text.
    """
    t = str(text).strip().upper().replace("IB", "").replace("B", "")
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in "KMGT" and t else t
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"{text!r}: expected a size such as 8G, 512M or a number of bytes") from None
    if not value > 0:
        raise ValueError(f"{text!r}: a memory size must be > 0")
    return int(value)


@dataclass
class PlanProbe:
    """What the plan measured on a few batches."""

    batches: int
    """Batches run (the first, untimed, warms the kernels up; the largest batch is always among them)."""
    examples: int
    tokens: int
    seconds: float
    """Wall seconds of the timed batches (all but the warm-up; each batch's faster of two runs)."""
    timed_tokens: int
    seconds_per_token: float
    seconds_per_batch: float
    """Time = seconds_per_token × padded tokens + seconds_per_batch × batches, fitted to the timed batches
    (a batch's fixed cost: hooks, per-layer launches; 0 when the timed batches have one size)."""
    batch_bytes: int | None
    """Peak memory a batch takes above what the process held before (activations, per-sample gradients,
    the model's own gradients, allocator slack); None where it cannot be measured."""
    largest_batch: dict[str, int]


@dataclass
class Plan:
    """Predicted bytes and seconds of ``fit`` + scores (``HyperINF.plan``); all sizes in bytes."""

    n_train: int
    n_batches: int
    train_tokens: int
    """Padded tokens over the training loader (input_ids elements; examples when batches have none)."""
    layers: int
    gradient_numbers: int
    """Σ_l r·d: numbers in one example's gradient."""
    n_queries: int
    top_k: int | None
    mean: bool
    """The queries are averaged into one (``mean_scores``) rather than scored one by one."""
    cache: str
    method: str
    device: str
    baseline_bytes: int | None
    """What the process held when the plan was made (RSS, or CUDA allocated bytes on a GPU)."""
    components: dict[str, int]
    """Bytes of: factors, fit_copy, fit_scratch, method_state, inverse_workspace, gradient_cache, batch,
    allocator_slack, queries, preconditioned, scores, score_batch."""
    phases: dict[str, int]
    """Bytes above ``baseline_bytes`` at the peak of each phase: fit, prepare, scores."""
    seconds: dict[str, float]
    """Predicted seconds of: fit (gradients + GFIM), prepare (inverse), query_gradients, scores."""
    probe: PlanProbe
    factor_bytes: int
    """Bytes per number of the factor dtype (``dtype``)."""
    grad_bytes: int
    """Bytes per number of the captured gradients (``grad_dtype``, or the LoRA weights')."""
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak_bytes(self) -> int:
        """Predicted peak memory of the process: the baseline plus the largest phase."""
        return (self.baseline_bytes or 0) + self.phases[self.peak_phase]

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    def savings(self) -> dict[str, tuple[str, int]]:
        """Options that lower the peak, with the predicted peak after each alone: {name: (what, new peak)};
        an option that does not touch the peak's phase is left out.

        Names: ``cache_disk`` (cache="disk"), ``top_k`` (top_k=100 instead of dense scores),
        ``float32`` (dtype="float32": factors, inverses, preconditioned queries), ``half_batch`` (half the
        batch size: the measured batch memory scales about with the batch's tokens), ``grad_bfloat16``
        (grad_dtype="bfloat16": cache and query gradients at 2 bytes).
        """
        c = self.components
        fb = self.factor_bytes
        out: dict[str, tuple[str, int]] = {}

        def peak(**changed: int) -> int:
            return (self.baseline_bytes or 0) + max(phase_bytes({**c, **changed}).values())

        if c["gradient_cache"]:
            out["cache_disk"] = ("keep the training gradients on disk (cache='disk')", peak(gradient_cache=0))
        if self.top_k is None and not self.mean and self.n_queries and self.n_train > 200:
            k = 100
            out["top_k"] = (f"keep the top {k} per query instead of the dense {self.n_queries}×{self.n_train} matrix",
                            peak(scores=self.n_queries * 2 * k * (fb + 8)))
        if fb == 8:
            half = {k: c[k] // 2 for k in ("factors", "fit_copy", "method_state", "inverse_workspace",
                                            "preconditioned", "scores")}
            out["float32"] = ("float32 factors and inverses (dtype='float32')", peak(**half))
        if c["batch"] > 0:
            out["half_batch"] = ("half the batch size (or the max length)", peak(batch=c["batch"] // 2,
                                                                                 allocator_slack=c["allocator_slack"] // 2))
        if self.grad_bytes > 2:
            ratio = 2 / self.grad_bytes
            out["grad_bfloat16"] = ("gradients captured and cached in bfloat16 (grad_dtype='bfloat16')",
                                    peak(gradient_cache=int(c["gradient_cache"] * ratio),
                                         queries=int(c["queries"] * ratio)))
        return {k: v for k, v in out.items() if v[1] < self.peak_bytes}

    def advice(self, max_memory: int, names: Mapping[str, str] | None = None) -> list[str]:
        """The options (``names`` maps a saving's name to how the caller spells it) that bring the peak
        under ``max_memory``, alone or together; empty when it already fits."""
        if self.peak_bytes <= max_memory:
            return []
        names = dict(names or {})
        options = {k: v for k, v in self.savings().items() if names.get(k, k) is not None}
        spell = lambda k: names.get(k) or options[k][0]  # noqa: E731
        alone = [k for k, (_, p) in sorted(options.items(), key=lambda kv: kv[1][1]) if p <= max_memory]
        if alone:
            return [f"{spell(k)}: peak about {format_bytes(options[k][1])}" for k in alone]
        # together: apply every saving, in order of their effect
        lines = [f"{spell(k)} (alone: {format_bytes(p)})" for k, (_, p) in sorted(options.items(),
                                                                                  key=lambda kv: kv[1][1])]
        return lines + ["none of these alone is enough: combine them, or use fewer layers or examples"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(peak_bytes=self.peak_bytes, peak_phase=self.peak_phase, total_seconds=self.total_seconds)
        return d

    def _scores_kind(self) -> str:
        if not self.n_queries:
            return ""
        if self.mean:
            return ", their mean"
        return f", top {self.top_k}" if self.top_k else ", dense scores"

    def table(self) -> str:
        """The plan as lines of text (what ``--plan`` prints)."""
        c, p = self.components, self.probe
        base = "not measured" if self.baseline_bytes is None else format_bytes(self.baseline_bytes)
        rows = [
            f"plan: {self.n_train} training examples in {self.n_batches} batches ({self.train_tokens} padded tokens), "
            f"{self.layers} layers, {self.gradient_numbers} numbers per gradient; method {self.method}, "
            f"cache {self.cache}, {self.n_queries} queries"
            + self._scores_kind(),
            f"  held now (model, data): {base}",
            f"  factors {format_bytes(c['factors'])} (+ fit copy {format_bytes(c['fit_copy'])}, scratch "
            f"{format_bytes(c['fit_scratch'])}); inverses {format_bytes(c['method_state'])} (+ workspace "
            f"{format_bytes(c['inverse_workspace'])})",
            f"  gradient cache {format_bytes(c['gradient_cache'])}; one batch "
            + ("not measured" if p.batch_bytes is None else format_bytes(c["batch"]))
            + f" (largest: {p.largest_batch['examples']} examples, {p.largest_batch['tokens']} tokens)",
            f"  queries {format_bytes(c['queries'] + c['preconditioned'])}; scores {format_bytes(c['scores'])}",
            "  phases above the baseline: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in self.phases.items()),
            f"  predicted peak: {format_bytes(self.peak_bytes)} ({self.peak_phase})",
            "  predicted time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
            + f" = {self.total_seconds:.1f} s (measured {p.seconds_per_token * 1e3:.3f} ms per token on "
            f"{p.batches} batches)",
        ]
        return "\n".join(rows + [f"  note: {n}" for n in self.notes])


def phase_bytes(c: Mapping[str, int]) -> dict[str, int]:
    """Bytes above the baseline at the peak of each phase, from the components.

    Memory a phase frees is kept by the allocator (glibc's heap on the CPU, the caching allocator on a GPU)
    and serves later transients, but it does not shrink the process: the fit's peak stays, and each later
    phase adds what it keeps (the inverses, the queries, the scores) plus the part of its transient that
    the freed batch memory cannot hold.  Measured: RSS after a fit stays within 5% of its peak
    (bench/PLAN.md)."""
    fit = c["factors"] + c["fit_copy"] + c["fit_scratch"] + c["gradient_cache"] + c["batch"] + c["allocator_slack"]
    kept = fit + c["method_state"]
    return {
        "fit": fit,
        "prepare": kept + max(0, c["inverse_workspace"] - c["batch"]),
        "scores": kept + c["queries"] + c["preconditioned"] + c["scores"] + max(0, c["score_batch"] - c["batch"]),
    }


def batch_shape(batch: Mapping[str, Any]) -> tuple[int, int]:
    """(examples, padded tokens) of a batch; tokens = examples when it has no ``input_ids``."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        return int(ids.shape[0]), int(ids.numel())
    for v in (batch.values() if isinstance(batch, Mapping) else ()):
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return int(v.shape[0]), int(v.shape[0])
    raise ValueError("train_loader: a batch without tensors (expected a mapping of tensors)")
