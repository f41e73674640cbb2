"""Text -> token ids with the model's own tokenizer.json, under a truncation policy."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from tokenizers import Tokenizer

from .errors import InvalidArgument


class Truncation(Enum):
    ERROR = "error"  # reject texts over the limit
    END = "end"  # keep the start
    START = "start"  # keep the end


@dataclass(frozen=True)
class TokenizedText:
    ids: list[int]
    truncated: bool


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

    def encode(self, texts: list[str], policy: Truncation) -> list[TokenizedText]:
        """Tokenise a batch; raises InvalidArgument naming the first text over the limit."""
        if policy is Truncation.ERROR:
            encodings = self._unbounded.encode_batch(texts)
            for index, enc in enumerate(encodings):
                if len(enc.ids) > self.max_tokens:
                    raise InvalidArgument(
                        f"text {index} has {len(enc.ids)} tokens but the model accepts at most "
                        f"{self.max_tokens}: shorten it, or set truncation to END or START"
                    )
            return [TokenizedText(list(enc.ids), False) for enc in encodings]
        encodings = self._by_policy[policy].encode_batch(texts)
        return [TokenizedText(list(enc.ids), bool(enc.overflowing)) for enc in encodings]
