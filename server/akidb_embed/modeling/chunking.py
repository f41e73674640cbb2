"""Documents longer than the model: token windows with their ranges in the original text.

A text is tokenised once without special tokens (character offsets come back per token),
cut into windows of at most `room` tokens (the window less the special tokens and the
prompt's tokens), preferring cuts between words so no word and never a character is split,
consecutive windows sharing `overlap` tokens. Each window's ids are then those of the
prompt + the window's slice of the text, tokenised on its own: embedding
`text[char_start:char_end]` alone gives the same vector. Ranges cover the text without gaps:
a window runs from its first token to where the next window's new tokens start (whitespace
and characters the tokenizer drops go to the window before), the first from 0, the last to
the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding, Tokenizer

from ..errors import InvalidArgument


@dataclass(frozen=True)
class Chunks:
    """Which rows belong to which text, and each row's window: per text `counts`; per row
    the window's index in its text and its code point and UTF-8 byte ranges."""

    counts: np.ndarray  # int64, per text
    index: np.ndarray  # uint32, per row
    char_start: np.ndarray
    char_end: np.ndarray
    byte_start: np.ndarray
    byte_end: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    @property
    def text_of_row(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.counts)), self.counts)

    def select_rows(self, rows: np.ndarray, counts: np.ndarray) -> Chunks:
        return Chunks(
            counts,
            self.index[rows],
            self.char_start[rows],
            self.char_end[rows],
            self.byte_start[rows],
            self.byte_end[rows],
        )


def utf8_offsets(text: str) -> np.ndarray:
    """Byte offset of every code point boundary: len(text) + 1 values."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    sizes = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
    out = np.zeros(len(points) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def plan_windows(encoding: Encoding, room: int, overlap: int) -> list[tuple[int, int]]:
    """Token spans [start, stop) of at most `room` tokens, consecutive ones sharing about
    `overlap` tokens, cut between words where a word fits (else between tokens of distinct
    characters)."""
    n = len(encoding.ids)
    if n <= room:
        return [(0, n)]
    words = encoding.word_ids
    starts = [offset[0] for offset in encoding.offsets]

    def can_cut(i: int) -> bool:  # between token i-1 and token i
        if i <= 0 or i >= n:
            return True
        return words[i] != words[i - 1] or words[i] is None

    def splits_char(i: int) -> bool:  # byte-level BPE: two tokens of one character
        return 0 < i < n and starts[i] == starts[i - 1]

    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        stop = min(start + room, n)
        if stop < n:
            cut = stop
            while cut > start + 1 and not can_cut(cut):
                cut -= 1
            if cut <= start + 1:  # one word longer than the window: cut inside it
                cut = stop
                while cut > start + 1 and splits_char(cut):
                    cut -= 1
            stop = cut
        spans.append((start, stop))
        if stop >= n:
            return spans
        following = stop - overlap if overlap else stop
        while following > start + 1 and following < stop and not can_cut(following):
            following -= 1
        start = following if start < following <= stop else stop


def chunk_texts(
    unbounded: Tokenizer,
    texts: Sequence[str],
    prefix: str,
    window: int,
    overlap: int,
) -> tuple[list[list[int]], Chunks]:
    """Every text's windows: their ids (prompt and special tokens included) and ranges."""
    specials = unbounded.num_special_tokens_to_add(False)
    prefix_tokens = len(unbounded.encode(prefix, add_special_tokens=False).ids) if prefix else 0
    room = window - specials - prefix_tokens
    if room <= overlap:
        raise InvalidArgument(
            f"chunk windows of {window} tokens leave {max(room, 0)} for text after "
            f"{specials} special and {prefix_tokens} prompt tokens, not more than the overlap "
            f"of {overlap}: use a larger chunk_tokens or a smaller chunk_overlap_tokens"
        )
    encodings = unbounded.encode_batch(list(texts), add_special_tokens=False)
    plans = [_plan(e, len(t), room, overlap) for t, e in zip(texts, encodings, strict=True)]
    slices = [prefix + text[a:b] for text, plan in zip(texts, plans, strict=True) for a, b in plan]
    flat = [e.ids for e in unbounded.encode_batch(slices)]  # one batch call for all windows
    per_text: list[list[list[int]]] = []
    cursor = 0
    for t, plan in enumerate(plans):
        ids = flat[cursor : cursor + len(plan)]
        cursor += len(plan)
        budget = room
        # Rare: a slice tokenises longer on its own than inside the text (byte-level BPE
        # at an edge); plan that text again with less room until it fits.
        while max(map(len, ids)) > window and budget > overlap + 1:
            budget = max(overlap + 1, budget - (max(map(len, ids)) - window))
            plan = plans[t] = _plan(encodings[t], len(texts[t]), budget, overlap)
            ids = [e.ids for e in unbounded.encode_batch([prefix + texts[t][a:b] for a, b in plan])]
        if max(map(len, ids)) > window:
            raise InvalidArgument(
                f"text {t} cannot be cut into windows of {window} tokens: a slice of it "
                "tokenises longer on its own; use a larger chunk_tokens"
            )
        per_text.append(ids)
    rows: list[list[int]] = []
    counts = np.zeros(len(texts), dtype=np.int64)
    index: list[int] = []
    ranges: list[tuple[int, int, int, int]] = []
    for t, (text, plan, ids) in enumerate(zip(texts, plans, per_text, strict=True)):
        offsets = utf8_offsets(text) if not text.isascii() else None
        counts[t] = len(plan)
        for k, (a, b) in enumerate(plan):
            index.append(k)
            if offsets is None:
                ranges.append((a, b, a, b))
            else:
                ranges.append((a, b, int(offsets[a]), int(offsets[b])))
        rows.extend(ids)
    table = np.asarray(ranges, dtype=np.uint32).reshape(-1, 4)
    return rows, Chunks(
        counts,
        np.asarray(index, dtype=np.uint32),
        table[:, 0].copy(),
        table[:, 1].copy(),
        table[:, 2].copy(),
        table[:, 3].copy(),
    )


def _plan(encoding: Encoding, length: int, room: int, overlap: int) -> list[tuple[int, int]]:
    spans = plan_windows(encoding, room, min(overlap, room - 1))
    return _char_bounds(encoding, spans, length)


def _char_bounds(
    encoding: Encoding, spans: list[tuple[int, int]], length: int
) -> list[tuple[int, int]]:
    """Code point ranges of token spans, covering [0, length) with no gaps."""
    offsets = encoding.offsets
    bounds = []
    for k, (start, stop) in enumerate(spans):
        a = 0 if k == 0 else offsets[start][0]
        # To where the next window's tokens that are not in this one start.
        b = offsets[stop][0] if k + 1 < len(spans) and stop < len(offsets) else length
        bounds.append((a, max(a, b)))
    return bounds
