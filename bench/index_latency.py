"""What an index saves per question on the embedded LLM (issue #28): build once, then query 1, 10 and 100 questions,
against today's ``attribute`` that recomputes the 2,000 training gradients for every question set.

Data: the embedded Rotten Tomatoes sentiment instructions (2,000 training prompts, up to 100 queries from the
rest), SmolLM2-135M-Instruct with a fresh LoRA r=8 on q/v whose B matrices are drawn N(0, 0.02²) (seed 0;
timing does not depend on what the adapter learned, and a zero B would zero half the gradients).  Measured
two ways, each in the same run:

* end to end on the command line (fresh processes: model loading included): ``attribute`` for 10 queries,
  ``index build`` (proj_dim 1024), ``index query`` for 1, 10 and 100 queries;
* in one process with the model loaded (the API: ``Index.open`` once, then ``query``), against
  ``HyperINF.fit`` + ``scores(top_k=10)`` for the same 10 queries.

    python -m bench.index_latency                 # ~25 min on 2 cores; appends bench/index_runs.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.records import append as append_record

HERE = Path(__file__).resolve().parent
RUNS = HERE / "index_runs.jsonl"


def _cli(args: list[str], threads: int) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hyperinf_ext", *args, "--no-progress", "--threads", str(threads)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.index_latency", description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--proj-dim", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-api-baseline", action="store_true",
                   help="skip the in-process fit + scores baseline (a second full pass over the training data)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from hyperinf_ext import HyperINF
    from hyperinf_ext.app.data.instruction import rotten_tomatoes_instructions
    from hyperinf_ext.app.tasks.pipeline import PipelineConfig, load_model

    ds = rotten_tomatoes_instructions()
    work = Path(tempfile.mkdtemp(prefix="hyperinf-index-latency-", dir="/tmp"))

    def write(path: Path, rows: range) -> Path:
        with path.open("w") as fh:
            for i in rows:
                fh.write(json.dumps({"prompt": ds.texts[i], "response": ds.label_names[ds.labels[i]]}) + "\n")
        return path

    n = args.n_train
    train = write(work / "train.jsonl", range(n))
    queries = {q: write(work / f"query{q}.jsonl", range(n, n + q)) for q in (1, 10, 100)}
    cfg = PipelineConfig(model="smollm2", max_length=128, seed=0, progress=False)
    model = load_model(cfg, 2, adapter=None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
    model.save_pretrained(str(work / "adapter"))
    common = ["--model", "smollm2", "--adapter", str(work / "adapter")]
    rec = {"setting": {"model": "smollm2", "kind": "latency"}, "n_train": n, "proj_dim": args.proj_dim,
           "threads": args.threads}
    rec["cli_attribute_10"] = _cli(["attribute", *common, "--train", str(train), "--query", str(queries[10]),
                                    "--top-k", "10", "--out", str(work / "attr")], args.threads)
    print(f"[latency] attribute (10 queries): {rec['cli_attribute_10']:.1f} s", flush=True)
    rec["cli_build"] = _cli(["index", "build", *common, "--train", str(train), "--proj-dim", str(args.proj_dim),
                             "--out", str(work / "idx")], args.threads)
    print(f"[latency] index build: {rec['cli_build']:.1f} s", flush=True)
    for q, path in queries.items():
        rec[f"cli_query_{q}"] = _cli(["index", "query", str(work / "idx"), "--query", str(path), "--top-k", "10",
                                      "--out", str(work / f"q{q}")], args.threads)
        print(f"[latency] index query ({q}): {rec[f'cli_query_{q}']:.1f} s", flush=True)
    # in one process, the model loaded once
    from hyperinf_ext.app.tasks.index_task import open_index
    from hyperinf_ext.app.tasks.index_task import read_examples
    from hyperinf_ext.app.tasks.pipeline import PreparedData, build_loaders
    import numpy as np

    t0 = time.perf_counter()
    idx, source, tok = open_index(work / "idx", "cpu", False, True)
    rec["api_open"] = time.perf_counter() - t0
    print(f"[latency] API open: {rec['api_open']:.1f} s", flush=True)
    rec["bytes_per_example"] = idx.bytes_per_example
    rec["float32_bytes_per_example"] = 4 * sum(pl.rank * pl.dim for pl in idx.plans)
    mcfg = PipelineConfig(model="smollm2", max_length=128, progress=False)
    loaders = {}
    for q, path in queries.items():
        qs = read_examples(path, mcfg, True)
        data = PreparedData(qs, qs, [], np.zeros(0, dtype=bool), str(path), len(qs), True)
        loaders[q] = build_loaders(mcfg, data, tok).influence_val
    for q in (1, 10, 100):
        t0 = time.perf_counter()
        idx.query(loaders[q], top_k=10)
        rec[f"api_query_{q}"] = time.perf_counter() - t0
        print(f"[latency] API query ({q}): {rec[f'api_query_{q}']:.2f} s", flush=True)
    if args.no_api_baseline:
        rec["api_attribute_10"] = None
        append_record(RUNS, rec)
        return 0
    trainset = read_examples(train, mcfg, True)
    data = PreparedData(trainset, trainset, [], np.zeros(0, dtype=bool), str(train), n, True)
    train_loader = build_loaders(mcfg, data, tok).influence_train
    t0 = time.perf_counter()
    attr = HyperINF(idx.attributor.model, progress=False, cache="disk").fit(train_loader)
    attr.scores(loaders[10], top_k=10)
    rec["api_attribute_10"] = time.perf_counter() - t0
    attr.cache.close()
    print(f"[latency] API fit + scores (10): {rec['api_attribute_10']:.1f} s", flush=True)
    append_record(RUNS, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
