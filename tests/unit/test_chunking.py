"""Window planning on its own: coverage, byte ranges and window sizes, with a WordPiece
tokenizer (the bundled model's) and a byte-level BPE one that splits characters into bytes."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from akidb_embed.errors import InvalidArgument
from akidb_embed.modeling.chunking import utf8_offsets
from akidb_embed.modeling.corpus import calibration_texts
from akidb_embed.modeling.tokenization import TextTokenizer, Truncation
from akidb_embed.store.registry import bundled_minilm_dir

PIECES = ["東京都", "🙂", "👩‍👩‍👧", "e\u0301", "naïve", "Ångström", "  ", "\n", "x", "ß", "𝔘𝔫𝔦"]


def mixed_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    passages = calibration_texts()
    out = []
    for _ in range(count):
        words = " ".join(rng.sample(passages, 3)).split(" ")
        for _ in range(len(words) // 4):
            words.insert(rng.randrange(len(words)), rng.choice(PIECES))
        out.append(" ".join(words))
    return out


def byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], show_progress=False)
    tokenizer.train_from_iterator(calibration_texts()[:200], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", tokenizer.token_to_id("<eos>"))]
    )
    return tokenizer


def tokenizers() -> list[tuple[str, TextTokenizer]]:
    path = bundled_minilm_dir()
    assert path is not None
    return [
        ("wordpiece", TextTokenizer.from_file(path / "tokenizer.json", 256)),
        ("byte-level-bpe", TextTokenizer(byte_level_bpe(), 512)),
    ]


@pytest.mark.parametrize(("name", "tokenizer"), tokenizers())
@pytest.mark.parametrize(("window", "overlap", "prefix"), [(16, 0, ""), (40, 8, "query: ")])
def test_windows_cover_every_text_and_fit(
    name: str, tokenizer: TextTokenizer, window: int, overlap: int, prefix: str
) -> None:
    texts = mixed_texts(20, seed=window)
    batch, chunks = tokenizer.encode_chunks(texts, prefix, window, overlap)
    assert len(batch) == len(chunks) == int(chunks.counts.sum())
    assert int(batch.lengths.max()) <= window
    row = 0
    for text, count in zip(texts, chunks.counts.tolist(), strict=True):
        data = text.encode()
        assert chunks.char_start[row] == 0 and chunks.char_end[row + count - 1] == len(text)
        assert chunks.byte_end[row + count - 1] == len(data)
        for k in range(count):
            a, b = int(chunks.char_start[row + k]), int(chunks.char_end[row + k])
            assert chunks.index[row + k] == k and a < b
            piece = data[chunks.byte_start[row + k] : chunks.byte_end[row + k]].decode("utf-8")
            assert piece == text[a:b]
            # The window's ids are the slice's own, prompt first.
            alone = tokenizer.encode_batch([prefix + text[a:b]], Truncation.ERROR).row(0)
            assert batch.row(row + k).tolist() == alone.tolist()
            if k:
                before = int(chunks.char_end[row + k - 1])
                assert (a < before) if overlap else (a == before), (name, k)
        row += count


def test_utf8_offsets_and_bad_windows() -> None:
    text = "aé東🙂"
    assert utf8_offsets(text).tolist() == [0, 1, 3, 6, 10]
    _, tokenizer = tokenizers()[0]
    with pytest.raises(InvalidArgument, match="not more than the overlap"):
        tokenizer.encode_chunks(["some text"], "", 6, 4)
