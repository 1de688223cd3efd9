"""AUTOMATIC1111's prompt emphasis ("Original"), read and cut into chunks (pure Python, no torch).

`parse` turns a prompt into (text, weight) fragments as A1111's ``parse_prompt_attention`` does;
`chunks` tokenizes each fragment on its own and lays the tokens out in A1111's 77-token chunks.
The encoding (`t2i_compel._a1111`) reads what these return.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import attrs

from t2i_core import InvalidRequestError

#: ``(x)`` multiplies a fragment's weight by this, ``[x]`` divides it
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
#: prompt tokens in a chunk, between its start and end tokens
CHUNK_LENGTH = 75
#: a chunk filled up within this many tokens of a comma moves the words after the comma to the next
COMMA_BACKTRACK = 20
#: the weight A1111 gives the BREAK marker (any other weight makes "BREAK" a word)
BREAK_WEIGHT = -1.0

_ATTENTION = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\] | \\\\ | \\     # escapes (a lone backslash escapes nothing and is dropped)
    | \( | \[                                # openings
    | :\s*([+-]?[.\d]+)\s*\)                 # (text:weight) closes with its weight
    | \) | ]                                 # closings
    | [^\\()\[\]:]+                          # text
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
# Prompt editing ([from:to:when]), alternation ([a|b]) and AND are A1111 syntax that t2i does not run.
_SCHEDULED = re.compile(r"(?<!\\)\[[^\[\]]*:\s*[+-]?[\d.]+\s*(?<!\\)\]")
_ALTERNATE = re.compile(r"(?<!\\)\[[^\[\]]*\|[^\[\]]*(?<!\\)\]")
_AND = re.compile(r"\bAND\b")

ALLOWED = r"A1111 emphasis: (word), [word], (word:1.3), \( \) \[ \] for brackets, BREAK"


def parse(text: str) -> list[tuple[str, float]]:
    """`text`'s fragments and their weights, as A1111's ``parse_prompt_attention`` gives them.

    A BREAK is the fragment ``("BREAK", -1.0)``; brackets left open close at the end; neighbouring
    fragments of equal weight are merged. Raises `ValueError` on a weight that is not a number.
    """
    fragments: list[list[str | float]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] = float(fragment[1]) * multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    fragments.append(["BREAK", BREAK_WEIGHT])
                fragments.append([part, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    if not fragments:
        fragments = [["", 1.0]]
    merged: list[list[str | float]] = [fragments[0]]
    for fragment in fragments[1:]:
        if merged[-1][1] == fragment[1]:
            merged[-1][0] = str(merged[-1][0]) + str(fragment[0])
        else:
            merged.append(fragment)
    return [(str(t), float(w)) for t, w in merged]


def check_syntax(field: str, text: str) -> None:
    """Refuse what A1111 would read otherwise than t2i does: prompt editing, alternation, AND, bad weights."""
    for pattern, what in (
        (_SCHEDULED, "prompt editing [from:to:when] is not supported"),
        (_ALTERNATE, "alternation [a|b] is not supported"),
        (_AND, "AND (composable diffusion) is not supported"),
    ):
        found = pattern.search(text)
        if found:
            raise InvalidRequestError(field, text, f"{ALLOWED}; {what} (found {found.group(0)!r})")
    try:
        parse(text)
    except ValueError as exc:
        raise InvalidRequestError(field, text, f"{ALLOWED}; a weight must be a number ({exc})") from None


@attrs.frozen
class Chunk:
    """One 77-token window: ids (start, prompt tokens, end, padding) and each token's weight."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]


@attrs.frozen(kw_only=True)
class Vocabulary:
    """The token ids chunking needs from a tokenizer, and its `tokenize` (text → ids, no special tokens)."""

    tokenize: Callable[[str], Sequence[int]]
    start: int
    end: int
    pad: int
    comma: int | None


def chunks(fragments: Sequence[tuple[str, float]], vocabulary: Vocabulary) -> list[Chunk]:
    """Lay `fragments` out in chunks as A1111's ``tokenize_line`` does.

    Each fragment is tokenized on its own. A chunk holds up to 75 tokens; when one fills up less
    than `COMMA_BACKTRACK` tokens after a comma, the tokens after that comma start the next chunk.
    A BREAK ends the chunk. Chunks are padded with the end token to 75, framed by the start and end
    tokens, and then everything after the first end token becomes the pad token (which is the end
    token itself for SD 1.x's CLIP).
    """
    done: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        filler = CHUNK_LENGTH - len(tokens)
        ids = [vocabulary.start, *tokens, *[vocabulary.end] * filler, vocabulary.end]
        first_end = ids.index(vocabulary.end)
        ids[first_end + 1 :] = [vocabulary.pad] * (len(ids) - first_end - 1)
        done.append(Chunk(tuple(ids), (1.0, *weights, *[1.0] * filler, 1.0)))
        tokens, weights, last_comma = [], [], -1

    for text, weight in fragments:
        if text == "BREAK" and weight == BREAK_WEIGHT:
            close()
            continue
        for token in vocabulary.tokenize(text):
            if token == vocabulary.comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_LENGTH and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                moved_tokens, moved_weights = tokens[last_comma + 1 :], weights[last_comma + 1 :]
                tokens, weights = tokens[: last_comma + 1], weights[: last_comma + 1]
                close()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK_LENGTH:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not done:
        close()
    return done
