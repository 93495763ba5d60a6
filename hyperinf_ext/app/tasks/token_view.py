"""Per-token attribution for display: an example's tokens as text with each labelled token's share.

Turns the :class:`~hyperinf_ext.attributor.tokens.TokenAttribution` of ``attr.token_scores`` into plain
strings and floats (JSON-ready), for the ``--per-token`` outputs and the report's heatmaps.  The
tokenizer is any object with ``decode(ids: list[int]) -> str`` (a Hugging Face tokenizer); it is passed
in, never imported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...attributor.tokens import TokenAttribution, TokenShares

__all__ = ["TokenView", "token_texts", "token_view", "views"]


@dataclass
class TokenView:
    """One example of a pair, ready to draw: every token of the example (prompt and response) in order.

    ``tokens[i]``: token i as text (joined, they give the decoded example); ``shares[i]``: its share of
    ``score`` as a float, None for a token the loss does not predict (prompt, template); ``index``: the
    example's index; ``side``: "train" or "query".  The shares that are not None sum to ``score``.
    """

    index: int
    side: str
    score: float
    tokens: list[str]
    shares: list[float | None]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: {"index", "side", "score", "tokens", "shares"}."""
        return {"index": self.index, "side": self.side, "score": self.score, "tokens": list(self.tokens),
                "shares": list(self.shares)}


def token_texts(ids: list[int], tokenizer: Any) -> list[str]:
    """Each token of ``ids`` as the text it adds to the decoded sequence (leading spaces kept).

    Decoding one id alone drops the space a SentencePiece token carries, so each token's text is the
    growth of the decoded prefix; where a prefix does not extend the previous one (a token that only
    decodes together with the next, e.g. a split UTF-8 character), the id is decoded alone."""
    out: list[str] = []
    previous = ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.startswith(previous):
            out.append(text[len(previous):])
        else:
            out.append(tokenizer.decode(ids[i : i + 1], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False))
        previous = text
    return out


def _view(part: TokenShares, side: str, score: float, tokenizer: Any) -> TokenView:
    if part.shares is None:
        raise ValueError(f"{side} example {part.index}: no {side}-side shares were computed "
                         f"(token_scores(..., side={side!r} or 'both'))")
    ids = [int(t) for t in part.input_ids.tolist()]
    shares: list[float | None] = [None] * len(ids)
    for pos, share in zip(part.positions.tolist(), part.shares.tolist()):
        shares[int(pos)] = float(share)
    return TokenView(part.index, side, float(score), token_texts(ids, tokenizer), shares)


def token_view(attribution: TokenAttribution, tokenizer: Any, side: str = "train") -> TokenView:
    """The ``side`` ("train" or "query") example of ``attribution`` as tokens (text) and shares (floats).

    Raises:
        ValueError: an unknown side, or a side whose shares ``token_scores`` did not compute.
    """
    if side not in ("train", "query"):
        raise ValueError(f"side: expected 'train' or 'query', got {side!r}")
    part = attribution.train if side == "train" else attribution.query
    return _view(part, side, attribution.score, tokenizer)


def views(attribution: TokenAttribution, tokenizer: Any) -> dict[str, TokenView]:
    """Every side of ``attribution`` that has shares: {"train": TokenView, "query": TokenView} (either may be absent)."""
    return {side: _view(part, side, attribution.score, tokenizer)
            for side, part in (("train", attribution.train), ("query", attribution.query)) if part.shares is not None}
