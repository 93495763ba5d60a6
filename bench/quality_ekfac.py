"""Kronfluence EK-FAC as a baseline of the detection-quality study (bench/quality.py).

For every configuration of ``bench.quality.grid(False)`` the model is retrained with
``bench.quality.train_config`` (same seed, same data, same flipped labels, so the same model as the
study up to floating-point thread effects; the validation accuracy is printed beside the one recorded in
``bench/quality_runs.jsonl``), then Kronfluence 1.0.1 scores the influence of every training example on
the mean validation loss with EK-FAC:

* Tracked modules: exactly the ``nn.Linear`` modules hyperinf_ext.capture.find_gradient_layers returns
  with ``include_heads=True`` (HyperINF's default): for each of the 6 encoder layers the ``lora_A`` and
  ``lora_B`` Linear of the ``default`` adapter on attention ``query`` and ``value`` (24 modules, no
  bias), plus the ``nn.Linear`` classifier copy PEFT trains through ``modules_to_save`` (384 -> 2 with
  bias; Kronfluence appends the constant 1 to its input, as our head layer does). Nothing else (base
  weights, embeddings) is tracked. Token-level inputs of the LoRA modules are masked with the batch's
  attention mask (Task.get_attention_mask), so padding does not enter the covariances.
* Loss: cross-entropy, as hyperinf_ext.capture.classification_loss; the training loss is SUMMED over
  the batch (Kronfluence's Task.compute_train_loss contract); with ``sample=True`` (Kronfluence's
  default true-Fisher factors, ``use_empirical_fisher=False``) labels are drawn from the model's
  softmax. Measurement = the summed validation cross-entropy of the query batch; pairwise scores
  [n_val, n_train] are averaged over validation rows (= influence on the mean validation loss).
* Curvature: FactorArguments(strategy="ekfac") defaults (float32 covariances, float64
  eigendecomposition). Damping: ScoreArguments(damping_factor=None) = Kronfluence's heuristic
  0.1 x mean eigenvalue (per module). Note that 1.0.1's *default* damping_factor is 1e-8; the heuristic
  is the documented alternative, used here because it is the rule EK-FAC libraries recommend
  (0.1 × mean eigenvalue) and the one our "spectral" rule mirrors.
* Sign: Kronfluence's pairwise score is the plain product grad f(query)^T (G + lambda I)^-1 grad L(train)
  (kronfluence/module/linear.py compute_pairwise_score, no minus sign anywhere in the score path), i.e.
  Grosse et al. (2023) Eq. 5 *without* its leading minus: a positive score means up-weighting the
  training example LOWERS the query loss (helpful). Ours is positive = raises the loss (suspicious), so
  the scores are negated. Checked empirically: the Spearman correlation with
  ``HyperINF(model).use("exact", damping="datainf").mean_scores`` on the same model is printed and
  recorded (it must be clearly positive).

Install (keeps the CPU torch): ``pip install --no-deps kronfluence==1.0.1 einops opt_einsum einconv``.

    python -m bench.quality_ekfac            # the 8 configurations, resumable -> bench/quality_ekfac_runs.jsonl
    python -m bench.quality_ekfac --quick    # the tiny smoke configuration -> /tmp
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from bench.quality import HERE, grid, load_runs, train_config
from bench.records import append as append_record

LABEL = "kronfluence EK-FAC"


def tracked_module_names(model: torch.nn.Module) -> list[str]:
    """``named_modules`` names of the Linear modules our attributor captures (by identity)."""
    from hyperinf_ext.capture import find_gradient_layers

    wanted = {id(g.module) for g in find_gradient_layers(model, include_heads=True)}
    names = [n for n, m in model.named_modules() if id(m) in wanted]
    if len(names) != len(wanted):
        raise RuntimeError(f"found {len(names)} of {len(wanted)} gradient layers among named_modules")
    return names


def make_task(names: list[str]):
    import torch.nn.functional as F
    from kronfluence.task import Task

    from hyperinf_ext.capture import model_inputs

    class LoraClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(**model_inputs(batch)).logits
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).squeeze(-1)
            else:
                labels = batch["labels"]
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            logits = model(**model_inputs(batch)).logits
            return F.cross_entropy(logits, batch["labels"], reduction="sum")

        def get_influence_tracked_modules(self):
            return list(names)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LoraClassificationTask()


def ekfac_mean_scores(model, tok, train, val, workdir: str) -> tuple[torch.Tensor, float]:
    """Our-sign EK-FAC influence of each training example on the mean validation loss, and seconds."""
    pairwise, seconds = ekfac_pairwise_scores(model, tok, train, val, workdir)
    return pairwise.mean(dim=0), seconds


def ekfac_pairwise_scores(model, tok, train, val, workdir: str, max_length: int = 64) -> tuple[torch.Tensor, float]:
    """Our-sign EK-FAC influence [n_val, n_train] (float64) of each training example on each validation
    loss, and seconds (also used per query by bench/lds.py).  ``model`` is wrapped and frozen in place."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from hyperinf_ext.app.data import Collator, make_loader

    t0 = time.perf_counter()
    torch.manual_seed(0)  # the true-Fisher factors sample labels from the model: make them reproducible
    names = tracked_module_names(model)
    task = make_task(names)
    model = prepare_model(model, task)  # eval mode, all params frozen, TrackedModule wrappers
    analyzer = Analyzer("quality", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=workdir)
    # Same items as our loaders; Kronfluence iterates sequentially, so column k = training example k. One
    # collate_fn serves both data sets, so it tokenizes the texts (no per-data-set token cache; same output).
    train_loader = make_loader(train, tok, batch_size=32, max_length=max_length)
    val_loader = make_loader(val, tok, batch_size=32, max_length=max_length)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=Collator(tok, max_length=max_length)))
    analyzer.fit_all_factors("ekfac", dataset=train_loader.dataset, per_device_batch_size=32,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(
        "pairwise", factors_name="ekfac", query_dataset=val_loader.dataset, train_dataset=train_loader.dataset,
        per_device_query_batch_size=len(val), per_device_train_batch_size=32,
        score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
    pairwise = analyzer.load_pairwise_scores("pairwise")["all_modules"]  # [n_val, n_train]
    if tuple(pairwise.shape) != (len(val), len(train)):
        raise RuntimeError(f"pairwise scores of shape {tuple(pairwise.shape)}")
    # Kronfluence: positive = helpful (lowers the query loss); ours: positive = raises it.
    return -pairwise.double(), time.perf_counter() - t0


def run_one(cfg, recorded: dict, progress: bool) -> dict:
    from hyperinf_ext import HyperINF
    from hyperinf_ext.app.data import make_loader
    from hyperinf_ext.app.tasks.metrics import found_at, roc_auc
    from scipy.stats import spearmanr

    model, tok, train, val, flipped, acc, t_train = train_config(cfg, progress)
    ref = recorded.get(cfg.key())
    print(f"[ekfac] val acc {acc:.3f} (quality_runs.jsonl: {ref['val_accuracy']:.3f})" if ref
          else f"[ekfac] val acc {acc:.3f} (not in quality_runs.jsonl)", flush=True)
    # Our exact scores first: prepare_model freezes the parameters and wraps the modules.
    attr = HyperINF(model, progress=progress).fit(make_loader(train, tok, batch_size=32, sort_by_length=True))
    attr.use("exact", damping="datainf")
    exact = attr.mean_scores(make_loader(val, tok, batch_size=32, sort_by_length=True))
    del attr
    with tempfile.TemporaryDirectory(prefix="ekfac_", dir="/tmp") as workdir:
        s, seconds = ekfac_mean_scores(model, tok, train, val, workdir)
    rho = float(spearmanr(s.numpy(), exact.double().numpy()).statistic)
    res = {"auc": roc_auc(s, flipped), "top10": found_at(s, flipped, 0.1), "top20": found_at(s, flipped, 0.2),
           "seconds": seconds}
    print(f"[ekfac] EK-FAC AUC {res['auc']:.3f} (exact/datainf in quality_runs.jsonl: "
          f"{ref['results']['exact, datainf damping']['auc']:.3f}) " if ref else f"[ekfac] EK-FAC AUC {res['auc']:.3f} ",
          f"top10 {res['top10']:.3f}, {seconds:.0f} s; Spearman vs exact {rho:.3f}", flush=True)
    if not rho > 0.3:
        print(f"[ekfac] WARNING: Spearman vs exact is {rho:.3f}; check the sign convention", flush=True)
    return {"config": asdict(cfg), "val_accuracy": acc, "train_seconds": t_train,
            "recorded_val_accuracy": ref["val_accuracy"] if ref else None,
            "results": {LABEL: res}, "spearman_vs_exact": rho}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality_ekfac", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny smoke configuration")
    p.add_argument("--runs", type=Path, default=HERE / "quality_ekfac_runs.jsonl")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick and args.runs == HERE / "quality_ekfac_runs.jsonl":
        args.runs = Path("/tmp/hyperinf_quality_ekfac_quick.jsonl")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*GradScaler.*", category=FutureWarning)  # kronfluence 1.0.1 on torch 2.13
    recorded = {json.dumps(r["config"], sort_keys=True): r for r in load_runs(HERE / "quality_runs.jsonl")}
    done = {json.dumps(r["config"], sort_keys=True) for r in load_runs(args.runs)}
    for cfg in grid(args.quick):
        if cfg.key() in done:
            continue
        print(f"[ekfac] {cfg}", flush=True)
        rec = run_one(cfg, recorded, progress=not args.no_progress)
        append_record(args.runs, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
