"""One rank of a distributed test run (launched by tests/distributed/test_distributed.py under torchrun or as plain
processes with MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE): ``python dist_worker.py SCENARIO OUT_DIR``.

Scenarios (each rank writes OUT_DIR/rank{r}.json with what it saw; the test asserts on them):

* ``equal``    fit/scores/mean_scores/top-k/out=/save+load over a training set of odd size split unevenly
               across the ranks, each compared with a one-process run (distributed=False) of the same
               model and data in float64; then a rank-1 batch without ``index`` (rank 1 raises, the
               others name it); last, rank 1 builds its model with LoRA rank 4 (the others 3): every
               rank must raise (``mismatch`` runs that alone).
* ``kill``     rank 1 SIGKILLs itself in the middle of its fit shard: the others must raise naming it.
* ``shards``   self_scores (from the cache and from a loader) equal one process's; shards that overlap
               (index 6 on both ranks, 7 on none, counts adding up to n_train) are refused on every rank;
               1 example on 2 ranks (rank 1's shard empty) scores as one process; last, the CLI's main on
               rank 1 fails in the fit: every rank prints one error line (OUT_DIR/cli.json holds the argv).
* ``index``    every rank builds its shard of one gradient index (tests/index/test_index_distributed.py).
"""
import json
import os
import signal
import sys
import traceback
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from persist_child import make_data, tiny_model  # noqa: E402

N_TRAIN, N_QUERY, BATCH = 13, 5, 3  # 13 examples: shards of 7 and 6 on two ranks


def shard_batches(data: dict, rank: int, world: int) -> list[dict]:
    """This rank's examples rank, rank+world, … in batches of BATCH, each with its global index."""
    mine = torch.arange(rank, data["labels"].shape[0], world)
    return [{k: v[mine[i:i + BATCH]] for k, v in data.items()} for i in range(0, mine.numel(), BATCH)]


def all_batches(data: dict) -> list[dict]:
    n = data["labels"].shape[0]
    return [{k: v[i:i + BATCH] for k, v in data.items()} for i in range(0, n, BATCH)]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(b.abs().max()), 1e-300)
    return float((a.double() - b.double()).abs().max()) / scale


def equal(rank: int, world: int, out: Path) -> dict:
    from hyperinf_ext import HyperINF
    from hyperinf_ext.attributor.topk import topk_of_matrix

    train, query = make_data(N_TRAIN, 1), make_data(N_QUERY, 2)
    query_batches = [{k: v[i:i + 2] for k, v in query.items()} for i in range(0, N_QUERY, 2)]
    ref = HyperINF(tiny_model(), progress=False, distributed=False).fit(all_batches(train))
    attr = HyperINF(tiny_model(), progress=False).fit(shard_batches(train, rank, world))
    res: dict = {"n_train": attr.n_train, "count": next(iter(attr.factors.values())).count,
                 "gfim": max(maxdiff(attr.factors[n].gfim_sum, ref.factors[n].gfim_sum) for n in ref.factors),
                 "rank_sum": max(maxdiff(attr.factors[n].rank_sum, ref.factors[n].rank_sum) for n in ref.factors),
                 "inverse": max(maxdiff(attr.method.state[n], ref.method.state[n]) for n in ref.factors)}
    S_ref = ref.scores(query_batches)
    for method in ("hyperinf", "kronecker", "exact"):
        attr.use(method)
        ref.use(method)
        S_ref = ref.scores(query_batches)
        S = attr.scores(query_batches, all_ranks=True)
        res[f"scores_{method}"] = maxdiff(S, S_ref)
        on0 = attr.scores(query_batches)
        res[f"rank0_only_{method}"] = (on0 is None) if rank else maxdiff(on0, S_ref)
    attr.use("hyperinf")
    ref.use("hyperinf")
    S_ref = ref.scores(query_batches)
    m = attr.mean_scores(query_batches)
    res["mean_scores"] = (m is None) if rank else maxdiff(m, ref.mean_scores(query_batches))
    top = attr.scores(query_batches, top_k=4, all_ranks=True)
    want = topk_of_matrix(S_ref, 4)
    res["topk_index_equal"] = bool(torch.equal(top.positive_index, want.positive_index)
                                   and torch.equal(top.negative_index, want.negative_index))
    res["topk_values"] = max(maxdiff(top.positive_values, want.positive_values),
                             maxdiff(top.negative_values, want.negative_values))
    shared = out
    streamed = attr.scores(query_batches, out=shared / "scores", all_ranks=True)
    res["streamed"] = maxdiff(streamed, S_ref)
    res["streamed_reloaded"] = maxdiff(HyperINF.load_scores(shared / "scores"), S_ref)
    attr.save(shared / "factors")  # rank 0 writes; every rank returns once it is committed
    loaded = HyperINF.load(shared / "factors", tiny_model(), progress=False)
    S_loaded = loaded.scores(query_batches, shard_batches(train, rank, world), all_ranks=True)
    res["loaded"] = maxdiff(S_loaded, S_ref)
    # with checkpoint_dir each rank commits its own partial sums (rank{r}-of-{w}/); a second fit resumes
    # from the finished checkpoints and reduces them again
    ck = HyperINF(tiny_model(), progress=False).fit(shard_batches(train, rank, world), checkpoint_dir=shared / "ck")
    resumed = HyperINF(tiny_model(), progress=False).fit(shard_batches(train, rank, world), checkpoint_dir=shared / "ck")
    res["checkpointed"] = max(maxdiff(f.factors[n].gfim_sum, ref.factors[n].gfim_sum) for f in (ck, resumed)
                              for n in ref.factors)
    res["checkpoint_dirs"] = sorted(p.name for p in (shared / "ck").iterdir())
    # a failure on one rank between collectives: rank 1's batch lacks its index
    bad = shard_batches(train, rank, world)
    if rank == 1:
        bad[1] = {k: v for k, v in bad[1].items() if k != "index"}
    try:
        HyperINF(tiny_model(), progress=False).fit(bad)
        res["bad_batch"] = "no error"
    except Exception as e:  # noqa: BLE001 — the message is what the test checks
        res["bad_batch"] = f"{type(e).__name__}: {e}"
    res["mismatch"] = mismatch(rank, world, out)["error"]  # last: it leaves the ranks disagreeing
    return res


def _error(fn) -> str | None:
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 — the message is what the test checks
        return f"{type(e).__name__}: {e}"


def shards(rank: int, world: int, out: Path) -> dict:
    from hyperinf_ext import HyperINF

    train, query = make_data(N_TRAIN, 1), make_data(N_QUERY, 2)
    ref = HyperINF(tiny_model(), progress=False, distributed=False).fit(all_batches(train))
    attr = HyperINF(tiny_model(), progress=False).fit(shard_batches(train, rank, world))
    want = ref.self_scores()
    res: dict = {"self_scores": maxdiff(attr.self_scores(all_ranks=True), want)}
    on0 = attr.self_scores(chunk_size=2)
    res["self_rank0_only"] = (on0 is None) if rank else maxdiff(on0, want)
    res["self_scores_loader"] = maxdiff(attr.self_scores(shard_batches(train, rank, world), all_ranks=True), want)

    def pick(data: dict, idx: list[int]) -> list[dict]:
        sel = torch.tensor(idx, dtype=torch.long)
        return [{k: v[sel[i:i + BATCH]] for k, v in data.items()} for i in range(0, len(idx), BATCH)]

    # 7 + 6 = 13 examples read, as many as n_train, but 6 twice and 7 never
    mine = list(range(7)) if rank == 0 else [6, 8, 9, 10, 11, 12]
    res["overlap"] = _error(lambda: HyperINF(tiny_model(), progress=False).fit(pick(train, mine)))
    # a valid empty shard: one example, two ranks
    one = make_data(1, 3)
    ref1 = HyperINF(tiny_model(), progress=False, distributed=False).fit(all_batches(one))
    qb = all_batches(query)
    try:
        a1 = HyperINF(tiny_model(), progress=False).fit(shard_batches(one, rank, world))
        res["empty_shard"] = max(maxdiff(a1.scores(qb, all_ranks=True), ref1.scores(qb)),
                                 maxdiff(a1.self_scores(all_ranks=True), ref1.self_scores()),
                                 maxdiff(a1.scores(qb, top_k=1, all_ranks=True).positive_values,
                                         ref1.scores(qb, top_k=1).positive_values))
    except Exception as e:  # noqa: BLE001
        res["empty_shard"] = f"{type(e).__name__}: {e}"
    res["cli"] = cli_fails(rank, out)  # last: it leaves the group after a failure
    return res


def cli_fails(rank: int, out: Path) -> dict:
    """The CLI's main on every rank, rank 1's fit raising on its first batch: what each rank prints."""
    import contextlib
    import io

    from hyperinf_ext.app.cli import main
    from hyperinf_ext.attributor import fitting

    if rank == 1:
        def broken(*args, **kwargs):
            raise ValueError("fit: examples [1] (index) have a non-finite (NaN/Inf) loss (injected)")
        fitting.check_finite = broken
    argv = json.loads((out / "cli.json").read_text()) + ["--out", str(out / f"cli-out{rank}")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return {"code": code, "stderr": err.getvalue()}


def mismatch(rank: int, world: int, out: Path) -> dict:
    from hyperinf_ext import HyperINF

    model = tiny_model(rank=4 if rank == 1 else 3)
    try:
        HyperINF(model, progress=False).fit(shard_batches(make_data(N_TRAIN, 1), rank, world))
        return {"error": None}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def kill(rank: int, world: int, out: Path) -> dict:
    from hyperinf_ext import HyperINF

    def loader():
        for k, b in enumerate(shard_batches(make_data(N_TRAIN, 1), rank, world)):
            if rank == 1 and k == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            yield b

    try:
        HyperINF(tiny_model(), progress=False).fit(loader())
        return {"error": None}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def index(rank: int, world: int, out: Path) -> dict:
    """Each rank builds its shard of one gradient index in OUT_DIR/idx (the test compares it with one process)."""
    from hyperinf_ext.index import Index, IndexConfig

    idx = Index.build(tiny_model(), shard_batches(make_data(N_TRAIN, 1), rank, world), out / "idx",
                      config=IndexConfig(proj_dim=0, rows_per_shard=2), checkpoint_every=1, progress=False)
    return {"n_train": idx.n_train, "shards": len(idx.shards)}


def main(scenario: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = Path(out)
    try:
        res = {"equal": equal, "mismatch": mismatch, "kill": kill, "shards": shards,
               "index": index}[scenario](rank, world, out_dir)
    except Exception:  # noqa: BLE001
        res = {"crash": traceback.format_exc()}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
    print(f"rank {rank} done", flush=True)
    # no destroy_process_group after a failure: a peer may be gone


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
