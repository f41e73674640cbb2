"""Tokenising groups: packed ids equal the tokenizer's own, long texts are only tokenised as
far as the window needs and still give the same ids, over-limit texts are reported."""

from __future__ import annotations

import time

import pytest

from akidb_embed.modeling.engine import EmbedOptions
from akidb_embed.modeling.loader import load_engine
from akidb_embed.modeling.tokenization import TextTokenizer, Truncation
from akidb_embed.store.registry import bundled_minilm_dir

MINILM = bundled_minilm_dir()
pytestmark = pytest.mark.skipif(MINILM is None, reason="the bundled model is not installed")

TEXTS = [
    "hello world",
    "word " * 5000,  # far over the window: tokenised from a cut
    " " * 100_000 + "only the end has words",  # a cut of spaces holds no tokens: widened
    "日本語の文章です。" * 3000,
    "é" * 70_000,  # one 70,000-character word: [UNK]
    "🙂 emoji",
]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    assert MINILM is not None
    return load_engine(MINILM, name="m", source="m", revision="r").tokenizer


@pytest.mark.parametrize("policy", [Truncation.END, Truncation.START])
def test_packed_ids_equal_the_tokenizers_own_on_the_whole_text(
    tokenizer: TextTokenizer, policy: Truncation
) -> None:
    reference = tokenizer._by_policy[policy].encode_batch(TEXTS)
    for group in (TEXTS[:1], TEXTS, TEXTS * 2):
        batch = tokenizer.encode_batch(group, policy)
        assert len(batch) == len(group)
        for i in range(len(group)):
            assert batch.row(i).tolist() == reference[i % len(TEXTS)].ids, (policy, i)
            assert bool(batch.truncated[i]) == bool(reference[i % len(TEXTS)].overflowing)
    assert list(tokenizer.encode_batch(TEXTS, policy).truncated) == [
        False, True, False, True, False, False
    ]  # fmt: skip


def test_error_policy_lists_the_texts_over_the_limit(tokenizer: TextTokenizer) -> None:
    batch = tokenizer.encode_batch(TEXTS, Truncation.ERROR)
    assert sorted(batch.too_long) == [1, 3]
    assert "more than 256 tokens" in batch.too_long[1]
    assert len(batch.row(1)) == 0 and len(batch.row(0)) == 4


def test_a_huge_text_costs_what_its_window_costs(tokenizer: TextTokenizer) -> None:
    texts = ["word " * 40_000] * 200  # 200 texts of 200 KB
    started = time.perf_counter()
    batch = tokenizer.encode_batch(texts, Truncation.END)
    # Whole texts took ~60 s for 1,000 of 60 KB; a window's worth is milliseconds each.
    assert time.perf_counter() - started < 20
    assert set(batch.lengths.tolist()) == {256} and batch.truncated.all()


def test_prompts_come_before_the_text(tokenizer: TextTokenizer) -> None:
    assert MINILM is not None
    engine = load_engine(MINILM, name="m", source="m", revision="r")
    plain = engine.tokenize_batch(["a text"], EmbedOptions())
    from akidb_embed.modeling.engine import PromptKind

    prompted = engine.tokenize_batch(
        ["a text"], EmbedOptions(prompt_kind=PromptKind.LITERAL, prompt_value="query: ")
    )
    assert len(prompted.row(0)) > len(plain.row(0))
    assert prompted.row(0).tolist()[-3:] == plain.row(0).tolist()[-3:]
