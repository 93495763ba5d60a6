"""Kronfluence EK-FAC at several dampings for bench/lds.py (issue #25: peers tuned as much as ours).

The same path as bench/quality_ekfac.py's ``ekfac_pairwise_scores`` (same tracked modules, task, loaders,
true-Fisher factors seeded with 0, sign flipped to ours), with the factors fitted ONCE and the pairwise
scores computed once per damping.  Damping: Kronfluence's heuristic ``damping_factor=None`` adds
``HEURISTIC_DAMPING_SCALE × mean eigenvalue`` per module (0.1 in Kronfluence 1.0.1), i.e. our "spectral"
rule with scale 0.1; a scale s of the grid sets that constant to s while its scores are computed
(``kronfluence.factor.config`` reads it when it prepares each module's factors, which every
``compute_pairwise_scores`` call does afresh from the saved factors).  Scale 0.1 leaves Kronfluence as
it is, so it is exactly the "kronfluence EK-FAC" score set recorded before.

The embedded causal LM (``bench.lds --model smollm2``, issue #25): :func:`ekfac_causal_pairwise_grid` runs the
same Kronfluence path with a causal-LM task (:func:`make_causal_task`):

* Tracked modules: the same rule as the classifier (bench/quality_ekfac.py ``tracked_module_names``: the
  Linear modules our attributor captures), which on a PEFT causal LM are the ``lora_A`` / ``lora_B`` Linear of
  the ``default`` adapter on every q_proj and v_proj (no head: a causal LM's LoRA has no modules_to_save).
  Padding is masked out of the covariances (Task.get_attention_mask).
* Loss of one example: the mean next-token cross-entropy over its labelled tokens (labels != -100, after
  the shift; the prompt is -100), exactly ``hyperinf_ext.capture.losses.causal_from_logits`` — the loss
  our influence and the LDS measure.  Training loss: the sum of these over the batch (Kronfluence's
  contract).  Measurement: the same loss, summed over the query batch; pairwise scores are per query.
* True-Fisher factors (``sample=True``, Kronfluence's default): each labelled position's target is drawn
  from the model's softmax and example k's sampled loss is Σ_t CE_t / sqrt(n_k) (n_k labelled tokens), so
  E[∇∇ᵀ] = (1/n_k)·Σ_t (per-token Fisher) = the Fisher (GGN) of the MEAN-token loss above (the mean, 1/n_k,
  would give 1/n_k² and shrink the curvature of short answers; bergson's EK-FAC uses the same 1/sqrt(n)).
* Batches: the cached encodings of the pipeline (prompt + response, labels −100 on the prompt), padded
  by hyperinf_ext.app.data.Collator; train and query share one collate function (one cache, the query
  rows after the training rows).
"""
from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

import torch


def ekfac_pairwise_grid(model, tok, train, val, workdir: str, scales: Sequence[float], max_length: int = 64
                        ) -> Iterator[tuple[float, torch.Tensor, float]]:
    """Yield (scale, our-sign EK-FAC influence [n_val, n_train] float64, seconds) per damping scale; the
    seconds are the factor fit's plus that scale's scoring.  ``model`` is wrapped and frozen in place."""
    import kronfluence.factor.config as factor_config
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from bench.quality_ekfac import make_task, tracked_module_names
    from hyperinf_ext.app.data import Collator, make_loader

    if not hasattr(factor_config, "HEURISTIC_DAMPING_SCALE"):
        raise RuntimeError("this Kronfluence has no kronfluence.factor.config.HEURISTIC_DAMPING_SCALE (1.0.1 has)")
    t0 = time.perf_counter()
    torch.manual_seed(0)  # the true-Fisher factors sample labels from the model: make them reproducible
    names = tracked_module_names(model)
    task = make_task(names)
    model = prepare_model(model, task)
    analyzer = Analyzer("lds", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=workdir)
    train_loader = make_loader(train, tok, batch_size=32, max_length=max_length)
    val_loader = make_loader(val, tok, batch_size=32, max_length=max_length)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=Collator(tok, max_length=max_length)))
    analyzer.fit_all_factors("ekfac", dataset=train_loader.dataset, per_device_batch_size=32,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    fit_seconds = time.perf_counter() - t0
    yield from _score_grid(analyzer, val_loader.dataset, train_loader.dataset, len(val), len(train), scales,
                           fit_seconds, train_batch_size=32)


def _score_grid(analyzer: Any, query_dataset: Any, train_dataset: Any, n_query: int, n_train: int,
                scales: Sequence[float], fit_seconds: float, train_batch_size: int,
                query_batch_size: int | None = None) -> Iterator[tuple[float, torch.Tensor, float]]:
    """Pairwise scores from the fitted "ekfac" factors once per damping scale (see the module docstring),
    our sign, [n_query, n_train] float64.  ``query_batch_size`` (default: every query in one batch): the
    query gradients are computed that many at a time and accumulated (Kronfluence's
    query_gradient_accumulation_steps), so the training set is still passed over once per scale."""
    import kronfluence.factor.config as factor_config
    from kronfluence.arguments import ScoreArguments

    q_batch = n_query if query_batch_size is None else max(1, min(int(query_batch_size), n_query))
    accumulate = -(-n_query // q_batch)
    kept = factor_config.HEURISTIC_DAMPING_SCALE
    for i, scale in enumerate(scales):
        t1 = time.perf_counter()
        factor_config.HEURISTIC_DAMPING_SCALE = float(scale)
        try:
            analyzer.compute_pairwise_scores(
                f"pairwise_{i}", factors_name="ekfac", query_dataset=query_dataset,
                train_dataset=train_dataset, per_device_query_batch_size=q_batch,
                per_device_train_batch_size=train_batch_size,
                score_args=ScoreArguments(damping_factor=None, query_gradient_accumulation_steps=accumulate),
                overwrite_output_dir=True)
        finally:
            factor_config.HEURISTIC_DAMPING_SCALE = kept
        pairwise = analyzer.load_pairwise_scores(f"pairwise_{i}")["all_modules"]
        if tuple(pairwise.shape) != (n_query, n_train):
            raise RuntimeError(f"pairwise scores of shape {tuple(pairwise.shape)}")
        # Kronfluence: positive = helpful (lowers the query loss); ours: positive = raises it
        yield float(scale), -pairwise.double(), fit_seconds + time.perf_counter() - t1


# ------------------------------------------------------------------------------ the causal LM


def sampled_causal_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """[B] sampled-target losses for the true Fisher of the mean-token loss: at every position the mean loss
    scores (labels != -100 after the shift, and not predicted from padding) the target is drawn from the
    model's softmax; example k's loss is Σ_t CE_t / sqrt(n_k) (see the module docstring)."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1]
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()  # as the loss our influence uses (capture.losses._upcast)
    shift_labels = labels[:, 1:].to(logits.device)
    if attention_mask is not None:
        shift_labels = shift_labels.masked_fill(attention_mask[:, :-1].to(logits.device) == 0, -100)
    mask = shift_labels != -100
    with torch.no_grad():  # drawn only where the loss has a target (a few answer tokens per example)
        targets = torch.full_like(shift_labels, -100)
        if bool(mask.any()):
            targets[mask] = torch.multinomial(F.softmax(shift_logits.detach()[mask], dim=-1), 1).squeeze(-1)
    tok = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                          reduction="none").view(targets.shape)
    count = mask.sum(dim=1).clamp(min=1).to(tok.dtype)
    return tok.sum(dim=1) / count.sqrt()


def make_causal_task(names: list[str]):
    """Kronfluence Task of a PEFT causal LM: the mean-token loss over labelled tokens (see the module docstring)."""
    from kronfluence.task import Task

    from hyperinf_ext.capture.losses import causal_from_logits, model_inputs

    class LoraCausalLMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(**model_inputs(batch)).logits
            if sample:
                return sampled_causal_loss(logits, batch["labels"], batch.get("attention_mask")).sum()
            return causal_from_logits(logits, batch["labels"], batch.get("attention_mask")).sum()

        def compute_measurement(self, batch, model):
            logits = model(**model_inputs(batch)).logits
            return causal_from_logits(logits, batch["labels"], batch.get("attention_mask")).sum()

        def get_influence_tracked_modules(self):
            return list(names)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LoraCausalLMTask()


class _Rows(torch.utils.data.Dataset):
    """``(text, label, index)`` items (as hyperinf_ext.app.data.make_loader's) over rows ``offset..offset+n−1`` of
    one shared encoding cache; the text and label are unused (the cache has both)."""

    def __init__(self, n: int, offset: int = 0):
        self.n, self.offset = int(n), int(offset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[str, int, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return "", 0, self.offset + int(i)


def ekfac_causal_pairwise_grid(model, tok, train_encodings: Sequence[dict], query_encodings: Sequence[dict],
                               workdir: str, scales: Sequence[float], max_length: int = 128, batch_size: int = 8
                               ) -> Iterator[tuple[float, torch.Tensor, float]]:
    """Yield (scale, our-sign EK-FAC influence [n_query, n_train] float64, seconds) per damping scale of
    Kronfluence EK-FAC on a PEFT causal LM (one factor fit for the grid); the seconds are the factor fit's
    plus that scale's scoring.  ``train_encodings`` / ``query_encodings``: per example the dicts of
    ``input_ids``, ``attention_mask`` and token ``labels`` (−100 on the prompt) that
    hyperinf_ext.app.data.instruction.encode_instructions makes.  ``model`` is wrapped and frozen in place
    (Kronfluence's prepare_model): anything else that needs the model runs before."""
    import kronfluence.factor.config as factor_config
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from bench.quality_ekfac import tracked_module_names
    from hyperinf_ext.app.data import Collator

    if not hasattr(factor_config, "HEURISTIC_DAMPING_SCALE"):
        raise RuntimeError("this Kronfluence has no kronfluence.factor.config.HEURISTIC_DAMPING_SCALE (1.0.1 has)")
    if not train_encodings or not query_encodings:
        raise ValueError("ekfac_causal_pairwise_grid: no training or no query example")
    if any("labels" not in e for e in list(train_encodings) + list(query_encodings)):
        raise ValueError("ekfac_causal_pairwise_grid: the encodings need token 'labels' (instruction data)")
    t0 = time.perf_counter()
    names = tracked_module_names(model)
    task = make_causal_task(names)
    model = prepare_model(model, task)
    analyzer = Analyzer("lds_llm", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=workdir)
    n_train, n_query = len(train_encodings), len(query_encodings)
    cache = list(train_encodings) + list(query_encodings)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=Collator(tok, max_length=max_length, cache=cache)))
    train_ds, query_ds = _Rows(n_train), _Rows(n_query, offset=n_train)
    # the true-Fisher factors sample targets from the model: make them reproducible, and leave the caller's
    # random stream as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        analyzer.fit_all_factors("ekfac", dataset=train_ds, per_device_batch_size=batch_size,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    fit_seconds = time.perf_counter() - t0
    # a causal LM's logits are [batch, tokens, vocabulary]: the queries go through in batches of ``batch_size``
    yield from _score_grid(analyzer, query_ds, train_ds, n_query, n_train, scales, fit_seconds,
                           train_batch_size=batch_size, query_batch_size=batch_size)
