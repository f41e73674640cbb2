"""Text -> token ids with the model's own tokenizer.json, under a truncation policy.

The hot path tokenises whole groups with one batch call and returns them packed: one int32
array of every text's ids and one offsets array (`TokenBatch`), not a list per text.

A text far longer than the model's window is tokenised only as far as the window needs: its
first (END) or last (START) characters, widened until they hold more tokens than the window,
so a 200 KB text costs what a window of it costs, in time and in memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from ..errors import InvalidArgument
from .chunking import Chunks, chunk_texts


class Truncation(Enum):
    ERROR = "error"  # reject texts over the limit
    END = "end"  # keep the start
    START = "start"  # keep the end
    CHUNK = "chunk"  # split into windows (chunking.py), each embedded


@dataclass(frozen=True)
class TokenizedText:
    ids: list[int]
    truncated: bool


# A window's worth of characters to tokenise first: a token rarely spans more than this many
# characters on average; a text whose cut holds too few tokens is widened (x4) and tried again.
CHARS_PER_TOKEN_BOUND = 16


# Groups up to this size are tokenised text by text.
SMALL_GROUP = 4


@dataclass(frozen=True)
class TokenBatch:
    """Several texts' token ids, packed: text i is `ids[offsets[i]:offsets[i+1]]`."""

    ids: np.ndarray  # int32, every text's ids back to back
    offsets: np.ndarray  # int64, len(texts) + 1
    truncated: np.ndarray  # bool, per text
    # Texts over the limit under Truncation.ERROR: index -> message (their ids are empty).
    too_long: dict[int, str]

    def __len__(self) -> int:
        return len(self.truncated)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, index: int) -> np.ndarray:
        return self.ids[self.offsets[index] : self.offsets[index + 1]]

    def select(self, rows: np.ndarray) -> TokenBatch:
        """The batch of only these rows, in this order."""
        chunks = [self.row(i) for i in rows.tolist()]
        lengths = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
        offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
        return TokenBatch(ids.astype(np.int32, copy=False), offsets, self.truncated[rows], {})

    def texts(self) -> list[TokenizedText]:
        """One object per text (tests and tools; the server keeps the packed form)."""
        return [
            TokenizedText(self.row(i).tolist(), bool(self.truncated[i])) for i in range(len(self))
        ]


def pack(rows: Sequence[Sequence[int]]) -> TokenBatch:
    """A TokenBatch of ready-made id lists (none truncated)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
    return TokenBatch(flat, offsets, np.zeros(len(rows), dtype=bool), {})


class TextTokenizer:
    """Wraps `tokenizers.Tokenizer`; padding is the batcher's job, never the tokenizer's."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        # Some tokenizer.json files bake in truncation and fixed padding
        # (all-MiniLM-L6-v2: 128 and 128); sentence-transformers overrides them too.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._unbounded = tokenizer
        self._by_policy = {
            Truncation.END: self._truncating(tokenizer, "right"),
            Truncation.START: self._truncating(tokenizer, "left"),
        }
        self._cut_chars = max(256, CHARS_PER_TOKEN_BOUND * max_tokens)

    @classmethod
    def from_file(cls, path: Path, max_tokens: int) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)), max_tokens)

    def _truncating(self, tokenizer: Tokenizer, direction: str) -> Tokenizer:
        copy = Tokenizer.from_str(tokenizer.to_str())
        copy.enable_truncation(self.max_tokens, direction=direction)
        return copy

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1 (added tokens included)."""
        return int(self._unbounded.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int | None:
        return self._unbounded.token_to_id(token)

    def _cut(self, text: str, chars: int, policy: Truncation) -> str:
        if len(text) <= chars:
            return text
        # Cut at a space where there is one near the cut, so no word is split at the edge.
        slack = chars // 8
        if policy is Truncation.START:
            start = len(text) - chars
            space = text.find(" ", start, start + slack)
            return text[space + 1 if space >= 0 else start :]
        space = text.rfind(" ", chars - slack, chars)
        return text[: space if space >= 0 else chars]

    @staticmethod
    def _encode_cuts(tokenizer: Tokenizer, texts: list[str]) -> list[Encoding]:
        """A few texts one by one (the batch call wakes a thread pool, which costs more than
        a query's text), more with the batch call."""
        if len(texts) <= SMALL_GROUP:
            return [tokenizer.encode(text) for text in texts]
        return tokenizer.encode_batch_fast(texts)

    def _encode_all(self, texts: Sequence[str], policy: Truncation) -> list[Encoding]:
        """Each text's encoding, truncated to max_tokens, tokenising only cuts of long texts
        (a cut that overflows the window has the same first/last max_tokens tokens as the
        whole text)."""
        tokenizer = self._by_policy[
            Truncation.START if policy is Truncation.START else Truncation.END
        ]
        chars = self._cut_chars
        cuts = [self._cut(t, chars, policy) for t in texts]
        encodings = self._encode_cuts(tokenizer, cuts)
        # Cut texts whose cut holds too few tokens (e.g. long runs of spaces): widen them.
        retry = [i for i, t in enumerate(texts) if len(cuts[i]) < len(t)]
        while retry:
            retry = [i for i in retry if not encodings[i].overflowing]
            if not retry:
                break
            chars *= 4
            wider = [self._cut(texts[i], chars, policy) for i in retry]
            for i, enc in zip(retry, self._encode_cuts(tokenizer, wider), strict=True):
                encodings[i] = enc
            retry = [i for i, w in zip(retry, wider, strict=True) if len(w) < len(texts[i])]
        return encodings

    def encode_batch(self, texts: Sequence[str], policy: Truncation) -> TokenBatch:
        """Tokenise a group. Under ERROR, texts over the limit are listed in `too_long`
        (with empty ids) for the caller to report: per item in a stream, or for the call."""
        encodings = self._encode_all(texts, policy)
        over = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(texts))
        rows = [enc.ids for enc in encodings]
        too_long: dict[int, str] = {}
        if policy is Truncation.ERROR and over.any():
            limit = self.max_tokens
            for index in np.flatnonzero(over).tolist():
                too_long[index] = (
                    f"has more than {limit} tokens but the model accepts at most {limit}: "
                    "shorten it, or set truncation to END or START"
                )
                rows[index] = []
            over = np.zeros(len(texts), dtype=bool)
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(
            itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1])
        )
        return TokenBatch(flat, offsets, over, too_long)

    def encode_chunks(
        self, texts: Sequence[str], prefix: str, window: int, overlap: int
    ) -> tuple[TokenBatch, Chunks]:
        """Truncation.CHUNK: every text's windows packed (one row per window) and which
        rows are whose, with their ranges (chunking.py)."""
        rows, chunks = chunk_texts(self._unbounded, texts, prefix, window, overlap)
        return pack(rows), chunks

    def encode(self, texts: list[str], policy: Truncation) -> list[TokenizedText]:
        """Tokenise a batch; raises InvalidArgument naming the first text over the limit."""
        batch = self.encode_batch(texts, policy)
        if batch.too_long:
            index = min(batch.too_long)
            raise InvalidArgument(f"text {index} {batch.too_long[index]}")
        return batch.texts()
