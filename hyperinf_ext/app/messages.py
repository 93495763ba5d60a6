"""Formatting of user-facing error messages."""
from __future__ import annotations

__all__ = ["one_line"]


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (whitespace runs collapsed), or its type name when it has none.

    Library errors are quoted inside our own one-line messages (and printed by the CLI), where a
    multi-line message would break the one-line contract.
    """
    return " ".join(str(exc).split()) or type(exc).__name__
