"""The options of ``hyperinf-ext index build|query`` (parsing only; ``cli/__init__.py`` dispatches)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable


def add_index(p: argparse.ArgumentParser, add_model: Callable, add_columns: Callable, add_common: Callable,
              add_index_reading: Callable, add_max_length: Callable) -> None:
    """``index build`` and ``index query`` as actions of one command (``args.index_action``); ``add_model``
    adds the model and fine-tuning group, ``add_columns``/``add_common``/``add_max_length`` the shared options,
    ``add_index_reading`` --estimator and --no-verify (args.py)."""
    sub = p.add_subparsers(dest="index_action", metavar="ACTION", required=True)
    b = sub.add_parser(
        "build", help="fit HyperINF on a training file and store its gradients compressed",
        description="One pass over --train: the HyperINF fit and every training example's LoRA gradient, "
                    "projected to --proj-dim numbers per layer and stored in float16 shards under --out. "
                    "A killed build resumes when rerun with the same arguments. Uses --adapter as given; "
                    "fine-tunes only with --epochs N (the adapter is copied into the index).")
    g = b.add_argument_group("data")
    g.add_argument("--train", metavar="FILE", type=Path, required=True, help="training examples (CSV or JSONL)")
    add_columns(g)
    add_max_length(g)
    add_model(b)
    g = b.add_argument_group("index")
    g.add_argument("--proj-dim", metavar="K", type=int, default=1024,
                   help="numbers kept per LoRA layer and example: the d side of each r x d gradient is projected "
                        "to K/r columns (0 = exact gradients, float32) (default: 1024)")
    g.add_argument("--store-dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                   help="element type of the store (default: auto = float16 with a projection, float32 without)")
    g.add_argument("--method", metavar="NAME", default="hyperinf", help="influence method (default: hyperinf)")
    g.add_argument("--damping", metavar="VALUE", default="auto", help="damping (default: auto)")
    add_common(b, out="hyperinf-out/index", plan=True)
    q = sub.add_parser(
        "query", help="top-k training examples per query, from an index",
        description="Per query of --query, the --top-k most helpful and most harmful training examples from "
                    "the index (the model is loaded from the index). Writes attribution.jsonl, report.md and "
                    "summary.json, as `attribute` does.")
    q.add_argument("index", metavar="IDX", type=Path, nargs="?", default=None, help="folder written by `index build`")
    q.add_argument("--index", dest="index_option", metavar="IDX", type=Path, default=None,
                   help="the same, spelt as audit, select and attribute take it")
    q.add_argument("--query", metavar="FILE", type=Path, required=True, help="query examples, as the training file")
    q.add_argument("--top-k", metavar="K", type=int, default=10, help="examples per query and side (default: 10)")
    q.add_argument("--exact-rerank", metavar="M", type=int, default=0,
                   help="re-score the best M candidates per query and side exactly from the training file (which must "
                        "be unchanged) and re-rank (default: 0, the index's scores)")
    add_index_reading(q)
    q.add_argument("--per-token", action="store_true",
                   help="causal LMs: also split every kept pair's score over the query's and the training example's "
                        "response tokens, re-running the kept pairs from the index's training file (which must be "
                        "unchanged): tokens.jsonl, heatmaps in report.html")
    q.add_argument("--device", metavar="DEV", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    add_common(q, out="hyperinf-out/index-query")


def query_index(args: argparse.Namespace) -> Path:
    """``index query``'s folder, given as IDX or as ``--index IDX``; a ValueError when neither or two differ."""
    given = [p for p in (args.index, args.index_option) if p is not None]
    if not given:
        raise ValueError("index query: name the index folder (IDX or --index IDX)")
    if len(given) == 2 and given[0] != given[1]:
        raise ValueError(f"index query: two index folders given, {given[0]} and --index {given[1]}; give one")
    return given[0]


def index_reading(args: argparse.Namespace) -> dict:
    """--estimator and --no-verify, which only an index reads (refused without --index); the options an
    index run cannot honour (--plan, --max-memory: it fits nothing; --normalize: it stores no gradient norms)
    refused with it."""
    if args.index is None:
        for option, given in (("--estimator", args.estimator is not None), ("--no-verify", args.no_verify)):
            if given:
                raise ValueError(f"{option}: only with --index (it says how an index is read)")
    elif getattr(args, "plan", False) or getattr(args, "max_memory", None) is not None:
        raise ValueError(f"{'--plan' if args.plan else '--max-memory'}: not with --index (an index run fits nothing; "
                         "plan the index build: `hyperinf-ext index build ... --plan`)")
    elif getattr(args, "normalize", None):
        raise ValueError("--normalize: not with --index (an index stores compressed training gradients, not their "
                         "norms; run without --index)")
    return {"verify": not args.no_verify, "estimator": args.estimator or "regression"}
