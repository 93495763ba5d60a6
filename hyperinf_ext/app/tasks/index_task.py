"""``index build`` and ``index query``: fit once on the user's training file, answer many query files.

``index build``: read the training file (as ``attribute`` does) → the LoRA model (``--adapter``, or
fine-tuned with ``--epochs N``) → ``Index.build`` (one pass: the HyperINF fit and the compressed
gradient store, checkpointed and resumable) → ``IDX/source.json`` (how to read the data and load the
model again: model, adapter copy in ``IDX/adapter``, columns, label names, the training file's path and
SHA-256).  ``index query``: the model from the index, the query file's gradients, preconditioned and
scored against the store → ``attribution.jsonl``, ``report.md``, ``summary.json`` (the format of
``attribute``); ``--exact-rerank M`` recomputes the exact scores of the best M candidates from the
training file (which must still hash the same); ``--per-token`` re-runs the kept pairs from that file,
token by token, and splits their exact scores over both sides' tokens.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ... import persistence
from ...curvature.methods import Damping, parse_dampings, parse_methods, split_damping
from ..data.dataset import TextDataset
from ..data.dataset import DataError
from ..data.files import load_text_file
from .attribute import attribution_records, write_attribution_outputs
from .output import prepare_output_dir
from .planning import plan_gate
from .per_token import attribute_token_records, check_per_token, shares_note
from .pipeline_config import check_query_options, config_damping, damping_used, read_columns
from .pipeline import (Log, PipelineConfig, PreparedData, build_loaders, is_causal, load_model, log_stage, model_dir,
                       train_model)

__all__ = ["IndexBuildConfig", "IndexQueryConfig", "READ_SETTINGS", "run_index_build", "run_index_query", "SOURCE"]

SOURCE = "source.json"
READ_SETTINGS = ("text_column", "label_column", "prompt_column", "response_column", "max_length", "model", "rank",
                 "alpha", "fit_batch_size")
"""How the index read its training file and loaded its model (``IDX/source.json``): a run reads the same way."""


@dataclass
class IndexBuildConfig(PipelineConfig):
    """Settings of ``index build`` (``data``, ``n_train``, ``n_val``, ``flip_rate`` are unused)."""

    reads_own_file: ClassVar[bool] = True

    train: Path | None = None
    """Training file: prompt/response (or messages) for a causal LM, text/label for a classifier."""
    proj_dim: int = 1024
    """Numbers kept per LoRA layer and example (0 = exact gradients); see ``IndexConfig.proj_dim``."""
    store_dtype: str = "auto"
    method: str = "hyperinf"
    damping: Damping = "auto"
    out: Path = Path("hyperinf-out/index")

    @property
    def resolved_epochs(self) -> int:
        return 0 if self.epochs is None else int(self.epochs)

    def validate(self) -> None:
        super().validate()
        if self.train is None or not Path(self.train).is_file():
            raise ValueError(f"--train {self.train}: file not found" if self.train else "--train: a file is required")
        from ...index import IndexConfig

        IndexConfig(proj_dim=self.proj_dim, store_dtype=self.store_dtype)  # its ValueErrors name the setting
        self.method = parse_methods([self.method], what="method")[0]
        self.damping = parse_dampings([self.damping])[0]


@dataclass
class IndexQueryConfig:
    """Settings of ``index query``."""

    index: Path
    query: Path
    top_k: int = 10
    exact_rerank: int = 0
    device: str = "cpu"
    progress: bool = True
    verify: bool = True
    estimator: str = "regression"
    per_token: bool = False
    """Causal LMs: split each kept pair's score over both sides' tokens (the kept pairs re-run exactly)."""
    mix_queries: float = 0.0
    """The query set's GFIM mixed into the curvature with this weight (``Index.query(mix_queries=...)``)."""
    out: Path = Path("hyperinf-out/index-query")

    def validate(self) -> None:
        if not Path(self.query).is_file():
            raise ValueError(f"--query {self.query}: file not found")
        if not (Path(self.index) / SOURCE).is_file():
            raise ValueError(f"{self.index}: not an index built by `hyperinf-ext index build` ({SOURCE} missing)")
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        check_query_options(self.mix_queries, None)
        if self.exact_rerank and self.exact_rerank < self.top_k:
            raise ValueError(f"--exact-rerank {self.exact_rerank}: re-ranking a top {self.top_k} needs at least "
                             f"{self.top_k} candidates")
        if self.per_token:  # before the model is loaded: a classifier index has no tokens to split over
            source = persistence.read_json(Path(self.index) / SOURCE, "index source")
            check_per_token(bool(source["causal"]), source["model"])


def read_examples(path: Path, cfg: PipelineConfig, causal: bool, label_names: list[str] | None = None,
                  min_classes: int = 2) -> TextDataset:
    """The rows of ``path`` as ``attribute`` reads them; a classifier's labels mapped onto ``label_names``
    (the training file's classes: a label outside them is an error naming the file)."""
    from .pipeline import load_instruction

    if causal:
        return load_instruction(path, cfg)
    ds = load_text_file(path, cfg.text_column, cfg.label_column, min_classes=min_classes)
    if label_names is None or ds.label_names == label_names:
        return ds
    names = [ds.label_names[y] for y in ds.labels]
    unknown = sorted(set(names) - set(label_names))
    if unknown:
        raise DataError(f"{path}: label(s) {unknown[:5]} are not among the indexed training labels {label_names[:10]}")
    to_id = {n: i for i, n in enumerate(label_names)}
    return TextDataset(ds.texts, [to_id[n] for n in names], list(label_names), rows=ds.rows, notes=ds.notes)


def _source(cfg: IndexBuildConfig, train: TextDataset, causal: bool) -> dict[str, Any]:
    return {"train": str(Path(cfg.train).resolve()), "train_sha256": persistence.file_sha256(Path(cfg.train)),
            "causal": causal, "label_names": list(train.label_names), "n_train": len(train),
            "rows": train.rows, **{k: (str(getattr(cfg, k)) if isinstance(getattr(cfg, k), Path) else getattr(cfg, k))
                                   for k in READ_SETTINGS}}


def run_index_build(cfg: IndexBuildConfig, log: Log = None) -> dict[str, Any]:
    """Build (or resume building) the index of ``cfg.train`` in ``cfg.out``; returns the summary."""
    from ...index import Index, IndexConfig
    from ..models.training import load_tokenizer

    t_start = time.perf_counter()
    cfg.validate()
    out = persistence.kinds.prepare_dir(cfg.out, persistence.kinds.INDEX, "--out", noun="folder")
    folder = model_dir(cfg, log)
    causal = is_causal(cfg)
    train = read_examples(Path(cfg.train), cfg, causal)
    source = _source(cfg, train, causal)
    if (out / SOURCE).exists():  # resuming: the same file and settings, or a clear refusal
        before = persistence.read_json(out / SOURCE, "index source")
        changed = sorted(k for k in source if k != "train" and before.get(k) != json.loads(json.dumps(source[k])))
        if changed:
            raise ValueError(f"--out {out}: holds an index (or an interrupted build) of other data or settings "
                             f"({changed[0]} differs); choose another --out")
    log_stage(log, f"data: {len(train)} training examples")
    for note in train.notes:
        log_stage(log, f"data: {note}")
    data = PreparedData(train, train.subset(range(min(len(train), 1))), list(train.labels),
                        np.zeros(len(train), dtype=bool), str(cfg.train), len(train), causal)
    loaders = build_loaders(cfg, data, load_tokenizer(folder))
    model = load_model(cfg, max(train.num_classes, 2))
    # the index's shards stream to disk as the fit's cache would: plan it as a disk cache
    plan_gate(cfg, model, loaders, command="index build", epochs=cfg.resolved_epochs, finetune=loaders.finetune,
              n_queries=0, mean=False, cache="disk", log=log)
    trained = train_model(cfg, model, loaders.finetune, loaders.evaluation,
                          log=log, what="fine-tune" if cfg.resolved_epochs else "model")
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:  # every rank trained the same adapter from the same seed
        keep_adapter(trained.model, out / "adapter")
        persistence.write_bytes_atomic(out / SOURCE, json.dumps(source, indent=1).encode())
    if distributed:
        dist.barrier()
    rule, scale = split_damping(cfg.damping)
    config = IndexConfig(proj_dim=cfg.proj_dim, store_dtype=cfg.store_dtype, seed=cfg.seed)
    log_stage(log, f"index: fit and store the {len(train)} training gradients (proj_dim {cfg.proj_dim})")
    t0 = time.perf_counter()
    idx = Index.build(trained.model, loaders.influence_train, out, config=config,
                      train_fingerprint=source["train_sha256"], progress=cfg.progress, method=cfg.method,
                      damping=rule, **({} if scale is None else {"damping_scale": scale}))
    build_seconds = time.perf_counter() - t0
    summary = {"task": "index build", "index": str(out), "n_train": idx.n_train, "proj_dim": cfg.proj_dim,
               "store_dtype": idx.config.dtype, "bytes": idx.nbytes, "bytes_per_example": idx.bytes_per_example,
               "float32_gradient_bytes_per_example": 4 * sum(p.rank * p.dim for p in idx.plans),
               "method": cfg.method, "damping": damping_used(cfg.method, cfg.damping), "build_seconds": build_seconds,
               "total_seconds": time.perf_counter() - t_start}
    return summary


def keep_adapter(model: Any, adapter_dir: Path) -> None:
    """``IDX/adapter``: the adapter the index is fitted on, written whole (a temporary folder, then renamed).
    On a resumed build it must hold ``model``'s adapter weights: ``ValueError`` otherwise (the factors and
    the stored rows would belong to another adapter than every later query loads)."""
    import shutil

    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    if adapter_dir.exists():
        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.is_file():
            raise ValueError(f"{adapter_dir}: holds no adapter_model.safetensors (a damaged interrupted build); "
                             "build into another folder")
        saved, mine = load_file(str(weights)), get_peft_model_state_dict(model)
        if saved.keys() != mine.keys() or any(not torch.equal(saved[k], mine[k].detach().to("cpu", saved[k].dtype))
                                              for k in saved):
            raise ValueError(f"{adapter_dir.parent}: an interrupted build of another adapter ({adapter_dir} holds "
                             "other weights than this run's); resume with the same --adapter and --epochs, or "
                             "build into another folder")
        return
    tmp = adapter_dir.with_name(f".{adapter_dir.name}-tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted save left
    model.save_pretrained(str(tmp))
    tmp.rename(adapter_dir)


def index_build_table(s: dict[str, Any]) -> str:
    ratio = s["float32_gradient_bytes_per_example"] / max(s["bytes_per_example"], 1)
    return "\n".join([
        f"index build: {s['n_train']} training examples in {s['index']} ({s['method']}, damping {s['damping']})",
        f"store: proj_dim {s['proj_dim']}, {s['store_dtype']}, {s['bytes_per_example']:.0f} bytes per example "
        f"({ratio:.1f}x smaller than float32 gradients), {s['bytes'] / 2**20:.1f} MiB",
        f"built in {s['build_seconds']:.1f} s",
    ])


def subset_loader(train: TextDataset, encodings: list[dict], tokenizer: Any, rows: list[int], batch_size: int,
                  max_length: int) -> Any:
    """Batches over the training examples ``rows`` (positions in ``train``), each carrying those positions
    as its ``index`` (what ``Index.query(exact_rerank=...)`` back-propagates)."""
    import torch

    from ..data.batching import make_loader

    loader = make_loader(train.subset(rows), tokenizer, batch_size=batch_size, sort_by_length=True,
                         max_length=max_length, encodings=[encodings[r] for r in rows])
    ids = torch.tensor(rows, dtype=torch.long)
    return ({**b, "index": ids[b["index"]]} for b in loader)


def check_index_train(index_dir: Path, train: Path) -> None:
    """``attribute --index IDX --train FILE``: FILE must be the file the index was built from."""
    source = persistence.read_json(Path(index_dir) / SOURCE, "index source") if (Path(index_dir) / SOURCE).is_file() \
        else None
    if source is None:
        raise ValueError(f"--index {index_dir}: not an index built by `hyperinf-ext index build` ({SOURCE} missing)")
    if not Path(train).is_file() or persistence.file_sha256(Path(train)) != source["train_sha256"]:
        raise ValueError(f"--train {train}: not the file the index {index_dir} was built from ({source['train']}, "
                         "by SHA-256); rebuild the index for this file or leave out --train")


def open_index(index_dir: Path, device: str, progress: bool, verify: bool, log: Log = None) -> tuple[Any, dict, Any]:
    """(the opened Index, its source.json, the tokenizer): the model rebuilt as the build loaded it."""
    from ...index import Index
    from ..models.training import load_tokenizer

    source = persistence.read_json(Path(index_dir) / SOURCE, "index source")
    cfg = _model_config(source, device, progress)
    folder = model_dir(cfg, log)
    model = load_model(cfg, max(len(source["label_names"]), 2), adapter=Path(index_dir) / "adapter")
    return Index.open(index_dir, model, progress=progress, verify=verify), source, load_tokenizer(folder)


def _model_config(source: dict, device: str, progress: bool) -> PipelineConfig:
    kw = {k: source[k] for k in READ_SETTINGS}
    if kw["model"] not in (None, "smollm2", "minilm"):
        kw["model"] = Path(kw["model"])
    return PipelineConfig(**kw, device=device, progress=progress)


def run_index_query(cfg: IndexQueryConfig, log: Log = None) -> dict[str, Any]:
    """Per query the top-k helpful and harmful training examples from the index; returns the summary."""
    t_start = time.perf_counter()
    cfg.validate()
    out = prepare_output_dir(cfg.out)
    idx, source, tokenizer = open_index(cfg.index, cfg.device, cfg.progress, cfg.verify, log)
    idx.estimator = cfg.estimator
    t_open = time.perf_counter() - t_start
    mcfg = _model_config(source, cfg.device, cfg.progress)
    causal = source["causal"]
    need_train = cfg.exact_rerank > 0 or cfg.per_token
    train_path = Path(source["train"])
    same = train_path.is_file() and persistence.file_sha256(train_path) == source["train_sha256"]
    if need_train and not same:
        option = "--exact-rerank" if cfg.exact_rerank > 0 else "--per-token"
        raise ValueError(f"{option}: the training file {train_path} is missing or changed since the index was "
                         "built (SHA-256 differs); re-running the kept examples needs the same rows")
    query = read_examples(Path(cfg.query), mcfg, causal, source["label_names"], min_classes=1)
    notes = list(query.notes)
    if same:  # the texts of the training rows named in the outputs (reading is cheap; no gradients)
        train = read_examples(train_path, mcfg, causal, source["label_names"])
    else:
        notes.append(f"training texts not shown: {train_path} is missing or changed since the index was built")
        n = source["n_train"]
        train = TextDataset([""] * n, [0] * n, list(source["label_names"]) or [""], rows=source["rows"])
    log_stage(log, f"data: {len(query)} query examples; index of {idx.n_train} training examples")
    data = PreparedData(train if need_train else query, query, [], np.zeros(0, dtype=bool), str(cfg.query),
                        len(query), causal)
    loaders = build_loaders(mcfg, data, tokenizer)
    subset = None
    if need_train:
        subset = lambda rows: subset_loader(train, loaders.train_encodings, tokenizer, rows,  # noqa: E731
                                            loaders.fit_batch, mcfg.max_length)
    t0 = time.perf_counter()
    kept = idx.query(loaders.influence_val, top_k=cfg.top_k, exact_rerank=cfg.exact_rerank,
                     train_subset=subset if cfg.exact_rerank > 0 else None, mix_queries=cfg.mix_queries)
    query_seconds = time.perf_counter() - t0
    tokens, token_seconds = None, 0.0
    if cfg.per_token:
        t0 = time.perf_counter()
        log_stage(log, f"per-token: shares of the kept pairs of {len(query)} queries (both sides, run exactly)")
        # only the kept rows of the training loader are run (token_scores drops the others before any forward)
        tokens = attribute_token_records(idx.attributor, loaders.influence_val, loaders.influence_train, kept,
                                         loaders.tokenizer, train, query, mix_queries=cfg.mix_queries)
        token_seconds = time.perf_counter() - t0
    records = attribution_records(train, query, kept, causal)
    paths = {"attribution": str(out / "attribution.jsonl"), "report": str(out / "report.md"),
             "html": str(out / "report.html"), "summary": str(out / "summary.json")}
    if tokens is not None:
        paths["tokens"] = str(out / "tokens.jsonl")
    summary = {
        "task": "index query", "index": str(cfg.index),
        # the query file was read with the index's columns
        "settings": {**{k: str(v) for k, v in vars(cfg).items()},
                     **{k: source[k] for k in read_columns(causal)}},
        "n_train": idx.n_train, "n_query": len(query), "causal_lm": causal, "notes": notes,
        "method": idx.attributor.config.method, "damping": config_damping(idx.attributor.config), "top_k": cfg.top_k,
        "exact_rerank": cfg.exact_rerank, "estimator": cfg.estimator, "proj_dim": idx.config.proj_dim,
        "scores": "exact (re-ranked)" if cfg.exact_rerank > 0 else "index approximation",
        "timings": {"open_seconds": t_open, "query_seconds": query_seconds,
                    **({"per_token_seconds": token_seconds} if tokens is not None else {})},
        "per_token": None if tokens is None else {
            "pairs": len(tokens), "sides": ["query", "train"],
            "check": shares_note(tokens) + (" The shares sum to the pair's exact score (token_score), which can "
                                            "differ from the index's approximate score (score)."
                                            if not cfg.exact_rerank and idx.config.proj_dim else "")},
        "outputs": paths,
    }
    write_attribution_outputs(out, summary, records, tokens, t_start)
    return summary


def index_query_table(s: dict[str, Any]) -> str:
    t = s["timings"]
    return "\n".join([
        f"index query: top {s['top_k']} helpful and harmful of {s['n_train']} indexed training examples for "
        f"{s['n_query']} queries ({s['scores']})",
        *(f"note: {n}" for n in s.get("notes", [])),
        f"open {t['open_seconds']:.1f} s, query {t['query_seconds']:.1f} s"
        + (f", per-token {t['per_token_seconds']:.1f} s" if "per_token_seconds" in t else ""),
        *([f"per-token: {s['per_token']['pairs']} pairs; {s['per_token']['check']}"] if s.get("per_token") else []),
        f"outputs: {', '.join(s['outputs'].values())}",
    ])
