"""A tiny random Llama and a word-level tokenizer with a chat template, built offline (nothing downloaded).

Stands in for the embedded SmolLM2 in the default suite: same architecture family (q_proj/v_proj
for LoRA), same kind of chat template (``<|im_start|>role ... <|im_end|>``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("is the sentiment of this movie review positive or negative answer with one word review "
         "a great film fun bad boring awful lovely dull superb plot acting what colour sky blue grass "
         "green red user assistant system").split()
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def make_tokenizer(*, chat_template: bool = True, pad: bool = True):
    """PreTrainedTokenizerFast over a WordLevel vocabulary (specials first, then :data:`WORDS`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<pad>" if pad else None,
                                   additional_special_tokens=["<|im_start|>"])
    if chat_template:
        fast.chat_template = TEMPLATE
    return fast


def make_tiny_llama(folder: Path, *, seed: int = 0, chat_template: bool = True, pad: bool = True) -> Path:
    """Save a random 2-layer Llama (hidden 32) and its tokenizer into ``folder``; returns ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(chat_template=chat_template, pad=pad)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def write_instructions(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` prompt/response rows over the tiny vocabulary (positive/negative reviews)."""
    g = torch.Generator().manual_seed(seed)
    good, bad = ["great", "fun", "lovely", "superb"], ["bad", "boring", "awful", "dull"]
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        pool = good if positive else bad
        k = int(torch.randint(1, 4, (1,), generator=g))
        words = [pool[int(torch.randint(0, 4, (1,), generator=g))] for _ in range(k)]
        rows.append({"prompt": f"is the sentiment of this review positive or negative review a {' '.join(words)} film",
                     "response": "positive" if positive else "negative"})
    return rows


def make_tiny_adapter(folder: Path, out: Path) -> Path:
    """A LoRA adapter (r=2, alpha=4, seed 0) for the tiny Llama in ``folder`` with every lora_B drawn from
    N(0, 0.3²) (a generator seeded 1 per matrix; PEFT starts B at zero, which zeroes lora_A's gradients),
    saved to ``out``; returns ``out``."""
    from hyperinf_ext.app.models.causal import load_causal_lora_model

    model = load_causal_lora_model(folder, rank=2, alpha=4, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(str(out))
    return out

