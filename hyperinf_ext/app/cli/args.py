"""The argument parsers of the ``hyperinf-ext`` command line: one option builder per command.

Parsing only: what each command does with its arguments is the dispatch in ``cli/__init__.py``.  Imports nothing
heavy, so ``--help`` is quick.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from .index_args import add_index

PROG = "hyperinf-ext"

__all__ = ["PROG", "COMMANDS", "build_parser"]


def add_max_length(g: Any) -> None:
    """--max-length, one default for every command (cli ``_max_length`` resolves None): a LoRA fine-tuned by
    one command and given to another (--adapter) is scored on the tokens it was trained on."""
    g.add_argument("--max-length", metavar="N", type=int, default=None,
                   help="max tokens per example (default: 64, or 128 for a causal LM: its prompts carry the chat "
                        "template and the question)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _model(text: str) -> str | Path:
    """``--model``: the names smollm2/minilm, else a model folder."""
    return text if text in ("smollm2", "minilm") else Path(text)


def _add_model(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--model", metavar="DIR|smollm2|minilm", type=_model, default=None,
                   help="base model: a folder, smollm2 (embedded SmolLM2-135M-Instruct, a causal LM: instruction "
                        "data) or minilm (embedded all-MiniLM-L6-v2 classifier; the default)")
    g.add_argument("--adapter", metavar="DIR", type=Path, default=None,
                   help="saved PEFT adapter folder to start from (then --epochs defaults to 0)")


def _add_columns(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--text-column", metavar="NAME", default="text", help="text column (classifiers; default: text)")
    g.add_argument("--label-column", metavar="NAME", default="label", help="label column (classifiers; default: label)")
    g.add_argument("--prompt-column", metavar="NAME", default="prompt",
                   help="prompt column (causal LMs; default: prompt; rows may hold chat 'messages' instead)")
    g.add_argument("--response-column", metavar="NAME", default="response",
                   help="response column (causal LMs; default: response)")


def _memory_size(text: str) -> int:
    from ...attributor.plan import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_plan(p: argparse.ArgumentParser) -> None:
    """--plan, --max-memory and --fit-batch-size: the commands that fine-tune and fit."""
    g = p.add_argument_group("memory and time")
    g.add_argument("--plan", action="store_true",
                   help="measure a few batches, print the predicted peak memory and time of the run (and write "
                        "OUT/plan.json), and stop before any training or fitting")
    g.add_argument("--max-memory", metavar="SIZE", type=_memory_size, default=None,
                   help="refuse to start a run whose predicted peak memory exceeds SIZE (e.g. 8G, 512M), naming the "
                        "options that bring it under")
    g.add_argument("--fit-batch-size", metavar="N", type=int, default=None,
                   help="batch size of the influence passes (default: 32, or 8 for a causal LM)")


def _add_common(p: argparse.ArgumentParser, *, out: str, plan: bool = False) -> None:
    if plan:
        _add_plan(p)
    p.add_argument("--seed", metavar="N", type=int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument("--out", metavar="DIR", type=Path, default=Path(out), help=f"output folder (default: {out})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or stage messages")
    p.add_argument("--threads", metavar="N", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _add_pipeline(p: argparse.ArgumentParser, *, flip_rate: float, out: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="FILE", type=Path, default=None,
                   help="CSV or JSONL file: text/label columns for a classifier, prompt/response (or messages) for "
                        "a causal LM (default: embedded Rotten Tomatoes, as sentiment instructions for a causal LM)")
    _add_columns(g)
    g.add_argument("--n-train", metavar="N", type=int, default=2000, help="training examples (default: 2000)")
    g.add_argument("--n-val", metavar="N", type=int, default=300, help="validation examples (default: 300)")
    g.add_argument("--flip-rate", metavar="RATE", type=float, default=flip_rate,
                   help=f"fraction of training labels flipped, in [0, 1) (default: {flip_rate})")
    g = p.add_argument_group("model and fine-tuning")
    _add_model(g)
    g.add_argument("--rank", metavar="R", type=int, default=8, help="LoRA rank (default: 8)")
    g.add_argument("--alpha", metavar="A", type=int, default=16, help="LoRA alpha (default: 16)")
    g.add_argument("--epochs", metavar="N", type=int, default=None,
                   help="fine-tuning epochs (default: 3, or 0 with --adapter)")
    g.add_argument("--lr", metavar="LR", type=float, default=3e-4, help="learning rate (default: 3e-4)")
    g.add_argument("--batch-size", metavar="N", type=int, default=16, help="fine-tuning batch size (default: 16)")
    add_max_length(g)
    g.add_argument("--device", metavar="DEV", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--top-k", metavar="K", type=int, default=None,
                   help="also write topk.safetensors: per validation example the K training examples that most "
                        "raise and most lower its loss (hyperinf), in O(n_val*K) memory")
    _add_common(p, out=out, plan=True)


def _add_detect(p: argparse.ArgumentParser) -> None:
    _add_pipeline(p, flip_rate=0.2, out="hyperinf-out/detect")
    g = p.add_argument_group("influence")
    g.add_argument("--methods", metavar="LIST", default="hyperinf,datainf,lissa,tracin,exact",
                   help="comma list of methods of hyperinf_ext.curvature.methods, e.g. hyperinf, datainf, lissa, tracin, exact, "
                        "paper (default: hyperinf,datainf,lissa,tracin,exact)")
    g.add_argument("--damping", metavar="LIST", default="auto",
                   help="comma list of dampings: numbers > 0 or rules datainf, spectral, paper, auto (default: auto = "
                        "each method's own default: spectral x1 for hyperinf and exact (the same estimator), from "
                        "bench/LDS.md and bench/QUALITY.md; datainf for datainf/lissa; the table prints each row's damping); "
                        "rule:factor sets a rule's factor, e.g. spectral:3,spectral:10,datainf. "
                        "Give e.g. 'datainf' to compare every method at the same damping")
    # --score-signal first: torchrun's own parser reads --signal as an abbreviation of its --signals-to-handle
    # and refuses the line before the command starts, so only the long name passes through torchrun
    g.add_argument("--score-signal", "--signal", dest="signal", choices=("validation", "self", "both"),
                   default="validation",
                   help="suspicion score: influence on the validation loss, self-influence g·H⁻¹·g (no clean "
                        "validation set needed), or both (default: validation). --signal is the same option "
                        "outside torchrun")


def _add_select(p: argparse.ArgumentParser) -> None:
    _add_pipeline(p, flip_rate=0.0, out="hyperinf-out/select")
    g = p.add_argument_group("selection")
    g.add_argument("--fraction", metavar="F", type=float, default=0.2, help="fraction of training data kept (default: 0.2)")
    g.add_argument("--method", metavar="NAME", default="hyperinf", help="influence method, e.g. hyperinf, exact, datainf, lissa, tracin (default: hyperinf)")
    g.add_argument("--damping", metavar="VALUE", default="auto", help="damping: a number > 0 or datainf, spectral, paper, auto (default: auto, the method's own default)")
    g.add_argument("--rule", metavar="NAME", default=None,
                   help="selection rule of hyperinf_ext.app.tasks.selection_rules: top (keep the most helpful), drop-harmful, "
                        "class-balanced, query-round-robin (LESS) (default: class-balanced, which beat random subsets most "
                        "reliably in bench/SELECTION.md)")
    g.add_argument("--evaluate", action="store_true",
                   help="also fine-tune fresh LoRA models on the selection and on a random subset of the same "
                        "size, and report both validation accuracies")
    g.add_argument("--balance", action="store_true",
                   help="same as --rule class-balanced (the default rule): keep each label's (response's) share of the training set, "
                        "the most helpful of each (without it the selection can be a single class)")


def _add_model_and_finetune(p: argparse.ArgumentParser) -> None:
    """The "model" group of the commands that use a given adapter and fine-tune only when asked
    (attribute, index build)."""
    g = p.add_argument_group("model")
    _add_model(g)
    g.add_argument("--epochs", metavar="N", type=int, default=0, help="fine-tune N epochs first (default: 0)")
    g.add_argument("--rank", metavar="R", type=int, default=8, help="LoRA rank of a fresh adapter (default: 8)")
    g.add_argument("--alpha", metavar="A", type=int, default=16, help="LoRA alpha (default: 16)")
    g.add_argument("--lr", metavar="LR", type=float, default=3e-4, help="learning rate (default: 3e-4)")
    g.add_argument("--batch-size", metavar="N", type=int, default=16, help="batch size (default: 16)")
    g.add_argument("--device", metavar="DEV", default="cpu", help="cpu or cuda[:N] (default: cpu)")


def _add_attribute(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--train", metavar="FILE", type=Path, default=None,
                   help="training examples (CSV or JSONL); required unless --index is given")
    g.add_argument("--query", metavar="FILE", type=Path, required=True, help="query examples, same format")
    g.add_argument("--index", metavar="IDX", type=Path, default=None,
                   help="answer from a gradient index (`hyperinf-ext index build`) instead of recomputing the "
                        "training gradients; the model, adapter and training file are the index's")
    add_index_reading(g)
    _add_columns(g)
    add_max_length(g)
    _add_model_and_finetune(p)
    g = p.add_argument_group("influence")
    g.add_argument("--top-k", metavar="K", type=int, default=10, help="examples per query and side (default: 10)")
    g.add_argument("--method", metavar="NAME", default="hyperinf", help="influence method (default: hyperinf)")
    g.add_argument("--damping", metavar="VALUE", default="auto", help="damping (default: auto)")
    _add_query_options(g)
    g.add_argument("--per-token", action="store_true",
                   help="causal LMs: also split every kept pair's score over the query's and the training example's "
                        "response tokens (tokens.jsonl, heatmaps in report.html); with --index the kept pairs are "
                        "re-run from the index's training file, so their shares sum to the exact score")
    _add_common(p, out="hyperinf-out/attribute", plan=True)


def _add_query_options(g: argparse._ArgumentGroup, *, detection: bool = False) -> None:
    """--mix-queries and --normalize: how the query (target) side enters the scores (``detection``: audit's
    default mixing, chosen by bench/DEFAULTS.md)."""
    g.add_argument("--mix-queries", metavar="W", type=float, default=None if detection else 0.0,
                   help="mix the query (target) set's curvature into the training set's with weight W before it is "
                        "inverted (TrackStar's idea; W = 99 is its 0.99 mix) "
                        + ("(default: 99 with --target and a method that can mix, the choice of bench/DEFAULTS.md; "
                           "0 = none)" if detection else "(default: 0, none)"))
    # "none" everywhere: the reports' Settings show normalize "none", and a value read there must be accepted back
    g.add_argument("--normalize", choices=("unit", "query", "symmetric", "none"),
                   default=None,
                   help="unit-normalised gradients (cosine influence): unit = score/(|q||g|), query = cosine of the "
                        "preconditioned query and g, symmetric = cosine in the inverse-curvature metric (TrackStar's "
                        "form) " + ("(default: symmetric for hyperinf's influence on --target without --index or "
                                    "--per-token, the choice of bench/DEFAULTS.md; none = raw scores)" if detection
                                    else "(default: none, raw scores)"))


def _add_user_model(p: argparse.ArgumentParser, *, epochs_help: str, detection: bool = False) -> None:
    """The model, fine-tuning, influence and resume options of the user commands (audit, select)."""
    g = p.add_argument_group("model")
    _add_model(g)
    g.add_argument("--epochs", metavar="N", type=int, default=None, help=epochs_help)
    g.add_argument("--rank", metavar="R", type=int, default=8, help="LoRA rank of a fresh adapter (default: 8)")
    g.add_argument("--alpha", metavar="A", type=int, default=16, help="LoRA alpha (default: 16)")
    g.add_argument("--lr", metavar="LR", type=float, default=3e-4, help="learning rate (default: 3e-4)")
    g.add_argument("--batch-size", metavar="N", type=int, default=16, help="fine-tuning batch size (default: 16)")
    g.add_argument("--max-length", metavar="N", type=int, default=None,
                   help="max tokens per example (default: 64, or 128 for a causal LM)")
    g.add_argument("--device", metavar="DEV", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g = p.add_argument_group("influence")
    g.add_argument("--method", metavar="NAME", default="hyperinf", help="influence method (default: hyperinf)")
    g.add_argument("--damping", metavar="VALUE", default="auto",
                   help="damping (default: auto, the method's own" + ("; spectral:0.1 for hyperinf's influence on "
                                                                       "--target, the choice of bench/DEFAULTS.md)"
                                                                       if detection else ")"))
    _add_query_options(g, detection=detection)
    g.add_argument("--checkpoint-every", metavar="N", type=int, default=50,
                   help="fit batches between checkpoint commits in OUT/.checkpoint, from which a rerun with the "
                        "same arguments resumes (default: 50)")


def _add_index_option(g: argparse._ArgumentGroup, file_option: str) -> None:
    g.add_argument("--index", metavar="IDX", type=Path, default=None,
                   help="score from a gradient index (`hyperinf-ext index build`) instead of fitting: the model, "
                        f"adapter and training file are the index's ({file_option} is optional and must be that file; "
                        "--model, --adapter, --method and --damping are refused)")
    add_index_reading(g)


def add_index_reading(g: argparse._ArgumentGroup) -> None:
    """How an index is opened and read (``index query`` and every command's ``--index``)."""
    g.add_argument("--estimator", choices=("regression", "unbiased"), default=None,
                   help="with an index: how a projected layer's score is estimated from the stored rows: least "
                        "squares given the training gradients' GFIM (regression) or the plain projected product "
                        "(default: regression)")
    g.add_argument("--no-verify", action="store_true",
                   help="with an index: skip the SHA-256 check of the shard files on open (sizes are still checked)")


def _add_audit(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--train", metavar="FILE", type=Path, default=None,
                   help="the training file to audit (CSV or JSONL: text/label, or prompt/response or messages); "
                        "required unless --index is given")
    g.add_argument("--target", metavar="FILE", type=Path, default=None,
                   help="trusted examples, same format: rank by influence on their mean loss (--signal) "
                        "(default: none, rank by self-influence)")
    _add_index_option(g, "--train")
    _add_columns(g)
    _add_user_model(p, epochs_help="fine-tuning epochs on the training file first (default: 3, or 0 with --adapter)",
                    detection=True)
    g = p.add_argument_group("signal")
    # --score-signal first: torchrun's parser reads --signal as an abbreviation of its --signals-to-handle
    g.add_argument("--score-signal", "--signal", dest="score_signal", choices=("combined", "influence", "self"),
                   default=None,
                   help="the ranking: influence (on --target's mean loss; it found flipped labels best in "
                        "bench/DEFAULTS.md), combined (the mean of its rank and self-influence's), or self "
                        "(default: influence with --target, self without). --signal is the same option outside "
                        "torchrun")
    g = p.add_argument_group("per-token attribution")
    g.add_argument("--per-token", action="store_true",
                   help="causal LMs: also split the scores of the most suspicious examples over their response "
                        "tokens (tokens.jsonl, heatmaps in report.html)")
    g.add_argument("--per-token-count", metavar="N", type=int, default=20,
                   help="with --per-token: how many of the most suspicious examples (default: 20)")
    _add_common(p, out="hyperinf-out/audit", plan=True)


def _add_select_pool(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--pool", metavar="FILE", type=Path, default=None,
                   help="candidate examples (CSV or JSONL); required unless --index is given")
    g.add_argument("--target", metavar="FILE", type=Path, required=True,
                   help="examples of the task the selection should serve, same format")
    _add_index_option(g, "--pool")
    _add_columns(g)
    g = p.add_argument_group("selection")
    size = g.add_mutually_exclusive_group(required=True)
    size.add_argument("--fraction", metavar="F", type=float, default=None, help="fraction of the pool to keep")
    size.add_argument("--count", metavar="N", type=int, default=None, help="number of pool examples to keep")
    g.add_argument("--warmup-fraction", metavar="F", type=float, default=0.05,
                   help="without --adapter: the warm-up LoRA trains on this seeded random part of the pool, at "
                        "least 32 examples (default: 0.05)")
    g.add_argument("--rule", metavar="NAME", default="auto",
                   help="selection rule: auto (class-balanced where the examples have labels, else drop-harmful), "
                        "top, drop-harmful, class-balanced, query-round-robin (default: auto)")
    g.add_argument("--evaluate", action="store_true",
                   help="also fine-tune fresh LoRA adapters on the selection and on a random subset of the same size "
                        "and report the target loss of each")
    _add_user_model(p, epochs_help="warm-up (and --evaluate) epochs (default: 3, or 0 with --adapter)")
    _add_common(p, out="hyperinf-out/select", plan=True)


def _add_convergence(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", metavar="LIST", type=_int_list, default=[64, 256], help="comma list of matrix sizes (default: 64,256)")
    p.add_argument("--samples", metavar="LIST", type=_int_list, default=[1000],
                   help="comma list of gradient-sample counts (default: 1000)")
    p.add_argument("--iterations", metavar="N", type=int, default=30, help="Schulz iterations (default: 30)")
    _add_common(p, out="hyperinf-out/convergence")


# name -> (help, description, the options it adds); the order is that of --help.
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "audit": (
        "rank your training examples by suspicion",
        "Rank every example of --train by influence on the mean loss of --target (or by self-influence without "
        "one). Without --adapter a LoRA is fine-tuned on --train first; --index IDX scores from a gradient index "
        "instead. Writes ranked.jsonl/.csv (your rows unchanged plus rank and score, most suspicious first), "
        "report.md, report.html and summary.json (and tokens.jsonl with --per-token).",
        _add_audit,
    ),
    "select": (
        "keep the part of your pool that serves your target task",
        "LESS: warm up a LoRA on a small random part of --pool (or use --adapter), score every pool example by "
        "influence on the mean loss of --target and keep --count/--fraction by the selection rule. Writes "
        "selected.jsonl/.csv (your rows unchanged, pool order), scores.csv, report.md, report.html and "
        "summary.json. --index IDX scores the index's training file from a gradient index, without a warm-up.",
        _add_select_pool,
    ),
    "detect-mislabeled": (
        "rank flipped training labels by influence, per method",
        "Flip a fraction of the training labels, fine-tune a LoRA model on them, fit HyperINF "
        "once and score every method/damping on the validation set. Writes detection.png, "
        "scores.csv and summary.json.",
        _add_detect,
    ),
    "select-data": (
        "keep the training examples that most lower the validation loss",
        "Fine-tune, fit HyperINF, score the training set on the validation loss and keep the "
        "most helpful --fraction (most negative scores). Writes selected.csv and summary.json.",
        _add_select,
    ),
    "attribute": (
        "per query, the training examples that most helped and most harmed its answer",
        "Fit HyperINF on the training file and write, for every query, the top-k most helpful and "
        "most harmful training examples with their texts and scores: attribution.jsonl, report.md, "
        "report.html, summary.json (and tokens.jsonl with --per-token). Uses --adapter as given; fine-tunes only "
        "with --epochs N.",
        _add_attribute,
    ),
    "convergence": (
        "convergence of the Schulz inverse vs matrix size",
        "Run the Schulz-inverse convergence study. Writes convergence.png, .csv and .json.",
        _add_convergence,
    ),
    "index": (
        "build a gradient index of a training file, or query one",
        "index build: fit HyperINF once and store the training gradients compressed; index query: per query "
        "the top-k training examples from the index, without recomputing the training gradients.",
        lambda p: add_index(p, _add_model_and_finetune, _add_columns, _add_common, add_index_reading,
                            add_max_length),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand; ``args.command`` names the one given."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="HyperINF influence functions for LoRA-tuned models: mislabeled-data detection, "
                    "data selection and solver convergence.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, description, add_options) in COMMANDS.items():
        add_options(sub.add_parser(name, help=help_text, description=description))
    return parser
