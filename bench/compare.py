"""Run the whole benchmark set, print the ratio tables and rewrite bench/RESULTS.md.

    python -m bench.compare                 # full sizes (budgeted for < 15 min on 2 quiet cores)
    python -m bench.compare --quick         # tiny sizes (< ~1 min): checks that everything runs;
                                            # writes bench/RESULTS.quick.md unless --out is given
    python -m bench.compare --only inverse,ihvp --threads 1   # regenerate two sections of bench/RESULTS.md

Sections: gfim, inverse, ihvp, llm, fp32_accuracy, solver_costs, pipeline (in that order; pipeline
last: it starts subprocesses for the peak-memory runs).  Every number a section shows was measured in
the run that wrote it; the targets and the "which solver when" advice are computed from those
numbers.  A section that fails is reported with its error and the others still run.

Merging: with --only/--skip, the sections run replace theirs in the existing output file and the
others are kept as they were (each section carries the command, date and thread count of the run
that measured it); --no-merge writes only the sections run.  The file marks each section's parts
with HTML comments (``<!-- results:inverse -->`` … ``<!-- /results:inverse -->``) for this.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import re
import resource
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from . import bench_gfim, bench_ihvp, bench_inverse, bench_llm_layers, bench_pipeline, fp32_accuracy, solver_costs
from .timing import Section, TimerConfig, fmt_time, load_average, machine_info

SECTIONS = {
    "gfim": bench_gfim,
    "inverse": bench_inverse,
    "ihvp": bench_ihvp,
    "llm": bench_llm_layers,
    "fp32_accuracy": fp32_accuracy,
    "solver_costs": solver_costs,
    "pipeline": bench_pipeline,
}
PARTS = ("targets", "facts", "advice", "results")
MARK = re.compile(r"<!-- (targets|facts|advice|results):(\w+) -->\n(.*?)<!-- /\1:\2 -->\n?", re.S)
HERE = Path(__file__).resolve().parent
FULL_TIMER = TimerConfig(warmup=1, repeats=5, min_repeats=2, budget_s=6.0)
QUICK_TIMER = TimerConfig(warmup=1, repeats=2, min_repeats=1, budget_s=0.2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script works (< ~1 min)")
    p.add_argument("--out", default=None, help="Markdown output (default bench/RESULTS.md; bench/RESULTS.quick.md with --quick)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N) before running (default: torch's own; 1 with --quick)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--no-merge", action="store_true", help="with --only/--skip: write only the sections run "
                   "(default: merge them into the existing output file, keeping the other sections)")
    p.add_argument("--repeats", type=int, default=0, help="max timed repeats per candidate (default 5, quick 2)")
    p.add_argument("--budget", type=float, default=0.0, help="seconds of timed runs per candidate before stopping "
                   "repeats (at least 2 are kept; default 6, quick 0.2)")
    return p.parse_args(argv)


def section_blocks(name: str, s: Section, stamp: str) -> dict[str, str]:
    """The Markdown of one section's parts (targets, facts, advice, results), each ending with a newline."""
    blocks = {
        "targets": "".join(f"- **{'met' if t.met else ('MISSED' if t.met is False else 'n/a')}** — {t.name}: {t.detail}\n"
                           for t in s.targets),
        "facts": "".join(f"- {n}\n" for n in s.notes),
        "advice": "".join(f"- {a}\n" for a in s.advice),
    }
    res = [f"### {s.name} ({fmt_time(s.seconds)})", "", f"_{stamp}_", ""]
    if s.error:
        res += ["```", s.error, "```", ""]
    for t in s.tables:
        res += [t.markdown(), ""]
    blocks["results"] = "\n".join(res) + "\n"
    return blocks


def parse_blocks(text: str) -> dict[str, dict[str, str]]:
    """{section: {part: Markdown}} from a file written by :func:`render` (empty for a file without markers)."""
    out: dict[str, dict[str, str]] = {}
    for part, name, body in MARK.findall(text):
        out.setdefault(name, {})[part] = body
    return out


def render(blocks: dict[str, dict[str, str]], info: dict, command: str, quick: bool, total_s: float, load_end: str,
           ran: list[str]) -> str:
    names = [n for n in SECTIONS if n in blocks] + [n for n in blocks if n not in SECTIONS]
    kept = [n for n in names if n not in ran]
    out = ["# hyperinf-ext benchmark results", ""]
    if quick:
        out += ["> **QUICK RUN** (tiny sizes, only checks that the suite works): the numbers below say nothing "
                "about performance.", ""]
    out += [f"Last run: `{command}` on {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} in {fmt_time(total_s)}, "
            f"sections {', '.join(ran) or '—'}"
            + (f"; kept from earlier runs: {', '.join(kept)}" if kept else "")
            + ".  Every number below was measured in the run named under its section's heading (targets and advice "
            "are computed from them); ratios are only ever taken within one run.", ""]
    out += ["## Machine (last run)", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in info.items()]
    out += [f"| load average at end (1/5/15 min) | {load_end} |", ""]
    out += ["A load average well above the number of cores means other work shared the CPU: the timings (and "
            "their ± spreads) are then noisy.", ""]

    def part(p: str) -> list[str]:
        lines = []
        for n in names:
            body = blocks[n].get(p, "")
            if body.strip():
                lines += [f"<!-- {p}:{n} -->", body.rstrip("\n"), f"<!-- /{p}:{n} -->"]
        return lines

    targets = part("targets")
    n_met = sum(line.startswith("- **met**") for line in "\n".join(targets).splitlines())
    n_missed = sum(line.startswith("- **MISSED**") for line in "\n".join(targets).splitlines())
    out += ["## Targets", ""] + targets + ["", f"{n_met} met, {n_missed} missed.", ""]
    facts = part("facts")
    if facts:
        out += ["Facts behind them (computed):", ""] + facts + [""]
    advice = part("advice")
    out += ["## Which solver when (computed on this machine)", ""]
    out += advice if advice else ["- (no inverse-HVP / inverse results in this run)"]
    out += ["", "## Results", ""]
    for n in names:
        body = blocks[n].get("results", "")
        if body.strip():
            out += [f"<!-- results:{n} -->", body.rstrip("\n"), f"<!-- /results:{n} -->", ""]
    out += ["## Method", "",
            "- Each case times ours and its baselines in the same process on the same inputs, interleaved round-robin "
            "(so load changes hit all of them alike), after warm-up; the table shows the median of the timed repeats, "
            "± (max − min)/median, and n = repeats.  Slow candidates get fewer repeats (a time budget per candidate, "
            "at least 2 in the full run); pipeline runs are single timed runs after a warm-up on a subset (see its notes).",
            "- Ratios are of medians (the solver cost model's check: of the fastest repeats). Linear extrapolations (fewer "
            "samples, fewer matrices, fewer layers, fewer CG iterations) are stated in the table where they are used.",
            "- Triton is excluded from timing (on CPU it runs only under its interpreter); its kernels are compiled "
            "ahead of time for sm_80/sm_90 and their PTX facts reported.",
            "- Thread count: each section's run line says how many torch threads its run used.",
            "- float64 references (inverse, solve) are LU solves one matrix at a time: in torch 2.13's CPU build batched "
            "torch.linalg.inv/solve fail (\"Pivots given to lu_solve must all be greater or equal to 1\") once the "
            "process ran with 2+ threads.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads == 0 and args.quick:
        args.threads = 1  # a smoke run: one thread is robust on a shared machine (no OpenMP oversubscription)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timer = dataclasses.replace(QUICK_TIMER if args.quick else FULL_TIMER)
    if args.repeats:
        timer.repeats = args.repeats
    if args.budget:
        timer.budget_s = args.budget
    only = [s for s in args.only.split(",") if s]
    skip = {s for s in args.skip.split(",") if s}
    unknown = [s for s in only + list(skip) if s not in SECTIONS]
    if unknown:
        print(f"unknown section(s): {unknown}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    names = [n for n in SECTIONS if (not only or n in only) and n not in skip]
    out = Path(args.out) if args.out else HERE / ("RESULTS.quick.md" if args.quick else "RESULTS.md")
    old_blocks: dict[str, dict[str, str]] = {}
    subset = set(names) != set(SECTIONS)
    if subset and not args.no_merge and out.exists():
        old_blocks = parse_blocks(out.read_text())
        if not old_blocks:
            print(f"{out} has no section markers to merge into; pass --no-merge to overwrite it with only "
                  f"{names}, or --out elsewhere", file=sys.stderr)
            return 2
    command = "python -m bench.compare" + (" " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])) if (argv or sys.argv[1:]) else "")
    info = machine_info()
    print(f"# {command}\n# " + "\n# ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    t_start = time.perf_counter()
    sections: list[Section] = []
    blocks = {n: b for n, b in old_blocks.items() if n not in names}
    for name in names:
        load0 = load_average()
        print(f"\n######## {name} (started at +{fmt_time(time.perf_counter() - t_start)}, load {load0})", flush=True)
        t0 = time.perf_counter()
        try:
            sec = SECTIONS[name].section(args.quick, timer)
        except Exception:  # noqa: BLE001 - report and go on
            sec = Section(name, error=traceback.format_exc(limit=6))
            print(sec.error, file=sys.stderr, flush=True)
        sec.seconds = time.perf_counter() - t0
        sections.append(sec)
        stamp = (f"Measured by `{command}` on {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, "
                 f"{torch.get_num_threads()} torch thread(s), load average at its start {load0}, git {info.get('git', '?')}.")
        blocks[name] = section_blocks(name, sec, stamp)
        for t in sec.tables:
            print(t.text(), flush=True)
            print(flush=True)
        for t in sec.targets:
            print(f"  target {'MET' if t.met else 'MISSED' if t.met is False else 'n/a'}: {t.name}: {t.detail}", flush=True)
        print(f"  ({name}: {fmt_time(sec.seconds)})", flush=True)
    total = time.perf_counter() - t_start
    ru_self, ru_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru_self.ru_utime + ru_self.ru_stime
    cpu_children = ru_children.ru_utime + ru_children.ru_stime
    info["CPU time of this run"] = (f"{fmt_time(cpu)} in this process + {fmt_time(cpu_children)} in subprocesses, over "
                                    f"{fmt_time(total)} wall: the run used {(cpu + cpu_children) / total:.2f} cores on average "
                                    f"({torch.get_num_threads()} thread(s) in this process; far below the thread count = "
                                    f"the CPU was shared with other work)")
    text = render(blocks, info, command, args.quick, total, load_average(), names)
    out.write_text(text)
    print("\n######## which solver when")
    for s in sections:
        for a in s.advice:
            print(f"  - {a}")
    kept = [n for n in blocks if n not in names]
    print(f"\nwrote {out} (total {fmt_time(total)})" + (f"; kept from the earlier file: {', '.join(kept)}" if kept else ""))
    return 1 if any(s.error for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
