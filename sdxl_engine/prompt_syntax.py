"""AUTOMATIC1111's prompt attention syntax, read into weighted pieces of text.

`(words)` weighs its words 1.1 times more, `[words]` 1.1 times less, `(words:1.3)` 1.3
times; brackets nest (their factors multiply), `\\(` `\\)` `\\[` `\\]` and `\\\\` are the
characters themselves, and `BREAK` (a word of its own, in capitals) starts a new 75-token
chunk. A bracket never closed weighs everything after it; a closing one never opened is
text. This is A1111's `parse_prompt_attention` (modules/prompt_parser.py) to the float:
tests/engine/test_prompt_syntax.py holds a table of its answers.

Torch-free: the web process checks prompts with it (`prompt_problem`), the worker's
conditioning (sdxl_engine.generation.conditioning) encodes what it returns.
"""

from __future__ import annotations

import re

# What BREAK reads as: A1111 marks it with weight -1, a weight no text can get by
# brackets alone (a BREAK inside brackets is scaled with them and becomes a word again).
BREAK = ("BREAK", -1.0)
ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

# One syntax element at a time, tried in this order: a backslash and what it escapes (a
# backslash before anything else is dropped, as in A1111); a weight closing a round
# bracket (":1.3)", digits and dots only: no exponent, no spaces); a bracket; a run of
# plain text; a colon that is not a weight's (text).
_ELEMENT = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\]?)
    | :(?P<weight>[+-]?[.\d]+)\)
    | (?P<bracket>[()\[\]])
    | (?P<text>[^\\()\[\]:]+ | :)
    """,
    re.VERBOSE,
)
# BREAK as a word of its own, swallowing the whitespace around it.
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class PromptSyntaxError(ValueError):
    """A weight that is not a number: `(word:1.2.3)` (A1111 fails on it too)."""


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """`text` as (piece, weight) pairs in order, neighbours of equal weight joined, BREAK
    as the pair BREAK; [("", 1.0)] for a text with nothing in it."""
    pieces: list[list[str | float]] = []
    # Where each bracket still open began, as an index into pieces.
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] = float(piece[1]) * factor

    for element in _ELEMENT.finditer(text):
        escape, weight, bracket = element["escape"], element["weight"], element["bracket"]
        if escape is not None:
            pieces.append([escape[1:], 1.0])
        elif bracket in ("(", "["):
            (open_round if bracket == "(" else open_square).append(len(pieces))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                raise PromptSyntaxError(f"({weight}) is not a weight") from None
            scale_from(open_round.pop(), factor)
        elif bracket == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif bracket == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:
            # Plain text, or a bracket or weight with nothing to close: literal.
            for index, part in enumerate(_BREAK.split(element[0])):
                if index:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    # Brackets left open weigh to the end: the round ones first, outermost first.
    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)
    joined: list[tuple[str, float]] = []
    for piece_text, piece_weight in pieces:
        if joined and joined[-1][1] == piece_weight:
            joined[-1] = (joined[-1][0] + str(piece_text), joined[-1][1])
        else:
            joined.append((str(piece_text), float(piece_weight)))
    return joined or [("", 1.0)]


# How a request's prompts are read: "a1111" (None): the syntax above; "plain": as text,
# every character literal and no BREAK (A1111's emphasis setting "None"). Both are encoded
# in 75-token chunks, so neither is cut at 77 tokens.
PROMPT_SYNTAXES = ("a1111", "plain")
DEFAULT_PROMPT_SYNTAX = "a1111"


def parse_prompt(text: str, syntax: str | None) -> list[tuple[str, float]]:
    """`text` as weighted pieces under `syntax` (one of PROMPT_SYNTAXES; None: the default)."""
    if (syntax or DEFAULT_PROMPT_SYNTAX) == "plain":
        return [(text, 1.0)]
    return parse_prompt_attention(text)


def prompt_problem(text: str, syntax: str | None) -> str | None:
    """Why `text` cannot be read under `syntax`, or None when it can."""
    try:
        parse_prompt(text, syntax)
    except PromptSyntaxError as error:
        return f"{error} (write \\( \\) for literal brackets)"
    return None
