"""VLM data selection vs random subsets of the same size, over seeds (issue #27, item 4).

Protocol, per seed: ``select`` (the command) on a vision-language model folder — warm up a LoRA on a
random part of the image + text instruction pool, fit HyperINF, score every pool example against the
target set, keep ``--fraction`` of the pool — then ``--evaluate`` trains a fresh LoRA (same initial
adapter, same recipe and seed) on the kept set and on a random set of the same size and reports the
target loss and answer exact-match accuracy of both.  The table says per seed and on average whether
the selected set beats random (lower target loss).

No embedded real VLM exists (no package on PyPI ships small VLM weights that load offline with
transformers; see docs/cli.md, "Vision-language models"), so ``--model`` is a VLM folder you bring
(e.g. SmolVLM-256M-Instruct saved with ``save_pretrained`` for model and processor), with JSONL files
whose rows name their images.  ``--tiny`` builds a tiny random LLaVA or Idefics3 (tests/tiny_vlm.py)
and a coloured-square image set in ``--out`` to check the protocol end to end (its numbers mean nothing).

    python -m bench.vlm_selection --model DIR --pool pool.jsonl --target target.jsonl --fraction 0.2
    python -m bench.vlm_selection --tiny llava --out /tmp/vlm-sel --seeds 0      # protocol check, ~20 s

Outputs in ``--out``: ``runs.jsonl`` (one record per seed: settings, losses, accuracies, sizes, seconds)
and ``VLM_SELECTION.md`` (the table).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]


def tiny_setup(kind: str, out: Path, n_pool: int = 12, n_target: int = 4) -> tuple[Path, Path, Path]:
    """A tiny random VLM of ``kind`` and pool/target files over generated PNGs, under ``out``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_vlm import make_tiny_vlm, vlm_rows, write_images, write_rows

    model = out / f"tiny-{kind}"
    if not (model / "config.json").is_file():
        make_tiny_vlm(model, kind)
    images = write_images(out / "images", n_pool + n_target)
    pool = write_rows(out / "pool.jsonl", vlm_rows(images[:n_pool], relative_to=out))
    target = write_rows(out / "target.jsonl", vlm_rows(images[n_pool:], relative_to=out))
    return model, pool, target


def run_seed(model: Path, pool: Path, target: Path, out: Path, *, seed: int, fraction: float, epochs: int,
             extra: Sequence[str] = ()) -> dict[str, Any]:
    """One ``select --evaluate`` run; returns its record (raises when the command fails)."""
    from hyperinf_ext.app.cli import main

    run_dir = out / f"seed{seed}"
    argv = ["select", "--model", str(model), "--pool", str(pool), "--target", str(target), "--fraction",
            str(fraction), "--evaluate", "--epochs", str(epochs), "--seed", str(seed), "--out", str(run_dir),
            "--no-progress", *extra]
    t0 = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"select failed (exit {rc}) for seed {seed}: {' '.join(argv)}")
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = summary["evaluation"]
    return {"seed": seed, "model": str(model), "pool": str(pool), "target": str(target), "fraction": fraction,
            "epochs": epochs, "n_pool": summary["n_pool"], "n_target": summary["n_target"],
            "n_selected": summary["n_selected"], "method": summary["method"], "damping": summary["damping"],
            "selected_loss": ev["selected"]["val_loss"], "selected_accuracy": ev["selected"]["val_accuracy"],
            "random_loss": ev["random"]["val_loss"], "random_accuracy": ev["random"]["val_accuracy"],
            "seconds": time.perf_counter() - t0}


def report(records: list[dict[str, Any]]) -> str:
    """The markdown table: per seed and the mean, selected vs random target loss/accuracy."""
    lines = ["# VLM data selection vs random", "",
             f"Model `{records[0]['model']}`, pool `{records[0]['pool']}` ({records[0]['n_pool']} examples), "
             f"target `{records[0]['target']}` ({records[0]['n_target']}), keep {records[0]['fraction']:g} "
             f"({records[0]['n_selected']} examples), {records[0]['epochs']} epoch(s), "
             f"{records[0]['method']} / damping {records[0]['damping']}.", "",
             "| seed | selected loss | random loss | selected acc | random acc | selected wins |",
             "|---:|---:|---:|---:|---:|:---:|"]
    for r in records:
        lines.append(f"| {r['seed']} | {r['selected_loss']:.4f} | {r['random_loss']:.4f} | "
                     f"{r['selected_accuracy']:.3f} | {r['random_accuracy']:.3f} | "
                     f"{'yes' if r['selected_loss'] < r['random_loss'] else 'no'} |")
    mean = {k: statistics.fmean(r[k] for r in records)
            for k in ("selected_loss", "random_loss", "selected_accuracy", "random_accuracy")}
    wins = sum(r["selected_loss"] < r["random_loss"] for r in records)
    lines.append(f"| mean | {mean['selected_loss']:.4f} | {mean['random_loss']:.4f} | "
                 f"{mean['selected_accuracy']:.3f} | {mean['random_accuracy']:.3f} | {wins}/{len(records)} |")
    return "\n".join(lines) + "\n"


def run_protocol(model: Path, pool: Path, target: Path, out: Path, *, seeds: Sequence[int] = (0, 1, 2),
                 fraction: float = 0.2, epochs: int = 3, extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every seed's run → ``out/runs.jsonl`` and ``out/VLM_SELECTION.md``; returns the records."""
    out.mkdir(parents=True, exist_ok=True)
    records = [run_seed(model, pool, target, out, seed=s, fraction=fraction, epochs=epochs, extra=extra)
               for s in seeds]
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "VLM_SELECTION.md").write_text(report(records))
    return records


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a vision-language model folder (model + processor)")
    p.add_argument("--pool", type=Path, help="instruction pool (JSONL rows with image paths)")
    p.add_argument("--target", type=Path, help="target set, same format")
    p.add_argument("--tiny", choices=("llava", "idefics3"), help="build a tiny random VLM and data instead")
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("hyperinf-out/vlm-selection"))
    args, extra = p.parse_known_args(argv)
    if args.tiny:
        model, pool, target = tiny_setup(args.tiny, args.out)
    elif args.model and args.pool and args.target:
        model, pool, target = args.model, args.pool, args.target
    else:
        p.error("give --model, --pool and --target (no embedded VLM exists), or --tiny KIND for a protocol check")
    records = run_protocol(model, pool, target, args.out, seeds=args.seeds, fraction=args.fraction,
                           epochs=args.epochs, extra=extra)
    print(report(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
