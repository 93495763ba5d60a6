"""Kronfluence EK-FAC at several dampings for bench/lds.py (issue #25: peers tuned as much as ours).

The same path as bench/quality_ekfac.py's ``ekfac_pairwise_scores`` (same tracked modules, task, loaders,
true-Fisher factors seeded with 0, sign flipped to ours), with the factors fitted ONCE and the pairwise
scores computed once per damping.  Damping: Kronfluence's heuristic ``damping_factor=None`` adds
``HEURISTIC_DAMPING_SCALE × mean eigenvalue`` per module (0.1 in Kronfluence 1.0.1), i.e. our "spectral"
rule with scale 0.1; a scale s of the grid sets that constant to s while its scores are computed
(``kronfluence.factor.config`` reads it when it prepares each module's factors, which every
``compute_pairwise_scores`` call does afresh from the saved factors).  Scale 0.1 leaves Kronfluence as
it is, so it is exactly the "kronfluence EK-FAC" score set recorded before.
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch


def ekfac_pairwise_grid(model, tok, train, val, workdir: str, scales: Sequence[float], max_length: int = 64
                        ) -> Iterator[tuple[float, torch.Tensor, float]]:
    """Yield (scale, our-sign EK-FAC influence [n_val, n_train] float64, seconds) per damping scale; the
    seconds are the factor fit's plus that scale's scoring.  ``model`` is wrapped and frozen in place."""
    import kronfluence.factor.config as factor_config
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
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
    kept = factor_config.HEURISTIC_DAMPING_SCALE
    for i, scale in enumerate(scales):
        t1 = time.perf_counter()
        factor_config.HEURISTIC_DAMPING_SCALE = float(scale)
        try:
            analyzer.compute_pairwise_scores(
                f"pairwise_{i}", factors_name="ekfac", query_dataset=val_loader.dataset,
                train_dataset=train_loader.dataset, per_device_query_batch_size=len(val),
                per_device_train_batch_size=32, score_args=ScoreArguments(damping_factor=None),
                overwrite_output_dir=True)
        finally:
            factor_config.HEURISTIC_DAMPING_SCALE = kept
        pairwise = analyzer.load_pairwise_scores(f"pairwise_{i}")["all_modules"]
        if tuple(pairwise.shape) != (len(val), len(train)):
            raise RuntimeError(f"pairwise scores of shape {tuple(pairwise.shape)}")
        # Kronfluence: positive = helpful (lowers the query loss); ours: positive = raises it
        yield float(scale), -pairwise.double(), fit_seconds + time.perf_counter() - t1
