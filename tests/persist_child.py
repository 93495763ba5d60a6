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

VOCAB, N_TRAIN, BATCH = 50, 14, 2


def tiny_model(rank: int = 3, hidden: int = 16, seed: int = 0) -> torch.nn.Module:
    import peft
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    base = transformers.BertForSequenceClassification(cfg).double()
    lcfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = peft.get_peft_model(base, lcfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # PEFT starts B at zero; nonzero B makes every layer's gradient informative
    return model


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
