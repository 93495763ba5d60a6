"""A tiny float64 PEFT model and data for the persistence tests, and a checkpointed fit to run (and kill)
in a subprocess: ``python persist_child.py CHECKPOINT_DIR EVERY``.

Built from fixed seeds, so the test process and the subprocess hold identical models and batches.  The
loader prints ``batch k`` (flushed) as it yields batch k, so a parent can kill the fit near a known point.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from tiny_bert import tiny_bert_lora  # noqa: E402

VOCAB, N_TRAIN, BATCH = 50, 14, 2


def tiny_model(rank: int = 3, hidden: int = 16, seed: int = 0) -> torch.nn.Module:
    return tiny_bert_lora(vocab=VOCAB, hidden=hidden, rank=rank, seed=seed)


def make_data(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 8), generator=g)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[:, 6:] = torch.randint(0, 2, (n, 2), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(n)}


def batches(data: dict, size: int = BATCH) -> list[dict]:
    n = data["labels"].shape[0]
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, n, size)]


def train_batches() -> list[dict]:
    return batches(make_data(N_TRAIN, 1))


def query_batches() -> list[dict]:
    return batches(make_data(5, 2), 5)


def announcing(loader):
    for k, b in enumerate(loader):
        print(f"batch {k}", flush=True)
        yield b


def main(directory: str, every: int) -> None:
    from hyperinf_ext import HyperINF

    torch.set_num_threads(1)
    HyperINF(tiny_model(), progress=False).fit(announcing(train_batches()), checkpoint_dir=directory,
                                               checkpoint_every=every)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
