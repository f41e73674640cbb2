"""Documents longer than the model: windows with their code point and byte ranges."""

from __future__ import annotations

import importlib
import inspect

import grpc
import numpy as np
import pytest

from akidb_embed_client import Chunk, EmbedClient, EmbedClientError
from tests.conftest import ServerThread

# Real text (a module docstring, far past 256 tokens) with CJK, emoji and combining marks.
MIXED = " ".join(
    [
        inspect.getdoc(importlib.import_module("argparse")) or "",
        "東京は日本の首都です。大阪は西日本の中心です。",
        "🙂🚀 launch day! 🎉 👩‍👩‍👧 family,",
        "cafe\u0301 nai\u0308ve Cre\u0300me bru\u0302le\u0301e, Zo\u00eb and A\u030angstro\u0308m.",
        inspect.getdoc(importlib.import_module("json")) or "",
    ]
)


@pytest.fixture(scope="module")
def client(server: ServerThread) -> EmbedClient:
    return EmbedClient(server.target, timeout=300)


def check_ranges(text: str, chunks: list[Chunk], overlap: bool) -> None:
    """Ranges cover the text without gaps (consecutive windows may overlap, no more), code
    point and byte ranges name the same slice."""
    assert chunks[0].char_start == 0 and chunks[0].byte_start == 0
    assert chunks[-1].char_end == len(text) and chunks[-1].byte_end == len(text.encode())
    data = text.encode()
    for k, chunk in enumerate(chunks):
        assert chunk.chunk_index == k and chunk.char_start < chunk.char_end
        piece = text[chunk.char_start : chunk.char_end]
        assert data[chunk.byte_start : chunk.byte_end].decode("utf-8") == piece
        if k:
            before = chunks[k - 1]
            if overlap:
                assert before.char_start < chunk.char_start <= before.char_end
            else:
                assert chunk.char_start == before.char_end


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(
    ("window", "overlap", "prompt"), [(0, 0, None), (64, 16, None), (48, 0, "query: ")]
)
def test_windows_cover_the_text_and_embed_as_their_slices(
    client: EmbedClient, window: int, overlap: int, prompt: str | None
) -> None:
    extra = {"prompt": prompt} if prompt else {}
    result = client.embed(
        [MIXED, "short text"],
        truncation="chunk",
        chunk_tokens=window,
        chunk_overlap_tokens=overlap,
        **extra,  # type: ignore[arg-type]
    )
    counts = result.chunk_counts
    assert len(counts) == 2 and counts[0] > 2 and counts[1] == 1
    assert result.vectors.shape == (sum(counts), 384)
    assert len(result.chunks) == sum(counts) and not any(result.truncated)
    limit = window or 256
    assert max(result.token_counts) <= limit
    mine = result.chunks[result.text_rows(0)]
    check_ranges(MIXED, mine, overlap=overlap > 0)
    assert result.chunks[-1] == Chunk(0, 0, 10, 0, 10)
    # The prompt goes before every window and is not part of the ranges.
    slices = [MIXED[c.char_start : c.char_end] for c in mine]
    alone = client.embed(slices, truncation="error", **extra).vectors  # type: ignore[arg-type]
    cos = cosines(result.vectors[result.text_rows(0)], alone)
    print(f"window {limit}, overlap {overlap}: {len(mine)} chunks, min cosine {cos.min():.8f}")
    assert cos.min() >= 0.9999


def test_one_token_over_the_limit_gives_two_chunks(client: EmbedClient) -> None:
    # "cat" is one token; [CLS] and [SEP] make 254 words exactly the 256 of the model.
    fits = " ".join(["cat"] * 254)
    over = " ".join(["cat"] * 255)
    result = client.embed([fits, over], truncation="chunk")
    assert result.chunk_counts == [1, 2]
    assert result.token_counts[0] == 256
    check_ranges(over, result.chunks[1:], overlap=False)


def test_stream_keeps_an_items_chunks_together(client: EmbedClient) -> None:
    items = [("doc", MIXED), ("empty", ""), ("small", "a short one")]
    results = list(client.embed_stream(items, truncation="chunk", chunk_tokens=64))
    assert [r.id for r in results] == ["doc", "empty", "small"]
    doc, empty, small = results
    assert empty.error is not None and empty.error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert doc.vector is not None and doc.chunks is not None
    assert doc.vector.shape == (len(doc.chunks), 384) and len(doc.chunks) > 4
    check_ranges(MIXED, doc.chunks, overlap=False)
    unary = client.embed([MIXED], truncation="chunk", chunk_tokens=64)
    np.testing.assert_allclose(doc.vector, unary.vectors, atol=1e-5)
    assert small.vector is not None and small.vector.shape == (1, 384)


def test_bad_chunk_options_and_the_window_limit(client: EmbedClient) -> None:
    cases = [
        ({"chunk_tokens": 4096}, "chunk_tokens=4096 is more than model"),
        ({"chunk_tokens": 16, "chunk_overlap_tokens": 14}, "not more than the overlap"),
    ]
    for options, expected in cases:
        with pytest.raises(EmbedClientError) as info:
            client.embed([MIXED], truncation="chunk", **options)  # type: ignore[arg-type]
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in info.value.message
    # Limits count windows: 2100 tokens in windows of 2 text tokens are 1050 > 1024.
    huge = " ".join(["cat"] * 2100)
    with pytest.raises(EmbedClientError) as info:
        client.embed([huge], truncation="chunk", chunk_tokens=4)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "1050 chunk windows; the limit is 1024" in info.value.message
    (item,) = client.embed_stream([huge], truncation="chunk", chunk_tokens=4)
    assert item.error is not None and "1050 chunk windows" in item.error.message
