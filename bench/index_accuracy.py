"""How much a compressed gradient index gives up, against the exact scores of the same fitted model (issue #28).

Two settings, each the seed-0 setting of the LDS harness (bench/lds.py), so the index's scores can be put
through the same LDS as the exact ones (the subset models are already measured there):

* ``--model minilm``: the embedded classifier, 2,000 training examples, 200 queries, 5 epochs, 32 subsets.
* ``--model smollm2``: the embedded LLM, 300 instruction examples, 60 queries, 3 epochs, 12 subsets.

Per setting: the full-data model is fine-tuned as the harness does (same seed and recipe), HyperINF is fitted
exactly (default method and damping) and scores every query against every training example; then an index
is built at each ``--proj-dims`` value (0 = exact float32 store) and its scores are compared: mean per-query
Spearman with the exact row, recall of the exact top-10 (both sides) in the index's top-10 and top-100, the
same recall after ``exact_rerank=100``, LDS without and with re-ranking (the re-ranked candidates' scores made
exact), self-influence Spearman, bytes per example, build and query time.  ``--detect``: the same on a
training set with 20% flipped labels (classifier: 1,000 examples; LLM: 300), reporting the mislabeled
ROC-AUC of the validation signal (mean_scores) and of self-influence.

    python -m bench.index_accuracy --model minilm            # ~15 min on 2 cores
    python -m bench.index_accuracy --model smollm2           # ~15 min
    python -m bench.index_accuracy --model minilm --detect
    python -m bench.index_report                              # bench/INDEX.md from bench/index_runs.jsonl

Records: one JSON line per (setting, proj_dim) in bench/index_runs.jsonl; a rerun skips what is recorded.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.records import append as append_record, load as load_records

HERE = Path(__file__).resolve().parent
RUNS = HERE / "index_runs.jsonl"
RERANK = 100


def recall(exact: np.ndarray, approx: np.ndarray, k: int, depth: int) -> float:
    """Mean over queries and both sides of |exact top-k ∩ approx top-depth| / k."""
    hits = []
    for sign in (1.0, -1.0):
        e = np.argsort(-sign * exact, axis=1, kind="stable")[:, :k]
        a = np.argsort(-sign * approx, axis=1, kind="stable")[:, :depth]
        hits += [len(set(e[q]) & set(a[q])) / k for q in range(exact.shape[0])]
    return float(np.mean(hits))


def rerank_recall(exact: np.ndarray, top: Any, k: int) -> float:
    hits = []
    for sign, idx in ((1.0, top.positive_index.numpy()), (-1.0, top.negative_index.numpy())):
        e = np.argsort(-sign * exact, axis=1, kind="stable")[:, :k]
        hits += [len(set(e[q]) & set(idx[q, :k])) / k for q in range(exact.shape[0])]
    return float(np.mean(hits))


def rerank_union(exact: np.ndarray, approx: np.ndarray, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What ``Index.query(top_k=k, exact_rerank=m)`` returns, from the exact matrix: the union over queries and
    sides of each query's best m candidates, re-ranked by the exact scores → (positive [Q, k], negative [Q, k])."""
    cand = np.unique(np.concatenate([np.argsort(-approx, axis=1, kind="stable")[:, :m],
                                     np.argsort(approx, axis=1, kind="stable")[:, :m]], axis=1))
    sub = exact[:, cand]
    return (cand[np.argsort(-sub, axis=1, kind="stable")[:, :k]], cand[np.argsort(sub, axis=1, kind="stable")[:, :k]])


class _Top:
    def __init__(self, pos: np.ndarray, neg: np.ndarray):
        import torch

        self.positive_index, self.negative_index = torch.from_numpy(pos), torch.from_numpy(neg)


def hybrid(exact: np.ndarray, approx: np.ndarray, m: int) -> np.ndarray:
    """The index's scores with each query's best m candidates per side replaced by exact ones (re-ranking)."""
    out = approx.copy()
    for sign in (1.0, -1.0):
        cand = np.argsort(-sign * approx, axis=1, kind="stable")[:, :m]
        rows = np.arange(approx.shape[0])[:, None]
        out[rows, cand] = exact[rows, cand]
    return out


def mean_spearman(a: np.ndarray, b: np.ndarray) -> float:
    from hyperinf_ext.app.tasks.metrics import spearman

    return float(np.mean([spearman(a[q], b[q]) for q in range(a.shape[0])]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.index_accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    p.add_argument("--proj-dims", default="0,4096,1024,256")
    p.add_argument("--estimators", default="regression,unbiased", help="query-side estimators to measure")
    p.add_argument("--detect", action="store_true", help="flipped labels: mislabeled AUC instead of LDS")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from bench.lds import SIZES, LdsConfig, PipelineExperiment, matrices, subset_members, subset_table
    from hyperinf_ext import HyperINF
    from hyperinf_ext.app.tasks.index_task import subset_loader
    from hyperinf_ext.app.tasks.metrics import found_at, lds, roc_auc, spearman
    from hyperinf_ext.index import Index, IndexConfig

    llm = args.model == "smollm2"
    sizes = SIZES[args.model]
    cfg = LdsConfig(seed=0, n_train=sizes["n_train"], n_val=sizes["n_val"], epochs=sizes["epochs"],
                    max_length=sizes["max_length"], model="smollm2" if llm else None)
    setting = {"model": args.model, "kind": "detect" if args.detect else "lds", "lds_config": json.loads(cfg.key())}
    if args.detect and not llm:
        cfg = replace(cfg, n_train=1000)
    # records before the estimator option existed measured the unbiased one; an exact index has no estimator
    done = {(r["proj_dim"], "exact" if r["proj_dim"] == 0 else r.get("estimator", "unbiased"))
            for r in load_records(RUNS) if r["setting"] == setting}
    wanted = [(k, "exact" if k == 0 else e) for k in map(int, args.proj_dims.split(","))
              for e in (args.estimators.split(",") if k else ["exact"])]
    todo = [k for k in dict.fromkeys(k for k, _ in wanted) if any(w not in done for w in wanted if w[0] == k)]
    if not todo:
        print("[index] nothing to do: every proj_dim is recorded")
        return 0
    exp = PipelineExperiment(cfg, ekfac=False)
    if args.detect:
        from hyperinf_ext.app.tasks.pipeline import build_loaders, prepare_data
        from hyperinf_ext.app.models.training import load_tokenizer
        from hyperinf_ext.app.tasks.pipeline import model_dir

        exp.pcfg = replace(exp.pcfg, flip_rate=0.2)
        exp.data = prepare_data(exp.pcfg, causal=llm)
        exp.loaders = build_loaders(exp.pcfg, exp.data, load_tokenizer(model_dir(exp.pcfg)))
    t0 = time.perf_counter()
    # the full model is kept (its adapter) so that later runs of the same setting skip the fine-tune
    saved = Path("/tmp/hyperinf-index-bench-models") / ("%s-%s" % (args.model, setting["kind"]))
    if (saved / "adapter_config.json").exists():
        from hyperinf_ext.app.tasks.pipeline import load_model, train_model

        model = load_model(exp.pcfg, exp.data.num_labels, adapter=saved)
        trained = train_model(exp.pcfg, model, exp.loaders.finetune, exp.loaders.evaluation, epochs=0)
    else:
        trained = exp.train(None)
        trained.model.save_pretrained(str(saved))
    print(f"[index] {args.model}: full model in {time.perf_counter() - t0:.0f} s, val acc {trained.val['accuracy']:.3f}",
          flush=True)
    model, loaders = trained.model, exp.loaders
    t0 = time.perf_counter()
    attr = HyperINF(model, progress=False).fit(loaders.influence_train)
    fit_seconds = time.perf_counter() - t0
    exact = attr.scores(loaders.influence_val).double().numpy()
    exact_self = attr.self_scores().double().numpy()
    exact_mean = attr.mean_scores(loaders.influence_val).double().numpy()
    attr.cache.close()
    measured = None
    if not args.detect:
        lds_records = load_records(HERE / ("lds_llm_runs.jsonl" if llm else "lds_runs.jsonl"))
        subs = subset_table(lds_records, json.loads(cfg.key()))  # retrain 0: the models the LDS is reported on
        M = max(j for j in subs if all(i in subs for i in range(j + 1))) + 1
        members = [subset_members(cfg.n_train, cfg.fraction, cfg.seed, j) for j in range(M)]
        measured = np.asarray([subs[j] for j in range(M)])

        def lds_of(S: np.ndarray) -> float:
            return lds(np.stack([S[:, m].sum(axis=1) for m in members]), measured)
    flipped = exp.data.flipped
    base = {"setting": setting, "n_train": cfg.n_train, "n_query": exact.shape[0], "fit_seconds": fit_seconds,
            "full_val_accuracy": trained.val["accuracy"]}
    if args.detect:
        base["exact"] = {"auc_validation": roc_auc(exact_mean, flipped),
                         "auc_self": roc_auc(exact_self, flipped),
                         "found10_validation": found_at(exact_mean, flipped, 0.1)}
    else:
        harness = [r for r in lds_records if r["kind"] == "scores" and r["config"] == json.loads(cfg.key())
                   and r["label"] == "hyperinf, spectral 1" and r["predicted"] is not None]
        base["exact"] = {"lds": lds_of(exact), "subsets": int(measured.shape[0]),
                         # the harness's own record of the same estimator: equal when the full model reproduced
                         "harness_lds": lds(np.asarray(harness[-1]["predicted"][:M]), measured) if harness else None}
    batch = exp.pcfg.fit_batch_size or (8 if llm else 32)
    subset = lambda rows: subset_loader(exp.data.train, loaders.train_encodings, loaders.tokenizer, rows,  # noqa: E731
                                        batch, exp.pcfg.max_length)
    for K in todo:
        with tempfile.TemporaryDirectory(prefix="hyperinf-index-bench-", dir="/tmp") as tmp:
            t0 = time.perf_counter()
            idx = Index.build(model, loaders.influence_train, Path(tmp) / "idx", config=IndexConfig(proj_dim=K),
                              progress=False)
            build_seconds = time.perf_counter() - t0
            for est in [e for k, e in wanted if k == K and (k, e) not in done]:
                idx.estimator = "regression" if est == "exact" else est  # no projected layer: either is exact
                t0 = time.perf_counter()
                S = idx.scores(loaders.influence_val).double().numpy()
                query_seconds = time.perf_counter() - t0
                # re-ranking back-propagates the candidates again (a full pass when M·2·Q ≳ n): run it once per
                # setting (K = 1024, regression) and check it equals its exact-matrix form, used for the others
                top = _Top(*rerank_union(exact, S, RERANK, 10))
                rerank_seconds = None
                if K == 1024 and est == "regression":
                    t0 = time.perf_counter()
                    real = idx.query(loaders.influence_val, top_k=10, exact_rerank=RERANK, train_subset=subset)
                    rerank_seconds = time.perf_counter() - t0
                    same = bool((real.positive_index.numpy() == top.positive_index.numpy()).mean() > 0.99)
                    print(f"[index] real re-rank equals its exact-matrix form: {same}", flush=True)
                    top = real
                rec = {**base, "proj_dim": K, "estimator": est, "store_dtype": idx.config.dtype,
                       "bytes_per_example": idx.bytes_per_example,
                       "float32_bytes_per_example": 4 * sum(p.rank * p.dim for p in idx.plans),
                       "exact_layers": sum(p.exact for p in idx.plans), "layers": len(idx.plans),
                       "build_seconds": build_seconds, "query_seconds": query_seconds, "rerank_seconds": rerank_seconds,
                       "spearman": mean_spearman(S, exact), "recall10_at10": recall(exact, S, 10, 10),
                       "recall10_at100": recall(exact, S, 10, 100), "recall10_rerank": rerank_recall(exact, top, 10),
                       "self_spearman": spearman(idx.self_scores().numpy(), exact_self)}
                if args.detect:
                    mean = idx.mean_scores(loaders.influence_val).double().numpy()
                    rec.update(auc_validation=roc_auc(mean, flipped), auc_self=roc_auc(idx.self_scores().numpy(), flipped),
                               found10_validation=found_at(mean, flipped, 0.1))
                else:
                    rec.update(lds=lds_of(S), lds_rerank=lds_of(hybrid(exact, S, RERANK)))
                append_record(RUNS, rec)
                print(f"[index] {args.model} K={K} {est}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in rec.items() if isinstance(v, float)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
