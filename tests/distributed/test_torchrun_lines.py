"""Every ``torchrun`` line of README.md and docs/*.md, as written: through torchrun's own argument parser and
the CLI's, and the command lines (``-m hyperinf_ext ...``) run on 2 CPU ranks at tiny sizes, their outputs
equal to one process's.

torchrun's parser accepts abbreviations of its options anywhere before the script's arguments are cut off,
so a command option that is a prefix of one of torchrun's (``--signal`` of ``--signals-to-handle``) stops
the line before the command starts; these tests catch such a line and such an option.
"""
from __future__ import annotations

import contextlib
import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from torch.distributed.run import get_args_parser  # noqa: E402

from hyperinf_ext.app.cli.args import build_parser  # noqa: E402

from test_distributed import LAUNCH_TIMEOUT_S, ROOT, _env, _free_port  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALIASES_NOT_FOR_TORCHRUN = {"--signal"}  # the CLI keeps it for plain runs; the docs write --score-signal


def doc_lines() -> list[tuple[str, list[str]]]:
    """(page:line, argv after ``torchrun``) of every line that starts with ``torchrun `` (comments cut)."""
    found = []
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            text = line.strip().strip("`")
            if text.startswith("torchrun "):
                argv = shlex.split(re.sub(r"\s+#.*$", "", text))
                found.append((f"{page.name}:{n}", argv[1:]))
    return found


def _torchrun_parse(argv: list[str]):
    try:
        return get_args_parser().parse_args(argv)
    except SystemExit:
        return None


def test_every_doc_torchrun_line_parses_with_torchrun_and_the_cli(capsys):
    lines = doc_lines()
    assert any(a[:3] == ["--nproc-per-node", "2", "-m"] for _, a in lines), lines
    commands = 0
    for where, argv in lines:
        args = _torchrun_parse(argv)
        assert args is not None, f"{where}: torchrun refuses it: {capsys.readouterr().err[-300:]}"
        if args.module and args.training_script == "hyperinf_ext":
            commands += 1
            try:
                build_parser().parse_args(args.training_script_args)
            except SystemExit:
                pytest.fail(f"{where}: the CLI refuses {args.training_script_args}: {capsys.readouterr().err[-300:]}")
    assert commands >= 2


def test_every_cli_option_passes_through_torchrun():
    """No option of any command is taken by torchrun's parser (an abbreviation of one of its options)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for command, p in sub.choices.items():
        for action in p._actions:
            for option in action.option_strings:
                if option in ("-h", "--help") or option in ALIASES_NOT_FOR_TORCHRUN:
                    continue
                argv = ["--nproc-per-node", "2", "-m", "hyperinf_ext", command, option, "1"]
                args = _torchrun_parse(argv)
                assert args is not None and args.training_script_args == [command, option, "1"], (command, option)
    # why the alias is kept out of the docs: torchrun stops at it
    assert _torchrun_parse(["--nproc-per-node", "2", "-m", "hyperinf_ext", "detect-mislabeled", "--signal", "self"]) \
        is None


# what each command line gets appended to run in seconds (the last of a repeated option wins)
TINY = {
    "detect-mislabeled": ["--n-train", "12", "--n-val", "4", "--methods", "hyperinf,tracin", "--flip-rate", "0.25"],
    "attribute": [],
}
COMMON = ["--epochs", "1", "--lr", "1e-2", "--batch-size", "4", "--max-length", "24", "--threads", "1",
          "--no-progress"]


@pytest.fixture(scope="module")
def llm_files(tmp_path_factory):
    from tiny_llm import make_tiny_llama, sentiment_rows, write_instructions

    root = tmp_path_factory.mktemp("lines")
    rows = sentiment_rows(10, seed=1)
    rows[3]["response"] = "negative" if rows[3]["response"] == "positive" else "positive"
    return {"model": make_tiny_llama(root / "m"), "data": write_instructions(root / "d.jsonl", sentiment_rows(16)),
            "train.jsonl": rows, "query.jsonl": sentiment_rows(3, seed=2)}


def _outputs(out: Path) -> dict:
    got = {}
    if (out / "attribution.jsonl").exists():
        got["attribution"] = [json.loads(x) for x in (out / "attribution.jsonl").read_text().splitlines()]
    if (out / "scores.csv").exists():
        with open(out / "scores.csv", newline="") as f:
            got["scores"] = list(csv.DictReader(f))
    return got


def _same(a, b, where: str) -> None:
    """Equal structures; numbers (and numeric strings, as in scores.csv) to 1e-6 relative."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        try:
            x, y = float(a), float(b)
        except (TypeError, ValueError):
            assert a == b, (where, a, b)
            return
        assert abs(x - y) <= 1e-6 * max(1.0, abs(y)), (where, a, b)


def test_doc_command_lines_run_on_two_ranks_as_one_process(llm_files, tmp_path):
    """Each ``torchrun ... -m hyperinf_ext COMMAND`` line at tiny sizes on 2 gloo ranks: exit 0, and the
    outputs (attribute's top-k lists, detect-mislabeled's scores — validation and self) equal one process's."""
    from tiny_llm import write_instructions

    from hyperinf_ext.app.cli import main

    runs = [(w, a) for w, a in doc_lines() if "-m" in a and "hyperinf_ext" in a]
    assert runs
    for k, (where, argv) in enumerate(runs):
        cwd = tmp_path / f"line{k}"
        cwd.mkdir()
        for name in ("train.jsonl", "query.jsonl"):
            write_instructions(cwd / name, llm_files[name])
        args = get_args_parser().parse_args(argv)
        command = args.training_script_args[0]
        extra = ["--model", str(llm_files["model"]), *TINY[command], *COMMON]
        if command == "detect-mislabeled":
            extra += ["--data", str(llm_files["data"])]
        launch = [sys.executable, "-m", "torch.distributed.run", "--master-addr", "127.0.0.1", "--master-port",
                  str(_free_port()), "--monitor-interval", "0.2", *argv, *extra]
        proc = subprocess.run(launch, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
        assert proc.returncode == 0, f"{where}: {' '.join(launch)}\n{proc.stderr[-4000:]}"
        out = cwd / build_parser().parse_args(args.training_script_args).out
        two = _outputs(out)
        assert two, f"{where}: no outputs in {out}"
        one_out = cwd / "one-process"
        with contextlib.chdir(cwd):  # the line's relative paths
            assert main([*args.training_script_args, *extra, "--out", str(one_out)]) == 0
        _same(two, _outputs(one_out), where)

