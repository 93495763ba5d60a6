"""The user commands measured as a user runs them (issue #22): ``hyperinf-ext audit`` and ``hyperinf-ext select``.

For each model — the embedded classifier (``minilm``: all-MiniLM-L6-v2 + LoRA, Rotten Tomatoes as
text/label CSV) and the embedded LLM (``smollm2``: the same reviews as sentiment instructions, JSONL
prompt/response) — and each pool size n (300, 2,000), this script writes the files a user would have:

* ``train`` — n reviews drawn at random (seed 0) with 20 % of their labels flipped here (planted errors:
  ``flip_labels`` with seed 0; the flipped lines are recorded, never given to the command);
* ``target`` — 100 other reviews, clean (the trusted held-out set);

and runs the command line on them (``python -m hyperinf_ext``, defaults otherwise), one cell at a time:

* ``audit-target`` / ``audit-combined`` / ``audit-default`` / ``audit-self``: ``audit --train train --target
  target --signal influence --mix-queries 0 --normalize none --damping spectral:1`` (the target signal alone,
  unmixed, raw: audit's default with a target until issue #25 switched it) / the same with the combined
  signal and ``--mix-queries`` at its default 99 (the default from amendment 2 to amendment 4 of
  bench/defaults_rule.py) / ``audit --train train --target target`` (today's default, bench/DEFAULTS.md 1d:
  hyperinf at spectral × 0.1 with the target mixed in, the symmetric cosine) / ``audit --train train`` (a
  LoRA is fine-tuned on the training file first, 3 epochs) — wall time, and the ranking of the planted
  errors: ROC-AUC and the fraction of them found in the top 10 % of ``ranked.*``;
* ``select-seedS`` (S = 0, 1, 2): ``select --pool train --target target --fraction 0.3 --evaluate --seed S``
  — wall time without the evaluation's two fine-tunes, and the target loss of fresh LoRA adapters trained
  on the selection and on a random subset of the same size.

Every cell is one JSON line in bench/user_commands_runs.jsonl (a rerun skips the cells it holds), and
bench/USER_COMMANDS.md is rewritten from all lines after each cell.

    python -m bench.user_commands --models minilm --sizes 300      # the 6 classifier cells at n = 300
    python -m bench.user_commands                                  # every cell (hours on 2 CPU cores)
    python -m bench.user_commands --report-only
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.records import load as load_records

HERE = Path(__file__).resolve().parent
RUNS = HERE / "user_commands_runs.jsonl"
REPORT = HERE / "USER_COMMANDS.md"
MODELS = ("minilm", "smollm2")
SIZES = (300, 2000)
CELLS = ("audit-target", "audit-self", "select-seed0", "select-seed1", "select-seed2", "audit-combined",
         "audit-default")
_RAW_AT_1 = ["--normalize", "none", "--damping", "spectral:1"]  # the defaults before amendment 4
AUDIT_FLAGS = {"audit-target": ["--signal", "influence", "--mix-queries", "0", *_RAW_AT_1],
               "audit-combined": ["--signal", "combined", *_RAW_AT_1], "audit-default": [], "audit-self": []}
AUDIT_LABEL = {"audit-target": "--target, influence, unmixed",
               "audit-combined": "--target, combined, mixed 99 at spectral × 1: the default before amendment 4",
               "audit-default": "--target, today's default",
               "audit-self": "no target"}
FLIP_RATE = 0.2
N_TARGET = 100
FRACTION = 0.3


def write_files(model: str, n: int, folder: Path) -> tuple[Path, Path, list[int]]:
    """The training file (20 % flipped) and the clean target file; returns them and the flipped file lines."""
    import torch

    from hyperinf_ext.app.data.dataset import flip_labels
    from hyperinf_ext.app.data.instruction import rotten_tomatoes_instructions
    from hyperinf_ext.app.data.packaged import load_rotten_tomatoes

    ds = rotten_tomatoes_instructions() if model == "smollm2" else load_rotten_tomatoes()
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    train_idx, target_idx = perm[:n], perm[n:n + N_TARGET]
    noisy, flipped = flip_labels([ds.labels[i] for i in train_idx], FLIP_RATE, seed=0, num_classes=2)
    folder.mkdir(parents=True, exist_ok=True)
    if model == "smollm2":
        def rows(idx: list[int], labels: list[int]) -> list[dict[str, Any]]:
            return [{"prompt": ds.prompts[i][0]["content"], "response": ds.label_names[y]} for i, y in zip(idx, labels)]

        train, target = folder / "train.jsonl", folder / "target.jsonl"
        for path, content in ((train, rows(train_idx, noisy)), (target, rows(target_idx, [ds.labels[i] for i in target_idx]))):
            path.write_text("".join(json.dumps(r) + "\n" for r in content), encoding="utf-8")
        first_line = 1
    else:
        train, target = folder / "train.csv", folder / "target.csv"
        for path, idx, labels in ((train, train_idx, noisy), (target, target_idx, [ds.labels[i] for i in target_idx])):
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                w.writerows([ds.texts[i], ds.label_names[y]] for i, y in zip(idx, labels))
        first_line = 2  # the header is line 1
    return train, target, [first_line + int(i) for i in flipped.nonzero().flatten().tolist()]


def run_cli(argv: list[str], log: Path) -> float:
    """Run ``python -m hyperinf_ext ARGV`` as a user would; returns the wall seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "hyperinf_ext", *argv], stdout=fh, stderr=subprocess.STDOUT,
                              env=env, cwd=HERE.parent)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"hyperinf-ext {' '.join(argv[:1])} failed (exit {proc.returncode}); see {log}")
    return seconds


def ranked_lines(out: Path, column: str | None = None) -> tuple[list[int], list[float], str]:
    """File lines of the training rows in rank order (recovered from the rows' texts), their scores in
    ``column`` (default: the ranking signal), the signal."""
    summary = json.loads((out / "summary.json").read_text())
    signal = column or summary["signal"]
    ranked = Path(summary["outputs"]["ranked"])
    train = Path(summary["train"])
    if ranked.suffix == ".csv":
        with open(train, newline="", encoding="utf-8") as f:
            line_of = {r["text"]: i + 2 for i, r in enumerate(csv.DictReader(f))}
        with open(ranked, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        key = "text"
    else:
        line_of = {json.loads(l)["prompt"]: i + 1 for i, l in enumerate(train.read_text(encoding="utf-8").splitlines())}
        rows = [json.loads(l) for l in ranked.read_text(encoding="utf-8").splitlines()]
        key = "prompt"
    return [line_of[r[key]] for r in rows], [float(r[signal]) for r in rows], signal


def column_metrics(out: Path, flipped: list[int]) -> dict[str, dict[str, float]]:
    """ROC-AUC and found-in-top-10 % of the planted errors by every score column of an audit's output
    (the combined signal's parts beside it)."""
    from hyperinf_ext.app.tasks.metrics import found_at, roc_auc

    out_metrics = {}
    for column in json.loads((out / "summary.json").read_text()).get("columns", []):
        lines, scores, _ = ranked_lines(out, column)
        planted = np.isin(np.array(lines), np.array(flipped))
        out_metrics[column] = {"auc": roc_auc(np.array(scores), planted),
                               "found_at_10": found_at(np.array(scores), planted, 0.1)}
    return out_metrics


def run_cell(model: str, n: int, cell: str, work: Path, threads: int | None) -> dict[str, Any]:
    from hyperinf_ext.app.tasks.metrics import found_at, roc_auc

    folder = work / f"{model}-n{n}"
    train, target, flipped = write_files(model, n, folder / "data")
    out = folder / cell
    common = ["--model", model, "--out", str(out), "--no-progress", *(["--threads", str(threads)] if threads else [])]
    record: dict[str, Any] = {"model": model, "n": n, "cell": cell, "n_target": N_TARGET, "flip_rate": FLIP_RATE,
                              "load_at_start": os.getloadavg()[0]}  # other jobs on the machine slow the wall time
    if cell.startswith("audit"):
        argv = ["audit", "--train", str(train), *([] if cell == "audit-self" else ["--target", str(target)]),
                *AUDIT_FLAGS[cell], *common]
        record["seconds"] = run_cli(argv, folder / f"{cell}.log")
        lines, scores, signal = ranked_lines(out)
        planted = np.isin(np.array(lines), np.array(flipped))
        # rank order, highest score first: the scores as ranked are the suspicion
        ft = json.loads((out / "summary.json").read_text())["finetune"]
        record.update(signal=signal, n_flipped=len(flipped), auc=roc_auc(np.array(scores), planted),
                      found_at_10=found_at(np.array(scores), planted, 0.1), model_eval_on=ft["eval_on"],
                      model_loss=ft["loss"], model_accuracy=ft["accuracy"], by_column=column_metrics(out, flipped))
    else:
        seed = int(cell.removeprefix("select-seed"))
        argv = ["select", "--pool", str(train), "--target", str(target), "--fraction", str(FRACTION), "--evaluate",
                "--seed", str(seed), *common]
        wall = run_cli(argv, folder / f"{cell}.log")
        summary = json.loads((out / "summary.json").read_text())
        ev = summary["evaluation"]
        record.update(seed=seed, fraction=FRACTION, n_selected=summary["n_selected"], rule=summary["rule"],
                      seconds=wall - ev["selected"]["seconds"] - ev["random"]["seconds"], wall_with_evaluate=wall,
                      warmup_examples=summary["warmup"]["n_examples"],
                      selected_loss=ev["selected"]["val_loss"], random_loss=ev["random"]["val_loss"],
                      selected_accuracy=ev["selected"]["val_accuracy"], random_accuracy=ev["random"]["val_accuracy"],
                      warmup_loss=ev["warmup_model"]["val_loss"])
    record.update(machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                  threads=threads, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    return record


def load_runs() -> list[dict[str, Any]]:
    return load_records(RUNS)


def _f(x: Any, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


BUSY = 1.5  # 1-minute load average on the 2-core machine above which a cell's wall time is marked


def _seconds(record: dict[str, Any] | None) -> str:
    if record is None:
        return "—"
    return f"{record['seconds']:.0f}" + ("\\*" if record.get("load_at_start", 0.0) >= BUSY else "")


def write_report(runs: list[dict[str, Any]]) -> None:
    """bench/USER_COMMANDS.md from every recorded cell."""
    cell = {(r["model"], r["n"], r["cell"]): r for r in runs}
    lines = [
        "# The user commands on the embedded models", "",
        "Generated by `python -m bench.user_commands` from bench/user_commands_runs.jsonl; every number is measured "
        "(protocol: the script's docstring). Training files: n Rotten Tomatoes reviews with 20% of the labels "
        "flipped by the script (planted errors); target: 100 other, clean reviews. Each command ran as a user "
        "runs it, with its defaults (a LoRA fine-tuned / warmed up 3 epochs; hyperinf at its default damping).", "",
        "## Wall time (seconds, the whole command: data, fine-tune, gradients, scores, outputs)", "",
        "| model | n | audit --target (influence, unmixed) | audit --target (combined, mixed, × 1) "
        "| audit --target (today's default) | audit (self) | select --fraction 0.3 (without --evaluate's fine-tunes) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, n) in sorted({(r["model"], r["n"]) for r in runs}):
        sel = [cell[(model, n, c)]["seconds"] for c in CELLS if c.startswith("select") and (model, n, c) in cell]
        lines.append(f"| {model} | {n} | {_seconds(cell.get((model, n, 'audit-target')))} | "
                     f"{_seconds(cell.get((model, n, 'audit-combined')))} | "
                     f"{_seconds(cell.get((model, n, 'audit-default')))} | "
                     f"{_seconds(cell.get((model, n, 'audit-self')))} | "
                     f"{_f(statistics.mean(sel) if sel else None, '.0f')} |")
    if any(r.get("load_at_start", 0.0) >= BUSY for r in runs):
        lines += ["", f"\\* ran beside other jobs (1-minute load ≥ {BUSY} when the cell started): its time is not "
                  "comparable with the others."]
    lines += ["", "## audit: ranking the planted label errors", "",
              "ROC-AUC of the flipped rows by the command's score, and the fraction of them in the top 10% of "
              "`ranked.*` (random: AUC 0.5, found 0.10).", "",
              "The fine-tuned model's loss and accuracy (on the target, or on the training file without one) say "
              "how much it learned: loss ln 2 = 0.693 is chance.", "",
              "| model | n | flipped | signal | ROC-AUC | found in top 10% | model loss | model acc |",
              "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in sorted((r for r in runs if r["cell"].startswith("audit")), key=lambda r: (r["model"], r["n"], r["cell"])):
        lines.append(f"| {r['model']} | {r['n']} | {r['n_flipped']} | {r['signal']} "
                     f"({AUDIT_LABEL[r['cell']]}) | {r['auc']:.3f} | "
                     f"{r['found_at_10']:.3f} | {_f(r.get('model_loss'), '.4f')} | {_f(r.get('model_accuracy'))} |")
        for column, m in r.get("by_column", {}).items():
            if column != r["signal"]:
                lines.append(f"| | | | its part {column}{' (mixed)' if column == 'influence_score' else ''} | "
                             f"{m['auc']:.3f} | {m['found_at_10']:.3f} | | |")
    lines += ["", f"## select: fresh-LoRA target loss, selection vs a random subset (fraction {FRACTION})", "",
              "`select --evaluate`: fresh LoRA adapters (3 epochs) on the selected rows and on a random subset of "
              "the same size, loss on the target file; the pool holds the planted errors.", "",
              "| model | n | seed | rule | kept | selected: loss | random: loss | selected: acc | random: acc |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in runs if r["cell"].startswith("select")), key=lambda r: (r["model"], r["n"], r["seed"])):
        lines.append(f"| {r['model']} | {r['n']} | {r['seed']} | {r['rule']} | {r['n_selected']} | "
                     f"{r['selected_loss']:.4f} | {r['random_loss']:.4f} | {r['selected_accuracy']:.3f} | "
                     f"{r['random_accuracy']:.3f} |")
    for (model, n) in sorted({(r["model"], r["n"]) for r in runs if r["cell"].startswith("select")}):
        rs = [r for r in runs if r["cell"].startswith("select") and (r["model"], r["n"]) == (model, n)]
        wins = sum(r["selected_loss"] < r["random_loss"] for r in rs)
        diff = statistics.mean(r["selected_loss"] - r["random_loss"] for r in rs)
        lines.append(f"\n{model}, n = {n}: selection below random on {wins} of {len(rs)} seeds; mean loss "
                     f"difference {diff:+.4f}.")
    missing = [f"{m} n={n} {c}" for m in MODELS for n in SIZES for c in CELLS if (m, n, c) not in cell]
    if missing:
        lines += ["", "Not measured yet: " + ", ".join(missing) + "."]
    machines = sorted({r["machine"] for r in runs})
    lines += ["", "## Machine", "", *[f"- {m}" for m in machines], ""]
    REPORT.write_text("\n".join(lines), encoding="utf-8")


def rescore(work: Path) -> None:
    """Fill ``by_column`` of the audit records that lack it, from the outputs of the same run under ``work``
    (the ranked file and summary the command wrote; the planted lines drawn again from the same seed)."""
    runs = load_runs()
    for r in runs:
        out = work / f"{r['model']}-n{r['n']}" / r["cell"]
        if r["cell"].startswith("audit") and "by_column" not in r and (out / "summary.json").is_file():
            _, _, flipped = write_files(r["model"], r["n"], work / f"{r['model']}-n{r['n']}" / "data")
            r["by_column"] = column_metrics(out, flipped)
    tmp = RUNS.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in runs))
    tmp.replace(RUNS)  # the records are whole or as before


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma list of minilm, smollm2")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma list of pool sizes")
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma list of {', '.join(CELLS)}")
    p.add_argument("--work", type=Path, default=Path("/tmp/hyperinf-bench-user-commands"),
                   help="folder for the data files and the commands' outputs")
    p.add_argument("--threads", type=int, default=None, help="--threads passed to every command")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--rescore", action="store_true",
                   help="add the per-column metrics (by_column) to audit records whose outputs are still in --work")
    args = p.parse_args(argv)
    if args.rescore:
        rescore(args.work)
    if not args.report_only:
        done = {(r["model"], r["n"], r["cell"]) for r in load_runs()}
        for model in args.models.split(","):
            for n in map(int, args.sizes.split(",")):
                for cell in args.cells.split(","):
                    if (model, n, cell) in done:
                        continue
                    print(f"user_commands: {model} n={n} {cell}", file=sys.stderr, flush=True)
                    record = run_cell(model, n, cell, args.work, args.threads)
                    with open(RUNS, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                    write_report(load_runs())
    write_report(load_runs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
