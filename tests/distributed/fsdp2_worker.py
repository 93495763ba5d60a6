"""One rank of the FSDP2 test (tests/distributed/test_fsdp2.py), launched by torchrun on CPU with gloo:
``python fsdp2_worker.py OUT_DIR``; writes OUT_DIR/rank{r}.json with what it measured.

Every rank builds the same tiny float64 Llama with LoRA (r=2 on q_proj/v_proj, every lora_B drawn at random
so lora_A has a gradient), fits HyperINF on the whole training set in one process without FSDP (the
reference) and on its shard under FSDP2 ``fully_shard`` (each decoder layer, then the root, as users do),
and reports the largest differences of the factors and scores. Then, on the same process group:

* the model after the library ran: its LoRA weights are DTensor shards again and one ordinary training
  step gives the reference model's gradients (the capture left FSDP's state as it found it);
* ``reshard_after_forward=False`` with frozen adapters and a no-grad forward first (the weights are then
  plain unsharded tensors between forwards, and the LoRA parameters need no grad until the capture asks);
* ``checkpoint_dir`` is refused on every rank;
* a rank with one batch more than the other: every rank raises the same ValueError before the forward
  that would wait in FSDP's all-gather (last: the attributor's group is left after a failure).
"""
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

VOCAB, SEQ = 40, 10
N_TRAIN, N_QUERY, BATCH = 11, 4, 3  # 11 examples: shards of 6 and 5, two batches of 3 on each rank


def lora_llama(*, frozen: bool = False) -> torch.nn.Module:
    """The tiny Llama of tests/tiny_llm.py's shape (hidden 32, 2 layers, 4 heads, 2 KV heads) in float64."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(cfg).double()
        base.config._attn_implementation = "eager"
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which zeroes lora_A's gradients
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
            if frozen:
                p.requires_grad_(False)
    return model.eval()


def shard(model: torch.nn.Module, mesh, *, reshard_after_forward: bool = True) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh)
    return model


def make_data(n: int, seed: int) -> dict:
    """Token ids, right padding on the last two positions of some rows (labels -100 there), global index."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[:, SEQ - 2:] = torch.randint(0, 2, (n, 2), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
            "index": torch.arange(n)}


def batches(data: dict, rows: torch.Tensor, size: int = BATCH) -> list[dict]:
    return [{k: v[rows[i:i + size]] for k, v in data.items()} for i in range(0, rows.numel(), size)]


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Largest absolute difference, and relative to the largest entry of the reference ``b``."""
    abs_ = float((a.double() - b.double()).abs().max())
    scale = float(b.abs().max())
    return {"abs": abs_, "rel": abs_ / scale if scale else float("inf"), "ref_max": scale}


def worst(ds: list[dict]) -> dict:
    return max(ds, key=lambda d: d["rel"])


def compare(attr, ref, query: list[dict]) -> dict:
    names = list(ref.factors)
    return {
        "layers": sorted(attr.factors) == sorted(names),
        "count": [attr.factors[n].count for n in names],
        "n_train": attr.n_train,
        "gfim": worst([diff(attr.factors[n].gfim_sum, ref.factors[n].gfim_sum) for n in names]),
        "rank_sum": worst([diff(attr.factors[n].rank_sum, ref.factors[n].rank_sum) for n in names]),
        "scores": diff(attr.scores(query, all_ranks=True), ref.scores(query)),
        "self_scores": diff(attr.self_scores(all_ranks=True), ref.self_scores()),
    }


def _error(fn) -> str | None:
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 — the message is what the test checks
        return f"{type(e).__name__}: {e}"


def run(rank: int, world: int, out: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from hyperinf_ext import HyperINF

    mesh = init_device_mesh("cpu", (world,))
    train, query_data = make_data(N_TRAIN, 1), make_data(N_QUERY, 2)
    query = batches(query_data, torch.arange(N_QUERY), 2)
    mine = torch.arange(rank, N_TRAIN, world)
    ref = HyperINF(lora_llama(), progress=False, distributed=False).fit(batches(train, torch.arange(N_TRAIN)))

    model = shard(lora_llama(), mesh)
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    res: dict = {"sharded": isinstance(lora_a, DTensor) and str(tuple(lora_a.placements)) == "(Shard(dim=0),)"
                 and tuple(lora_a.to_local().shape) == (1, 32)}  # r=2 rows over 2 ranks: one each
    attr = HyperINF(model, progress=False).fit(batches(train, mine))
    res["fsdp_flags"] = [layer.fsdp for layer in attr.layers]
    res["fsdp"] = compare(attr, ref, query)

    # the model after the library ran: still sharded, and an ordinary training step as without FSDP
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    res["sharded_after"] = isinstance(lora_a, DTensor) and lora_a.grad is None
    plain = lora_llama()
    step = {k: v for k, v in batches(train, torch.arange(N_TRAIN))[0].items() if k != "index"}
    model.train()
    plain.train()
    model(**step).loss.backward()
    plain(**step).loss.backward()
    got = dict(model.named_parameters())
    res["train_step"] = worst([diff(got[n].grad.full_tensor(), p.grad) for n, p in plain.named_parameters()
                               if p.grad is not None])
    res["train_step_params"] = sum(p.grad is not None for p in plain.parameters())
    model.eval()

    # unsharded between forwards (reshard_after_forward=False, after a no-grad forward), adapters frozen
    frozen = shard(lora_llama(frozen=True), mesh, reshard_after_forward=False)
    with torch.no_grad():
        frozen(**step)
    lora_a = frozen.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    res["unsharded_between_forwards"] = not isinstance(lora_a, DTensor)
    res["frozen"] = compare(HyperINF(frozen, progress=False).fit(batches(train, mine)), ref, query)

    # save on every rank (rank 0 writes), load on every rank: the same factors, scores as the reference;
    # the weights stay shardable (the digest hashed copies of the gathered values)
    res["save"] = _error(lambda: attr.save(out / "saved"))
    loaded = HyperINF.load(out / "saved", model, progress=False) if res["save"] is None else None
    res["loaded"] = None if loaded is None else {
        "gfim": worst([diff(loaded.factors[n].gfim_sum, ref.factors[n].gfim_sum) for n in ref.factors]),
        "scores": diff(loaded.scores(query, batches(train, mine), all_ranks=True), ref.scores(query))}
    with torch.no_grad():
        model(**step)  # a forward and reshard after save/load: the storage must still be resizable
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    res["sharded_after_save"] = isinstance(lora_a, DTensor)

    res["checkpoint"] = _error(lambda: HyperINF(model, progress=False).fit(batches(train, mine),
                                                                          checkpoint_dir=out / "ck"))
    # rank 0: its 6 examples in three batches of 2; rank 1: its 5 in two batches of 3
    res["uneven"] = _error(lambda: HyperINF(model, progress=False).fit(batches(train, mine, 2 if rank == 0 else 3)))
    return res


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        res = run(rank, world, Path(out))
    except Exception:  # noqa: BLE001
        res = {"crash": traceback.format_exc()}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(res))
    print(f"rank {rank} done", flush=True)
    # no destroy_process_group after a failure: a peer may be gone


if __name__ == "__main__":
    main(sys.argv[1])
