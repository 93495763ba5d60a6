"""Padding waste of a causal-LM fit and what length grouping saves (issue #23 item 4).

    python -m bench.bench_bucketing [--n 2000] [--fit-n 96] [--batch-size 8] [--max-length 128] [--threads 1]

On the embedded LLM (SmolLM2-135M-Instruct) and its data (Rotten Tomatoes snippets as sentiment
instructions, in the chat template): the padded tokens of batches in dataset order against batches of
length-grouped rows (what the commands' loaders do, ``sort_by_length``, and what ``HyperINFCallback`` now
does, ``group_by_length``), counted for every training-set size in ``--sizes``; then the wall time of a
``HyperINF.fit`` over ``--fit-n`` examples in each order, interleaved (A B A B) so that load on the machine
hits both alike.  Writes bench/BUCKETING.md and appends to bench/bucketing_runs.jsonl.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _padded(lengths: list[int], order: list[int], batch: int) -> int:
    return sum(max(lengths[i] for i in order[s:s + batch]) * len(order[s:s + batch])
               for s in range(0, len(order), batch))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="300,2000")
    p.add_argument("--fit-n", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from hyperinf_ext import HyperINF
    from hyperinf_ext.app.data import split_dataset
    from hyperinf_ext.app.data.instruction import encode_instructions, ensure_pad_token, rotten_tomatoes_instructions
    from hyperinf_ext.app.models.causal import load_causal_lora_model
    from hyperinf_ext.app.models.llm import smollm2_model_dir
    from hyperinf_ext.integrations.transformers import ExampleBatches

    from .inputs import pad_causal_batch, randomize_lora_B

    folder = smollm2_model_dir()
    tok = load_tokenizer_for(folder)
    ensure_pad_token(tok)
    data = rotten_tomatoes_instructions()
    rows_out = []
    for n in [int(x) for x in a.sizes.split(",")]:
        train, _ = split_dataset(data, n, 1, seed=0)
        enc = encode_instructions(train, tok, a.max_length).encodings
        lengths = [len(e["input_ids"]) for e in enc]
        plain = _padded(lengths, list(range(n)), a.batch_size)
        grouped = _padded(lengths, sorted(range(n), key=lambda i: lengths[i]), a.batch_size)
        real = sum(lengths)
        rows_out.append({"n": n, "real_tokens": real, "padded_dataset_order": plain, "padded_grouped": grouped,
                         "waste_dataset_order": 1 - real / plain, "waste_grouped": 1 - real / grouped,
                         "token_ratio": plain / grouped})
        print(json.dumps(rows_out[-1]), flush=True)

    # the fit in both orders, through HyperINFCallback's batching (the Trainer path)
    train, _ = split_dataset(data, a.fit_n, 1, seed=0)
    enc = encode_instructions(train, tok, a.max_length).encodings
    items = [dict(e) for e in enc]
    def collate(rows: list[dict]) -> dict:
        return pad_causal_batch(rows, tok.pad_token_id)

    model = load_causal_lora_model(folder, seed=0)
    randomize_lora_B(model, std=0.01)
    loaders = {"dataset order": ExampleBatches(items, collate, a.batch_size),
               "grouped": ExampleBatches(items, collate, a.batch_size, group_by_length=True)}
    HyperINF(model, progress=False, cache="none").fit(loaders["grouped"])  # warm-up
    times = {k: [] for k in loaders}
    scores = {}
    for _ in range(a.repeats):
        for name, loader in loaders.items():
            t0 = time.perf_counter()
            attr = HyperINF(model, progress=False, cache="none").fit(loader)
            times[name].append(time.perf_counter() - t0)
            scores[name] = attr.self_scores(loader)
    agree = float((scores["grouped"] - scores["dataset order"]).abs().max() / scores["dataset order"].abs().max())
    fit = {"n": a.fit_n, "batch_size": a.batch_size, "threads": a.threads,
           "seconds_dataset_order": min(times["dataset order"]), "seconds_grouped": min(times["grouped"]),
           "padded_dataset_order": sum(b["input_ids"].numel() for b in loaders["dataset order"]),
           "padded_grouped": sum(b["input_ids"].numel() for b in loaders["grouped"]),
           "self_influence_max_rel_diff": agree}
    fit["speedup"] = fit["seconds_dataset_order"] / fit["seconds_grouped"]
    print(json.dumps(fit), flush=True)
    rec = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "batch_size": a.batch_size,
           "max_length": a.max_length, "padding": rows_out, "fit": fit}
    with open(HERE / "bucketing_runs.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    lines = [
        "# Padding waste and length grouping on the embedded LLM (issue #23 item 4)",
        "",
        f"`python -m bench.bench_bucketing` ({rec['when']}; SmolLM2-135M-Instruct, Rotten Tomatoes sentiment "
        f"instructions in the chat template, batch {a.batch_size}, max length {a.max_length}). Waste = pad "
        "tokens / padded tokens.",
        "",
        "| examples | real tokens | padded, dataset order | waste | padded, grouped by length | waste | ratio |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r['n']} | {r['real_tokens']} | {r['padded_dataset_order']} | {r['waste_dataset_order']:.1%} | "
          f"{r['padded_grouped']} | {r['waste_grouped']:.1%} | {r['token_ratio']:.2f}× |" for r in rows_out),
        "",
        f"Fit of {fit['n']} examples (`HyperINF.fit` through `HyperINFCallback`'s batches, {a.threads} thread, best "
        f"of {a.repeats}, interleaved): dataset order {fit['seconds_dataset_order']:.1f} s "
        f"({fit['padded_dataset_order']} padded tokens), grouped {fit['seconds_grouped']:.1f} s "
        f"({fit['padded_grouped']} tokens): **{fit['speedup']:.2f}×**; self-influence of the two fits agrees to "
        f"{fit['self_influence_max_rel_diff']:.1e} of its largest value (float32 model).",
        "",
        "The commands' loaders were already length-sorted (`make_loader(sort_by_length=True)`); the Trainer "
        "callback's batches were in dataset order until `group_by_length=True` became its default. A loader "
        "you pass to `HyperINF.fit` yourself is used as given: sort it by length for the same saving.",
    ]
    (HERE / "BUCKETING.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def load_tokenizer_for(folder):
    from hyperinf_ext.app.models.training import load_tokenizer

    return load_tokenizer(folder)


if __name__ == "__main__":
    main()
