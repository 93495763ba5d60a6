"""bergson (EleutherAI, 2.5.1) as a peer of the LDS study on the embedded causal LM (bench/lds.py, issue #25).

Given the trained PEFT causal LM of a seed (the same full-data SmolLM2 + LoRA that hyperinf and Kronfluence
score) and the pipeline's encodings of the training and query (validation) examples, :func:`bergson_score_sets`
runs bergson's own pipelines and yields our-sign scores [Q, n_train] (positive = up-weighting the training
example raises the query loss) under three labels:

* ``"bergson TrackStar"`` — ``bergson.cli.trackstar.trackstar`` (``bergson trackstar``) with its defaults
  (TrackstarIndexConfig: per-module double-sided random projection to 16, loss = the SUMMED token
  cross-entropy of the example's labelled tokens, ``token_batch_size`` 2048; the autocorrelation Hessian
  (the Gram of the projected per-example gradients) of the training set, and of the query set, mixed
  by §A.1.3 of Chang et al. (2024) with ``target_downweight_components=1000``; inverse
  ``damped_inverse`` 1/(λ + 0.1·mean λ)) plus ``unit_normalize=True``: bergson then applies
  H^-1/2 to both sides and unit-normalises them, the cosine in the H⁻¹ metric that defines TrackStar
  (Chang et al., 2024, Eq. 2).  bergson's CLI leaves ``--unit_normalize`` off by default; without it the
  score is the plain g_qᵀH⁻¹g_k, which is not TrackStar's.
* ``"bergson TrackStar, no mixing"`` — the same with ``mix_hessians=False`` (the training set's Hessian
  alone; bergson's option for query sets too small for a Hessian of their own).  It reuses the first
  run's training-set Hessian through bergson's ``resume`` (the step is skipped when its output exists).
* ``"bergson EK-FAC"`` — ``bergson.hessians.pipeline.hessian_pipeline`` (``bergson ekfac``) with
  ``HessianConfig(method="kfac", ev_correction=True)``: K-FAC factors and eigenvalue corrections of the
  training set with targets sampled from the model (true Fisher, bergson's default), no projection, one
  score column per query (aggregation "none"), inverse ``damped_inverse`` with damping factor 0.1 (per
  module 1/(λ + 0.1·mean λ), the same heuristic as Kronfluence's and our "spectral 0.1").  Its loss is
  the MEAN token cross-entropy over the example's labelled tokens (``loss_reduction="mean"``, bergson's
  Hessian then is that of the mean loss): the loss our influence, Kronfluence's and the LDS use.

Sign: bergson's scores are "higher is better" (positive = a proponent, lowering the query loss);
``bergson.data.load_scores_loss_signed`` turns them into its loss-signed convention (negative = reduces the
query loss), which is ours; the scores are read through it.

What bergson needs on disk (a temporary ``workdir``): the adapter (``model.save_pretrained``; the base model
is the folder the PEFT config names, so for the embedded SmolLM2 the cached float32 folder, loaded once per
bergson step) with the tokenizer beside it, and the examples as JSON lines of ``input_ids``, ``labels``
(−100 on the prompt tokens, as our loss) and ``length``: bergson keeps pre-tokenized columns as they are.
The data goes through JSON (bergson's ``load_dataset("json")``) rather than an in-memory ``datasets.Dataset``
because a ``--target`` install of ``datasets`` (not under a ``site-packages`` folder) makes dill pickle
pyarrow by value when it fingerprints an in-memory table, which fails (``PicklingError: Can't pickle
<class 'MonthDayNano'>``); the JSON files are read into an Arrow cache under ``workdir``.

Install beside torch 2.13 (see ../shared/FACTS.md) into a folder of its own and put it on PYTHONPATH:

    pip install --no-deps --target /tmp/bgsite bergson==2.5.1 torchopt==0.7.3
    pip install --no-deps --target /tmp/bgsite datasets==5.2.0 simple-parsing==0.1.9 jaxtyping==0.3.11 \\
        ml_dtypes==0.7.0 natsort==8.4.0 petname==2.9 optree==0.20.0 graphviz==0.21 dill==0.4.1 \\
        docstring_parser==0.18.0 multiprocess==0.70.19 pyarrow==26.0.1 wadler_lindig==0.1.8 pandas==3.1.1 \\
        xxhash==4.1.0

bergson's metadata asks for torchvision, torchaudio and bitsandbytes; the paths used here do not import them.
Importing bergson reconfigures the root logger (``logging.basicConfig(force=True)``, INFO to stdout):
:func:`import_bergson` puts the caller's logging back.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

TRACKSTAR = "bergson TrackStar"
TRACKSTAR_NO_MIX = "bergson TrackStar, no mixing"
EKFAC = "bergson EK-FAC"
LABELS = [TRACKSTAR, TRACKSTAR_NO_MIX, EKFAC]
DAMPING_RULE = "bergson damped_inverse"  # 1/(λ + factor·mean λ) per module (bergson InversionConfig)
DEFAULT_DAMPING = 0.1  # bergson 2.5.1's InversionConfig.damping_factor


def have_bergson() -> bool:
    """Whether ``bergson`` can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("bergson") is not None


def import_bergson() -> Any:
    """``import bergson`` with the caller's root logger kept as it was (bergson's import forces its own)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import bergson
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return bergson


def _precision(model: Any) -> str:
    import torch

    dtype = next(model.parameters()).dtype
    names = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype not in names:
        raise ValueError(f"bergson: no precision for a {dtype} model")
    return names[dtype]


def _max_tokens(model: Any, tokenizer: Any) -> int:
    """bergson's token budget per batch: its default 2048, or the model's context when shorter (bergson refuses
    a budget above ``min(tokenizer.model_max_length, max_position_embeddings)``)."""
    limit = 2048
    for v in (getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)):
        if isinstance(v, int) and v > 0:
            limit = min(limit, v)
    return limit


def write_examples(path: Path, encodings: Sequence[dict]) -> str:
    """JSON lines of ``input_ids``, ``labels`` (token labels, −100 = no target) and ``length``, one per example
    in order (bergson's score row k = line k)."""
    with path.open("w") as fh:
        for e in encodings:
            if "labels" not in e or len(e["labels"]) != len(e["input_ids"]):
                raise ValueError("bergson: every encoding needs token 'labels' as long as its 'input_ids'")
            fh.write(json.dumps({"input_ids": [int(t) for t in e["input_ids"]],
                                 "labels": [int(t) for t in e["labels"]], "length": len(e["input_ids"])}) + "\n")
    return str(path)


def save_adapter(model: Any, tokenizer: Any, folder: Path) -> str:
    """The PEFT adapter and the tokenizer in ``folder``; bergson loads the base model the adapter config names."""
    adapter = next(iter(model.peft_config))
    base = model.peft_config[adapter].base_model_name_or_path
    if not base or not Path(base).is_dir():
        raise ValueError(f"bergson: the adapter's base model {base!r} is not a local folder bergson could load")
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@contextlib.contextmanager
def _datasets_cache(folder: Path):
    """Point the ``datasets`` cache (the Arrow files of the JSON data) at ``folder`` while bergson runs."""
    import datasets.config as dcfg

    kept = dcfg.HF_DATASETS_CACHE
    dcfg.HF_DATASETS_CACHE = folder
    try:
        yield
    finally:
        dcfg.HF_DATASETS_CACHE = kept


@contextlib.contextmanager
def _quiet(log: Path, enabled: bool):
    """bergson's prints and progress bars into ``log`` (its tail is shown when a step fails)."""
    if not enabled:
        yield
        return
    with log.open("a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _loss_signed(scores_dir: Path, n_train: int, n_query: int) -> np.ndarray:
    """Our-sign [Q, n_train] float64 from a bergson score directory."""
    from bergson.data import load_scores, load_scores_loss_signed

    if not load_scores(Path(scores_dir)).is_written():
        raise RuntimeError(f"bergson left scores unwritten in {scores_dir}")
    s, _ = load_scores_loss_signed(str(scores_dir))  # [n_train, Q], negative = lowers the query loss
    s = np.asarray(s.double().numpy() if hasattr(s, "numpy") else s, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    if s.shape != (n_train, n_query):
        raise RuntimeError(f"bergson scores of shape {s.shape}, expected ({n_train}, {n_query})")
    return s.T.copy()


def bergson_score_sets(model: Any, tokenizer: Any, train_encodings: Sequence[dict], query_encodings: Sequence[dict],
                       workdir: str | Path, labels: Sequence[str] = tuple(LABELS), *,
                       damping: float = DEFAULT_DAMPING, projection_dim: int = 16, quiet: bool = True,
                       seed: int = 0) -> Iterator[tuple[str, np.ndarray | None, dict[str, Any]]]:
    """Yield (label, our-sign scores [n_query, n_train] float64, extra fields) for each of ``labels`` (in
    :data:`LABELS` order); scores None with ``extra["error"]`` when bergson failed on it.

    ``damping``: bergson's ``InversionConfig.damping_factor`` (default 0.1, bergson's); ``projection_dim``:
    TrackStar's per-module projection (default 16, bergson's ``TrackstarIndexConfig``).  ``model`` is only
    read (its adapter is saved to ``workdir``); ``seed`` seeds bergson's sampled EK-FAC targets inside a
    forked random state."""
    import torch

    unknown = [l for l in labels if l not in LABELS]
    if unknown:
        raise ValueError(f"bergson_score_sets: unknown labels {unknown} (known: {LABELS})")
    import_bergson()
    from bergson.cli.trackstar import trackstar
    from bergson.config.config import (DataConfig, DistributedConfig, HessianConfig, HessianPipelineConfig,
                                       IndexConfig, InversionConfig, PreprocessConfig, QuerySetConfig, ScoreConfig,
                                       TrackstarConfig, TrackstarIndexConfig)
    from bergson.hessians.pipeline import hessian_pipeline

    w = Path(workdir)
    w.mkdir(parents=True, exist_ok=True)
    log = w / "bergson.log"
    n_train, n_query = len(train_encodings), len(query_encodings)
    adapter = save_adapter(model, tokenizer, w / "adapter")
    train_file = write_examples(w / "train.jsonl", train_encodings)
    query_file = write_examples(w / "query.jsonl", query_encodings)
    # one process (bergson would start one per visible GPU), the model's own precision
    common = dict(model=adapter, precision=_precision(model), token_batch_size=_max_tokens(model, tokenizer),
                  distributed=DistributedConfig(nnode=1, nproc_per_node=1))
    inversion = InversionConfig(damping_factor=float(damping))
    base = {"damping": [DAMPING_RULE, float(damping)], "bergson": import_bergson().__version__}

    def trackstar_run(name: str, mix: bool, reuse: Path | None) -> tuple[Path, dict]:
        run = w / name
        resume = reuse is not None and (reuse / "value_hessian").is_dir()
        if resume:  # the training set's Hessian of the run before (same settings): bergson's resume skips it
            run.mkdir()
            shutil.copytree(reuse / "value_hessian", run / "value_hessian")
        icfg = TrackstarIndexConfig(run_path=str(run), data=DataConfig(dataset=train_file),
                                    projection_dim=int(projection_dim), **common)
        tcfg = TrackstarConfig(query=QuerySetConfig(dataset=query_file, aggregation="none"),
                               preprocess_cfg=PreprocessConfig(unit_normalize=True, inversion_cfg=inversion),
                               mix_hessians=mix, resume=resume)
        trackstar(icfg, tcfg)
        extra = {"projection_dim": int(projection_dim), "unit_normalize": True, "mix_hessians": mix}
        if mix:
            from bergson.gradients import GradientProcessor
            from bergson.utils.math import compute_lambda

            q = GradientProcessor.load(run / "query_hessian", map_location="cpu")
            v = GradientProcessor.load(run / "value_hessian", map_location="cpu")
            extra["mixing_coefficient"] = float(compute_lambda(q.hessians_eigen, v.hessians_eigen,
                                                               tcfg.target_downweight_components))
        return run / "scores", extra

    def ekfac_run() -> tuple[Path, dict]:
        run = w / "ekfac"
        icfg = IndexConfig(run_path=str(run), data=DataConfig(dataset=train_file), projection_dim=0,
                           loss_reduction="mean", **common)
        hessian_pipeline(icfg, HessianConfig(method="kfac", ev_correction=True), ScoreConfig(), PreprocessConfig(),
                         HessianPipelineConfig(query=QuerySetConfig(dataset=query_file, aggregation="none"),
                                               inversion_cfg=inversion))
        return run / "scores", {"hessian": "kfac + eigenvalue correction", "loss_reduction": "mean"}

    steps = {TRACKSTAR: lambda: trackstar_run("trackstar", True, None),
             TRACKSTAR_NO_MIX: lambda: trackstar_run("trackstar_nomix", False, w / "trackstar"),
             EKFAC: ekfac_run}
    for label in (l for l in LABELS if l in labels):
        extra = {**base, "method": label}
        t0 = time.perf_counter()
        try:
            # each run in a random state of its own (bergson's EK-FAC samples its targets), and the datasets
            # cache pointed into workdir only while bergson runs: nothing stays changed across a yield
            with _datasets_cache(w / "hf_datasets"), torch.random.fork_rng(devices=[]), _quiet(log, quiet):
                torch.manual_seed(int(seed))
                scores_dir, more = steps[label]()
            scores = _loss_signed(scores_dir, n_train, n_query)
            if not np.isfinite(scores).all():
                raise ArithmeticError("scores are not finite")
        except Exception as exc:  # a peer that fails is recorded as failed; the others go on
            if quiet:
                print(f"[bergson] {label} failed; the end of its log:\n{_tail(log)}", file=sys.stderr, flush=True)
            yield label, None, {**extra, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            continue
        yield label, scores, {**extra, **more, "seconds": time.perf_counter() - t0}
