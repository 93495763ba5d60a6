"""HyperINF on a base wrapped by FSDP2 (``torch.distributed.fsdp.fully_shard``): two gloo ranks on CPU, launched
by torchrun, each fitting on its shard of the data, against one process without FSDP on the whole data.

The ranks run tests/distributed/fsdp2_worker.py (its docstring lists the scenarios) and write rank{r}.json.

Tolerance: float64 throughout. FSDP2 shards the weights (the forward all-gathers them, bit for bit) and the
data are sharded across ranks, so the per-example gradients are the reference's and the factors and
scores differ from it only by the order of floating-point sums (all-reduced partial sums of 6 and 5
examples instead of one sum of 11): a few float64 ulps relative to the largest entry (measured: GFIMs
2e-16, rank-side sums 4e-16, scores 1.1e-15 — the damped inverse amplifies the rounding ~5x —,
self-influence 1.5e-16). Any real fault — a shard missed or counted twice, zero gradients from weights the
backward never reached, a weight read from its local shard — moves them by O(1) relative. TOL = 1e-9
sits about six orders of magnitude from each.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6 under this name)
except ImportError as e:
    pytest.skip(f"FSDP2 (torch.distributed.fsdp.fully_shard) is not available in torch {torch.__version__}: {e}",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import _env, _free_port  # noqa: E402

WORKER = Path(__file__).resolve().parent / "fsdp2_worker.py"
TOL = 1e-9  # relative to the largest reference entry; see the module docstring
LAUNCH_TIMEOUT_S = 240  # a launch that runs longer is a hang (it takes ~20-30 s on 2 busy cores)
N_TRAIN = 11


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nnodes", "1", "--nproc-per-node", "2", "--monitor-interval", "0.2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    log = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, log
    files = [out / f"rank{r}.json" for r in range(2)]
    assert all(f.exists() for f in files), f"no result from a rank; output:\n{log}"
    res = [json.loads(f.read_text()) for f in files]
    for r, x in enumerate(res):
        assert "crash" not in x, f"rank {r} crashed:\n{x['crash']}"
    return res


def _assert_equal_to_one_process(r: int, x: dict) -> None:
    assert x["layers"] and x["n_train"] == N_TRAIN and set(x["count"]) == {N_TRAIN}, (r, x)
    for key in ("gfim", "rank_sum", "scores", "self_scores"):
        d = x[key]
        assert d["ref_max"] > 0, (r, key, d)  # a reference of zeros would make any result "equal"
        assert d["rel"] <= TOL, (r, key, d)


def test_fsdp2_factors_and_scores_equal_one_process(fsdp2_run):
    """Each decoder layer then the root wrapped by fully_shard (LoRA trainable): the per-layer GFIMs (and
    rank-side sums), the pairwise scores and the self-influence equal one process's without FSDP."""
    for r, x in enumerate(fsdp2_run):
        assert x["sharded"], "the LoRA weights are not DTensor shards: the test would not exercise FSDP2"
        assert x["fsdp_flags"] and all(x["fsdp_flags"]), x["fsdp_flags"]
        _assert_equal_to_one_process(r, x["fsdp"])


def test_fsdp2_model_is_left_usable(fsdp2_run):
    """After fit and scores the weights are shards again with no .grad, and a training step's LoRA gradients
    are those of the model without FSDP (both ranks step on the same batch with bit-identical all-gathered
    weights, so the reduce-scatter averages equal gradients: measured 0; TOL as above)."""
    for r, x in enumerate(fsdp2_run):
        assert x["sharded_after"], r
        assert x["train_step_params"] == 8, x  # lora_A and lora_B of q_proj and v_proj in 2 layers
        assert x["train_step"]["ref_max"] > 0 and x["train_step"]["rel"] <= TOL, (r, x["train_step"])


def test_fsdp2_unsharded_between_forwards_and_frozen_adapters(fsdp2_run):
    """reshard_after_forward=False after a no-grad forward leaves plain unsharded weights in the modules
    (which must not be made non-resizable by the consistency check), and frozen adapters need no grad
    until the capture asks: still the one-process result."""
    for r, x in enumerate(fsdp2_run):
        assert x["unsharded_between_forwards"], r
        _assert_equal_to_one_process(r, x["frozen"])


def test_fsdp2_save_and_load(fsdp2_run):
    """save() on every rank (the digest gathers the sharded weights on all of them, rank 0 writes) and load()
    on every rank give the one-process factors and scores; the weights stay shards FSDP can free."""
    for r, x in enumerate(fsdp2_run):
        assert x["save"] is None, (r, x["save"])
        for key in ("gfim", "scores"):
            d = x["loaded"][key]
            assert d["ref_max"] > 0 and d["rel"] <= TOL, (r, key, d)
        assert x["sharded_after_save"], r


def test_fsdp2_refusals_name_the_reason_on_every_rank(fsdp2_run):
    checkpoint = [x["checkpoint"] for x in fsdp2_run]
    assert checkpoint[0] == checkpoint[1] and checkpoint[0] is not None, checkpoint
    assert checkpoint[0].startswith("ValueError: checkpoint_dir: not supported for a model wrapped by FSDP2")
    # rank 0 has three batches, rank 1 two: both stop before rank 0's third forward (which would wait in
    # FSDP's all-gather for the process group's timeout), with the same message
    uneven = [x["uneven"] for x in fsdp2_run]
    assert uneven[0] == uneven[1] and uneven[0] is not None, uneven
    assert uneven[0].startswith("ValueError: train_loader: rank 1 ran out after 2 batch(es) while rank 0 still had "
                                "more"), uneven[0]
    assert "every rank must run the same number of batches" in uneven[0]
