"""The settings every task's pipeline shares (:class:`PipelineConfig`) and its stage log.

Checked once, cheaply, before anything slow is loaded (:meth:`PipelineConfig.validate`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ..models.family import is_causal
from ..models.llm import model_label

__all__ = ["DEFAULT_EPOCHS", "Log", "column_headings", "log_stage", "PipelineConfig", "check_query_options",
           "check_query_option_use", "read_columns"]

DEFAULT_EPOCHS = 3
EVAL_BATCH_SIZE = 32  # the evaluation pass has no backward: it may batch more than the influence passes
FIT_BATCH_SIZE = 32
CAUSAL_FIT_BATCH_SIZE = 8  # a causal LM's logits are [batch, tokens, vocabulary]: memory, not speed, limits it
CLASSIFIER_COLUMNS = ("text_column", "label_column")
INSTRUCTION_COLUMNS = ("prompt_column", "response_column")


def read_columns(causal: bool) -> tuple[str, str]:
    """The column options a model family reads: prompt/response for a causal LM or VLM, text/label for a
    classifier."""
    return INSTRUCTION_COLUMNS if causal else CLASSIFIER_COLUMNS


def column_headings(settings: dict[str, Any], causal: bool) -> tuple[str, str]:
    """How reports head an example's two texts: the user's own column names as ``settings`` give them
    (:func:`read_columns`), else the defaults."""
    return tuple(str(settings.get(k) or k.removesuffix("_column"))  # type: ignore[return-value]
                 for k in read_columns(causal))

Log = Callable[[str], None] | None


def log_stage(log: Log, message: str) -> None:
    """Send ``message`` to ``log`` when there is one."""
    if log is not None:
        log(message)


@dataclass
class PipelineConfig:
    """Settings shared by the data → fine-tune → fit pipeline of every task."""

    data: Path | None = None
    """CSV/JSONL file with text and label columns (prompt/response or messages for a causal LM);
    None = the embedded Rotten Tomatoes data (as sentiment instructions for a causal LM)."""
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    n_train: int = 2000
    n_val: int = 300
    flip_rate: float = 0.0
    """Fraction of training labels flipped (seeded), in [0, 1)."""
    model: Path | str | None = None
    """Base model folder, "smollm2" (the embedded causal LM) or "minilm"/None (the embedded all-MiniLM-L6-v2)."""
    adapter: Path | None = None
    """A saved PEFT adapter to start from instead of a fresh LoRA."""
    rank: int = 8
    alpha: int = 16
    epochs: int | None = None
    """Fine-tuning epochs; None = 3 for a fresh LoRA, 0 when an adapter is given."""
    lr: float = 3e-4
    batch_size: int = 16
    max_length: int = 64
    fit_batch_size: int | None = None
    """Batch size of the influence passes (fit and validation gradients); None = 32, or 8 for a causal LM
    (its passes hold [batch, tokens, vocabulary] logits: ~10 GB at 32 × 128 tokens on SmolLM2)."""
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    out: Path = Path("hyperinf-out")
    top_k: int | None = None
    """Also write topk.safetensors: per validation example the K most positive and most negative."""
    plan: bool = False
    """Make the run's plan (predicted peak memory and time, module ``planning``) and stop before training."""
    max_memory: int | None = None
    """Bytes: refuse to start a run whose plan predicts a higher peak (None = no limit, no plan)."""
    mix_queries: float | None = 0.0
    """Weight w of the query (target) set's GFIM mixed into the curvature before it is inverted
    (``HyperINF.scores(mix_queries=w)``, TrackStar's idea; 0 = the training set's alone; None = the
    command's default, :meth:`default_mix_queries`)."""
    normalize: str | bool | None = None
    """Unit-normalised gradients, "unit", "query" or "symmetric" (``HyperINF.scores(normalize=...)``: cosine
    influence); False = raw scores; None = the command's default, :meth:`default_normalize` (raw here)."""

    reads_own_file: ClassVar[bool] = False
    """Whether the command reads a file of its own (the user commands' training file) instead of ``data``."""

    def unused_columns(self) -> tuple[str, ...]:
        """The column options this run does not read: all four on the embedded data; otherwise the other
        family's (a causal LM or VLM reads prompt/response, a classifier text/label)."""
        if self.data is None and not self.reads_own_file:
            return CLASSIFIER_COLUMNS + INSTRUCTION_COLUMNS
        return read_columns(not is_causal(self))

    def default_mix_queries(self, method: str) -> float:
        """The mixing weight when ``mix_queries`` is None (not given): 0 here; ``audit`` overrides it."""
        return 0.0

    def default_normalize(self, method: str) -> str | None:
        """The normalisation when ``normalize`` is None (not given): none here; ``audit`` overrides it."""
        return None

    def resolved_normalize(self, method: str | None = None) -> str | None:
        """The normalisation the scores use with ``method`` (default: the config's own ``method``); None = raw."""
        if self.normalize is not None:
            return self.normalize or None
        return self.default_normalize(method or getattr(self, "method", "hyperinf"))

    def mix_weight(self, method: str | None = None) -> float:
        """The mixing weight the scores use with ``method`` (default: the config's own ``method``)."""
        if self.mix_queries is not None:
            return float(self.mix_queries)
        return self.default_mix_queries(method or getattr(self, "method", "hyperinf"))

    def score_options(self, method: str | None = None, *, index: bool = False) -> dict[str, Any]:
        """``mix_queries``/``normalize`` as ``HyperINF.scores`` and ``mean_scores`` take them (``method``: the
        one that scores, when it is not the config's, e.g. an index's).  ``index``: the options ``Index``'s
        scoring takes — mixing only (it stores no gradient norms; validate refused ``--normalize`` with one)."""
        options = {"mix_queries": self.mix_weight(method), "normalize": self.resolved_normalize(method) or False}
        if index:
            del options["normalize"]
        return options

    def score_options_note(self, method: str | None = None) -> str:
        """"" or what ``mix_queries``/``normalize`` change in the scores, for the printed and written signal text."""
        parts = []
        weight = self.mix_weight(method)
        if weight:
            how = "--mix-queries" if self.mix_queries is not None else "the default of --mix-queries"
            parts.append(f"the query set's curvature mixed in with weight {weight:g} ({how})")
        mode = self.resolved_normalize(method)
        if mode:
            how = "--normalize" if self.normalize else "the default of --normalize"
            parts.append(f"gradients unit-normalised ({mode}): a cosine, not a change of loss ({how})")
        return "; scored with " + " and ".join(parts) if parts else ""

    @property
    def resolved_epochs(self) -> int:
        if self.epochs is not None:
            return int(self.epochs)
        return 0 if self.adapter is not None else DEFAULT_EPOCHS

    def validate(self) -> None:
        """Cheap checks run before anything slow is loaded; raises ValueError with one-line messages."""
        if self.n_train < 1:
            raise ValueError(f"--n-train must be >= 1, got {self.n_train}")
        if self.n_val < 1:
            raise ValueError(f"--n-val must be >= 1, got {self.n_val}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if not (isinstance(self.flip_rate, (int, float)) and 0.0 <= self.flip_rate < 1.0):
            raise ValueError(f"--flip-rate must be in [0, 1), got {self.flip_rate}")
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"--rank must be >= 1 and --alpha > 0, got rank={self.rank}, alpha={self.alpha}")
        if self.epochs is not None and self.epochs < 0:
            raise ValueError(f"--epochs must be >= 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.fit_batch_size is not None and self.fit_batch_size < 1:
            raise ValueError(f"--fit-batch-size must be >= 1, got {self.fit_batch_size}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError(f"--max-memory must be > 0, got {self.max_memory}")
        if self.max_length < 2:
            raise ValueError(f"--max-length must be >= 2, got {self.max_length}")
        check_query_options(0.0 if self.mix_queries is None else self.mix_queries, self.normalize)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available on this machine")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def settings(self) -> dict[str, Any]:
        """JSON-ready settings, with the resolved epochs and default paths filled in."""
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out["epochs"] = self.resolved_epochs
        out["data"] = str(self.data) if self.data is not None else "rotten_tomatoes (embedded)"
        out["model"] = model_label(self.model)
        for unused in self.unused_columns():
            del out[unused]
        return out


def damping_used(method: str, damping: Any) -> str:
    """The damping ``method`` scores at, as shown in reports: ``"auto"`` resolved to the method's own default
    (``METHOD_DEFAULTS``, e.g. ``"spectral:1"``); a method without a curvature keeps ``"auto"``."""
    from ...curvature.methods import METHOD_DEFAULTS, damping_label

    if damping == "auto" and method in METHOD_DEFAULTS:
        rule, scale = METHOD_DEFAULTS[method]
        return f"{rule}:{scale:g}"
    return damping_label(damping)


def config_damping(config: Any) -> str:
    """The damping an attributor's config (an index's) scores at, as :func:`damping_used` shows it: its rule
    with its ``damping_scale`` (``"spectral:3"``), ``"auto"`` resolved to the method's default."""
    from ...curvature.methods import METHOD_DEFAULTS, damping_label, resolve

    if config.method not in METHOD_DEFAULTS:
        return damping_label(config.damping)
    rule, scale = resolve(config.method, config.damping, config.damping_scale)
    return damping_label(rule) if isinstance(rule, float) else f"{rule}:{scale:g}"


def used_settings(cfg: "PipelineConfig", method: str, damping: str, options: dict[str, Any]) -> dict[str, Any]:
    """``cfg.settings()`` with what the scores used in place of the arguments that defer to a default: the
    method (an index's), its damping (``damping_used``), the mixing weight and the normalisation
    (``options`` as ``score_options`` gives them; "none" = raw).  The run's summary and reports show these;
    the checkpoint identity keeps the arguments (``cfg.settings()``)."""
    out = cfg.settings()
    out.update(method=method, damping=damping, mix_queries=float(options.get("mix_queries") or 0.0),
               normalize=options.get("normalize") or "none")
    return out


def check_query_options(mix_queries: object, normalize: object) -> None:
    """The library's own checks of ``mix_queries``/``normalize``, their messages naming the options."""
    from ...curvature import mixing, normalize as unit

    for option, check, value in (("--mix-queries", mixing.check_weight, mix_queries),
                                 ("--normalize", unit.check_mode, normalize)):
        try:
            check(value)
        except ValueError as exc:
            raise ValueError(f"{option}: {str(exc).split(': ', 1)[-1]}") from None


def check_query_option_use(cfg: "PipelineConfig", *, queries: bool, per_token: bool = False,
                           index: bool = False) -> None:
    """Where an explicitly given ``mix_queries``/``normalize`` cannot apply, a one-line ValueError naming the
    option: ``normalize`` with an index (its stored training gradients are compressed: their norms are not
    kept) or with per-token shares (they split the raw score); mixing with a method that
    cannot mix; mixing or the symmetric cosine without a query set (self-influence would be 1 for every
    example).  Mixing itself works with an index and with per-token shares (the query side is exact)."""
    if cfg.normalize and (index or per_token):
        raise ValueError(f"--normalize: not with {'--index' if index else '--per-token'} ("
                         + ("an index stores compressed training gradients, not their norms"
                            if index else "token shares split the raw score") + ")")
    if not cfg.mix_queries and not cfg.normalize:
        return
    method = getattr(cfg, "method", None)
    if cfg.mix_queries and method is not None:
        from ...curvature import mixing
        from ...curvature.methods import METHODS

        if method in METHODS:
            try:
                mixing.check_method(METHODS[method])
            except ValueError as exc:
                raise ValueError(f"--mix-queries: {str(exc).split(': ', 1)[-1]}") from None
    if not queries and cfg.mix_queries:
        raise ValueError("--mix-queries: needs --target and an influence signal (self-influence has no query set "
                         "to mix in)")
    if not queries and cfg.normalize == "symmetric":
        raise ValueError("--normalize symmetric: needs --target (it makes every self-influence 1)")
