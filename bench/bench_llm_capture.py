"""Influence overhead on the embedded causal LM (SmolLM2-135M-Instruct + LoRA r=8 on q/v, lora_B nonzero).

ours = HyperINF.fit (per-example gradients, GFIM, cache) + mean_scores over the Rotten Tomatoes
instructions; forward/backward = the same batched passes with no hooks (the model's own cost);
influence overhead = (ours − forward/backward) / ours, medians of interleaved repeats, as
bench_pipeline.py measures it on MiniLM.

    HYPERINF_CACHE=... python -m bench.bench_llm_capture --n-train 64 --n-val 16 --repeats 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from hyperinf_ext import HyperINF
    from hyperinf_ext.app.models.causal import load_causal_lora_model
    from hyperinf_ext.app.data import make_loader, split_dataset
    from hyperinf_ext.app.data.instruction import encode_instructions, ensure_pad_token, rotten_tomatoes_instructions
    from hyperinf_ext.app.models.llm import smollm2_model_dir
    from hyperinf_ext.app.models.training import load_tokenizer

    from .baselines import forward_backward

    folder = smollm2_model_dir(log=print)
    tok = load_tokenizer(folder)
    ensure_pad_token(tok)
    model = load_causal_lora_model(folder, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    train, val = split_dataset(rotten_tomatoes_instructions(), args.n_train, args.n_val, seed=0)
    loaders = [make_loader(ds, tok, batch_size=args.batch_size, sort_by_length=True, max_length=args.max_length,
                           encodings=encode_instructions(ds, tok, args.max_length).encodings) for ds in (train, val)]
    tokens = sum(sum(loader.token_lengths) for loader in loaders)

    def ours() -> dict:
        attr = HyperINF(model, progress=False).fit(loaders[0])
        attr.mean_scores(loaders[1])
        return dict(attr.timings)

    layers = HyperINF(model, progress=False).layers
    # warm-up (first-call costs of the model and hooks) on one batch, not a whole run: on 2 cores a run is minutes
    first = next(iter(loaders[0]))
    HyperINF(model, method="tracin", progress=False).fit([first])
    t_ours, t_fb, stages = [], [], {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        stages = ours()
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        forward_backward(model, loaders, layers)
        t_fb.append(time.perf_counter() - t0)
    mo, mf = statistics.median(t_ours), statistics.median(t_fb)
    print(f"SmolLM2-135M + LoRA r=8 q/v ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable), "
          f"{args.n_train} train + {args.n_val} val examples, {tokens} tokens, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}")
    print(f"ours (fit + mean_scores): {['%.2f' % t for t in t_ours]} s, median {mo:.2f} s")
    print(f"forward/backward only:    {['%.2f' % t for t in t_fb]} s, median {mf:.2f} s")
    print(f"influence overhead = (ours - fb) / ours = {100 * (mo - mf) / mo:.1f}%")
    print("stages of the last run: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))


if __name__ == "__main__":
    main()
