"""HyperINF under torch.distributed: two gloo ranks on 127.0.0.1, launched as subprocesses with a timeout.

The ranks run tests/dist_worker.py and write what they saw to rank{r}.json; these tests assert on it.
Tolerance: distributed vs one process 1e-6 relative to the largest entry (float64; the two differ only by
the order of floating-point sums, ~1e-15 in practice).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parents[1] / "dist_worker.py"
TOL = 1e-6
LAUNCH_TIMEOUT_S = 240  # a launch that runs longer is a hang (they take ~15-30 s on 2 busy cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def _torchrun(scenario: str, out: Path) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nnodes", "1", "--nproc-per-node", "2", "--monitor-interval", "0.2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(WORKER), scenario, str(out)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _results(out: Path, log: str) -> list[dict]:
    files = [out / f"rank{r}.json" for r in range(2)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"no result from {missing}; output:\n{log[-4000:]}"
    res = [json.loads(f.read_text()) for f in files]
    for r, x in enumerate(res):
        assert "crash" not in x, f"rank {r} crashed:\n{x['crash']}"
    return res


def test_two_ranks_equal_one_process(tmp_path):
    """13 training examples split 7/6: factors, inverses and every kind of scores equal one process's."""
    proc = _torchrun("equal", tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = _results(tmp_path, proc.stdout + proc.stderr)
    for r, x in enumerate(res):
        assert x["n_train"] == 13 and x["count"] == 13, x
        for key in ("gfim", "rank_sum", "inverse", "scores_hyperinf", "scores_kronecker", "scores_exact",
                    "topk_values", "streamed", "streamed_reloaded", "loaded", "checkpointed"):
            assert x[key] <= TOL, (r, key, x[key])
        assert x["topk_index_equal"], r
        assert x["checkpoint_dirs"] == ["rank0-of-2", "rank1-of-2"], x["checkpoint_dirs"]
    for key in ("rank0_only_hyperinf", "rank0_only_kronecker", "rank0_only_exact", "mean_scores"):
        assert res[0][key] <= TOL, (key, res[0][key])
        assert res[1][key] is True, f"rank 1 got a result for {key} without all_ranks"
    # rank 1 raised on its batch without an index; rank 0 stopped at the next collective, naming rank 1
    assert res[1]["bad_batch"].startswith("ValueError") and "no 'index'" in res[1]["bad_batch"]
    assert res[0]["bad_batch"].startswith("DistributedError") and "rank 1 failed during fit" in res[0]["bad_batch"]
    # then rank 1 has LoRA rank 4, rank 0 rank 3: both raise the same error before any gradient work
    for x in res:
        assert x["mismatch"] is not None and x["mismatch"].startswith("ValueError"), x["mismatch"]
        assert "ranks disagree" in x["mismatch"] and "rank 1 vs rank 0" in x["mismatch"]
        assert "rank: 4 vs 3" in x["mismatch"]
    assert res[0]["mismatch"] == res[1]["mismatch"]


def test_a_killed_rank_ends_the_other_with_its_name(tmp_path):
    """Rank 1 is SIGKILLed mid-fit (plain processes, so no launcher kills rank 0 for us): rank 0 raises."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), "kill", str(tmp_path)],
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, HYPERINF_EXT_DIST_TIMEOUT="120",
                                       HYPERINF_EXT_DIST_DEAD_AFTER="3"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == -9, logs[1][-2000:]
    assert procs[0].returncode == 0, logs[0][-2000:]
    res = json.loads((tmp_path / "rank0.json").read_text())
    assert res.get("error") and res["error"].startswith("DistributedError"), res
    # named by its stopped heartbeat (3 s), not by the 120 s timeout
    assert "rank 1 stopped before this step: no heartbeat for 3 s" in res["error"], res


@pytest.fixture
def one_rank_group():
    """A gloo group of one process (in this process); a Comm then pretends the world has 2 ranks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_rank_that_never_arrives_is_named_after_the_timeout(one_rank_group):
    from hyperinf_ext.distributed import Comm, DistributedError

    comm = Comm(timeout=0.3)
    comm.world = 2  # rank 1 never comes
    with pytest.raises(DistributedError, match=r"^fit: rank 1 did not arrive within 0.3 s"):
        comm.arrive("fit")
    with pytest.raises(DistributedError, match="an earlier collective failed"):  # broken from then on
        comm.arrive("scores")


def test_a_failure_posted_by_another_rank_stops_the_next_collective(one_rank_group):
    from hyperinf_ext.distributed import Comm, DistributedError, reported

    comm = Comm(timeout=30)
    comm.world = 2
    comm.store.set("abort", "rank 1 failed during fit: ValueError: bad batch")  # what rank 1's reported() posts
    with pytest.raises(DistributedError, match="rank 1 failed during fit: ValueError: bad batch"):
        comm.arrive("fit: example counts")
    other = Comm(timeout=30)  # a failing rank posts its own error and re-raises the original
    with pytest.raises(KeyError):
        with reported(other, "scores"):
            raise KeyError("x")
    assert other.store.get("abort").decode().startswith("rank 0 failed during scores: KeyError")


@pytest.fixture(scope="module")
def shards_run(tmp_path_factory):
    """One 2-rank launch of the ``shards`` scenario (self-influence, overlapping and empty shards, a CLI
    failure on rank 1); its tests below each check one class of behaviour."""
    pytest.importorskip("peft")
    from tiny_llm import make_tiny_llama, sentiment_rows, write_instructions

    out = tmp_path_factory.mktemp("shards")
    folder = make_tiny_llama(out / "model")
    train = write_instructions(out / "train.jsonl", sentiment_rows(6, seed=1))
    query = write_instructions(out / "query.jsonl", sentiment_rows(2, seed=2))
    (out / "cli.json").write_text(json.dumps(["attribute", "--model", str(folder), "--train", str(train), "--query",
                                              str(query), "--top-k", "2", "--max-length", "24", "--no-progress"]))
    proc = _torchrun("shards", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _results(out, proc.stdout + proc.stderr)


def test_self_scores_two_ranks_equal_one_process(shards_run):
    for r, x in enumerate(shards_run):
        assert x["self_scores"] <= TOL and x["self_scores_loader"] <= TOL, (r, x)
    assert shards_run[0]["self_rank0_only"] <= TOL and shards_run[1]["self_rank0_only"] is True


def test_overlapping_shards_are_refused_on_every_rank(shards_run):
    """Index 6 read by both ranks and 7 by none: the counts add up to n_train, the partition check does not."""
    errors = [x["overlap"] for x in shards_run]
    assert errors[0] == errors[1] and errors[0] is not None, errors
    assert errors[0].startswith("ValueError") and "[6] read by more than one rank" in errors[0], errors[0]
    assert "[7] (read by no rank)" in errors[0], errors[0]


def test_an_empty_shard_is_valid(shards_run):
    """One training example on two ranks: rank 1 reads nothing; scores, self-influence and top-k as one process."""
    for r, x in enumerate(shards_run):
        assert isinstance(x["empty_shard"], float) and x["empty_shard"] <= TOL, (r, x["empty_shard"])


def test_the_cli_fails_with_one_line_on_every_rank(shards_run):
    """Rank 1's fit raises: it prints its error, rank 0 (stopped at the next collective) prints one line naming it."""
    rank0, rank1 = (x["cli"] for x in shards_run)
    for x in (rank0, rank1):
        assert x["stderr"].count("\n") == 1 and x["stderr"].startswith("hyperinf-ext: error: "), x
        assert "Traceback" not in x["stderr"]
    assert rank1["code"] == 2 and "(injected)" in rank1["stderr"]
    assert rank0["code"] == 1 and "rank 1 failed during fit" in rank0["stderr"]
