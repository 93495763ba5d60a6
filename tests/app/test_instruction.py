"""Instruction data: loading, the chat template, response-only labels token by token, truncation, padding."""
from __future__ import annotations

import json
import re

import pytest
import torch

from hyperinf_ext.capture.losses import causal_lm_loss
from hyperinf_ext.app.data import DataError, flip_labels, make_loader
from hyperinf_ext.app.data.instruction import (
    InstructionDataset, encode_instructions, ensure_pad_token, load_instruction_file, prompt_ids,
    rotten_tomatoes_instructions,
)
from tiny_llm import make_tiny_llama, make_tokenizer, sentiment_rows, write_instructions


def ids(tok, tokens):
    return tok.convert_tokens_to_ids(tokens)


def pair(prompt: str, response: str) -> InstructionDataset:
    return InstructionDataset.from_pairs([[{"role": "user", "content": prompt}]], [response])


def test_chat_template_labels_mask_the_prompt_token_by_token():
    tok = make_tokenizer()
    ds = InstructionDataset.from_pairs(
        [[{"role": "user", "content": "what colour sky"}],
         [{"role": "system", "content": "answer with one word"}, {"role": "user", "content": "what colour grass"}]],
        ["blue", "green"])
    enc = encode_instructions(ds, tok, max_length=64)
    assert enc.truncated == 0
    # expected sequences spelled out token by token from the template's text
    p0 = ["<|im_start|>", "user", "what", "colour", "sky", "<|im_end|>", "<|im_start|>", "assistant"]
    p1 = ["<|im_start|>", "system", "answer", "with", "one", "word", "<|im_end|>",
          "<|im_start|>", "user", "what", "colour", "grass", "<|im_end|>", "<|im_start|>", "assistant"]
    for e, prompt, answer in zip(enc.encodings, (p0, p1), ("blue", "green")):
        response = [answer, "<|im_end|>"]
        assert e["input_ids"] == ids(tok, prompt + response)
        assert e["labels"] == [-100] * len(prompt) + ids(tok, response)
        assert e["attention_mask"] == [1] * (len(prompt) + len(response))
    assert prompt_ids(tok, ds.prompts[0]) == ids(tok, p0)


def test_without_template_prompt_then_response_and_eos():
    tok = make_tokenizer(chat_template=False)
    enc = encode_instructions(pair("what colour sky", "blue"), tok, max_length=16)
    e = enc.encodings[0]
    assert e["input_ids"] == ids(tok, ["what", "colour", "sky", "blue", "<|im_end|>"])
    assert e["labels"] == [-100, -100, -100] + ids(tok, ["blue", "<|im_end|>"])


def test_long_prompt_loses_its_middle_never_the_response():
    tok = make_tokenizer()
    words = " ".join(["great"] * 30)
    ds = InstructionDataset.from_pairs([[{"role": "user", "content": f"what {words} sky"}],
                                        [{"role": "user", "content": "what colour sky"}]], ["blue", "red"])
    enc = encode_instructions(ds, tok, max_length=12)
    assert enc.truncated == 1
    long, short = enc.encodings
    assert len(long["input_ids"]) == 12
    response = ids(tok, ["blue", "<|im_end|>"])
    assert long["input_ids"][-2:] == response and long["labels"][-2:] == response
    assert long["labels"][:-2] == [-100] * 10
    # the start and the end of the prompt (assistant header) survive
    assert long["input_ids"][:5] == ids(tok, ["<|im_start|>", "user", "what", "great", "great"])
    assert long["input_ids"][5:10] == ids(tok, ["great", "sky", "<|im_end|>", "<|im_start|>", "assistant"])[:5]
    assert short["input_ids"] == ids(tok, ["<|im_start|>", "user", "what", "colour", "sky", "<|im_end|>",
                                           "<|im_start|>", "assistant", "red", "<|im_end|>"])
    with pytest.raises(DataError, match=r"example 0: its response alone has 2 tokens.*never truncated") as err:
        encode_instructions(ds, tok, max_length=2)
    # every offending row counted, and the two lengths it names are the ones that work
    assert "2 responses are too long, the longest 2 tokens (example 0)" in str(err.value)
    fits, whole = re.search(r"--max-length (\d+) keeps every response .*, (\d+) keeps every example whole",
                            str(err.value)).groups()
    assert encode_instructions(ds, tok, max_length=int(fits)).truncated == 2
    assert encode_instructions(ds, tok, max_length=int(whole)).truncated == 0
    assert encode_instructions(ds, tok, max_length=int(whole) - 1).truncated == 1


def test_loader_pads_labels_and_loss_is_mean_over_response_tokens(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = make_tiny_llama(tmp_path / "m")
    tok = make_tokenizer()
    ds = load_instruction_file(write_instructions(tmp_path / "d.jsonl", sentiment_rows(5)))
    enc = encode_instructions(ds, tok, 64)
    loader = make_loader(ds, tok, batch_size=5, max_length=64, encodings=enc.encodings)
    batch = next(iter(loader))
    width = max(len(e["input_ids"]) for e in enc.encodings)
    assert batch["labels"].shape == (5, width)
    for row, i in enumerate(batch["index"].tolist()):
        n = len(enc.encodings[i]["labels"])
        assert batch["labels"][row, :n].tolist() == enc.encodings[i]["labels"]
        assert (batch["labels"][row, n:] == -100).all() and (batch["attention_mask"][row, n:] == 0).all()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64).eval()
    with torch.no_grad():
        losses = causal_lm_loss(model, batch)
        for row, i in enumerate(batch["index"].tolist()):
            e = enc.encodings[i]
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            logp = torch.log_softmax(logits, -1)
            terms = [-logp[t - 1, y] for t, y in enumerate(e["labels"]) if y != -100]
            assert len(terms) == 2  # "positive"/"negative" and <|im_end|>
            assert float(losses[row]) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-10)


def test_files_prompt_response_messages_and_csv(tmp_path):
    rows = [{"prompt": "what colour sky", "response": "blue"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what colour grass"},
                          {"role": "assistant", "content": "green"}]}]
    ds = load_instruction_file(write_instructions(tmp_path / "a.jsonl", rows))
    assert ds.responses == ["blue", "green"]
    assert ds.prompts[1] == rows[1]["messages"][:2]
    csv = tmp_path / "a.csv"
    csv.write_text('q,a\n"what colour sky",blue\n"what colour grass",green\n')
    ds = load_instruction_file(csv, prompt_column="q", response_column="a")
    assert ds.prompts[0] == [{"role": "user", "content": "what colour sky"}] and ds.responses == ["blue", "green"]


@pytest.mark.parametrize("rows, message", [
    ([{"question": "x", "response": "y"}], r"column 'prompt' not found \(line 1\).*columns present: question, response"),
    ([{"prompt": "x", "response": "  "}], r"empty response \(line 1\)"),
    ([{"prompt": "", "response": "y"}], r"empty value in column 'prompt' \(line 1\)"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}],
     r"last message \(line 1\) must have role 'assistant'"),
    ([{"messages": [{"role": "user", "content": "x"}]}], r"at least two"),
    ([{"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}], r"message 0 \(line 1\) needs 'role'"),
])
def test_bad_instruction_files(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_instruction_file(write_instructions(tmp_path / "bad.jsonl", rows))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_instruction_file(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_instruction_file(tmp_path / "e.jsonl")


def test_tokenizer_without_pad_token_pads_with_eos():
    tok = make_tokenizer(pad=False)
    assert tok.pad_token_id is None
    note = ensure_pad_token(tok)
    assert tok.pad_token == "<|im_end|>" and "eos token '<|im_end|>'" in note
    assert ensure_pad_token(tok) is None  # now it has one


def test_flipping_swaps_responses_and_subsets_keep_prompts():
    ds = InstructionDataset.from_pairs([[{"role": "user", "content": f"q{i}"}] for i in range(10)],
                                       ["positive", "negative"] * 5)
    noisy, flipped = flip_labels(ds.labels, 0.3, seed=0, num_classes=ds.num_classes)
    flipped_ds = ds.with_labels(noisy)
    assert int(flipped.sum()) == 3
    for i in range(10):
        same = flipped_ds.responses[i] == ds.responses[i]
        assert same != bool(flipped[i])
    sub = flipped_ds.subset([3, 1])
    assert isinstance(sub, InstructionDataset) and sub.prompts == [ds.prompts[3], ds.prompts[1]]
    assert sub.responses == [flipped_ds.responses[3], flipped_ds.responses[1]]


def test_rotten_tomatoes_instructions():
    try:
        ds = rotten_tomatoes_instructions()
    except DataError as exc:
        pytest.skip(f"embedded data unavailable: {exc}")
    assert ds.label_names == ["negative", "positive"] and len(ds) > 4000
    assert "positive or negative" in ds.prompts[0][0]["content"] and ds.texts[0] in ds.prompts[0][0]["content"]
    assert set(ds.responses) == {"negative", "positive"}
    assert json.dumps(ds.prompts[0])  # plain JSON-ready messages
