"""A tiny random float64 BERT classifier with LoRA on query/value, built offline, for the tests.

One factory for every test file (and the persistence/distributed subprocesses), so they build the
same kind of model the same way.  ``lora_B`` is redrawn from N(0, 0.3²): PEFT starts it at zero,
which zeroes lora_A's gradients, so every layer's gradient would not be informative.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def nonzero_lora_b(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Redraw every lora_B weight from N(0, std²) in place (global RNG); returns ``model``."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)
    return model


def tiny_bert_lora(*, vocab: int, hidden: int = 16, layers: int = 1, intermediate: int = 24,
                   max_positions: int = 32, rank: int = 3, dropout: float = 0.0, seed: int = 0,
                   **lora: object) -> torch.nn.Module:
    """torch.manual_seed(seed), then a float64 BertForSequenceClassification (2 heads, 2 labels, eager
    attention, hidden/attention dropout ``dropout``) wrapped by PEFT LoRA (r = rank, alpha = 2·rank,
    target query/value; ``lora`` adds LoraConfig fields, e.g. lora_dropout or rank_pattern)."""
    import peft
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=intermediate, max_position_embeddings=max_positions, num_labels=2,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, attn_implementation="eager",
    )
    base = transformers.BertForSequenceClassification(cfg).double()
    lcfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], task_type="SEQ_CLS",
                           **lora)
    return nonzero_lora_b(peft.get_peft_model(base, lcfg))


DATA_VOCAB = 50


def tiny_model(seed=0):
    """The attributor tests' model: 2 layers, dropout 0.1 (also LoRA dropout), vocabulary DATA_VOCAB."""
    return tiny_bert_lora(vocab=DATA_VOCAB, layers=2, dropout=0.1, seed=seed, lora_dropout=0.1)


def make_data(n, seed, index_offset=0):
    """n random padded sequences (lengths 3..8 of 8) with binary labels and a global ``index``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g)
    ids = torch.zeros(n, 8, dtype=torch.long)
    mask = torch.zeros(n, 8, dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, :L] = torch.randint(1, DATA_VOCAB, (int(L),), generator=g)
        mask[i, :L] = 1
    labels = torch.randint(0, 2, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(n) + index_offset}


def batches(data, size, order=None):
    """``data`` cut into dict batches of ``size`` (in ``order`` when given)."""
    n = data["labels"].shape[0]
    order = torch.arange(n) if order is None else order
    return [{k: v[order[i : i + size]] for k, v in data.items()} for i in range(0, n, size)]
