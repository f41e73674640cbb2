"""Output encodings through the real server: typed arrays, bytes on the wire, spaces."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from akidb_embed_client import EmbedClient
from tests.conftest import ServerThread

TEXTS = [
    "The cat sat on the mat.",
    "Vector databases index embeddings for similarity search.",
    "東京は日本の首都です。",
    "🙂 emoji and symbols ∑∫√",
]
EXPECTED = {
    "float32": (np.float32, 384, 4 * 384),
    "float16": (np.float16, 384, 2 * 384),
    "int8": (np.int8, 384, 384),
    "uint8": (np.uint8, 384, 384),
    "binary": (np.int8, 48, 48),
    "ubinary": (np.uint8, 48, 48),
}


@pytest.fixture(scope="module")
def client(server: ServerThread) -> EmbedClient:
    # The first int8 request calibrates the model once (512 passages).
    return EmbedClient(server.target, timeout=300)


def test_each_encoding_gives_its_typed_array_and_its_own_space(client: EmbedClient) -> None:
    base = client.embed(TEXTS)
    spaces = {}
    for name, (dtype, width, row_bytes) in EXPECTED.items():
        result = client.embed(TEXTS, encoding=name)  # type: ignore[typeddict-item]
        assert result.vectors.dtype == dtype, name
        assert result.vectors.shape == (len(TEXTS), width), name
        assert result.vectors.nbytes == len(TEXTS) * row_bytes
        assert result.space.encoding == name and result.space.dimensions == 384
        assert bool(result.space.ranges_id) == (name in ("int8", "uint8"))
        spaces[name] = result.space.fingerprint
        print(f"{name}: {row_bytes} bytes a vector")
    # float32 keeps the fingerprint it had before encodings; every other encoding differs.
    assert spaces["float32"] == base.space.fingerprint
    assert len(set(spaces.values())) == len(spaces)
    np.testing.assert_array_equal(
        client.embed(TEXTS, encoding="float16").vectors, base.vectors.astype(np.float16)
    )
    bits = np.unpackbits(client.embed(TEXTS, encoding="ubinary").vectors, axis=1)
    np.testing.assert_array_equal(bits.astype(bool), base.vectors > 0)


def test_int8_ranges_in_list_models_match_the_vectors(client: EmbedClient) -> None:
    result = client.embed(TEXTS, encoding="int8")
    info = next(m for m in client.list_models() if m.name == "all-minilm-l6-v2")
    ranges = info.ranges()
    assert ranges is not None and ranges.id == result.space.ranges_id
    assert ranges.min.shape == (384,) and (ranges.min < ranges.max).all()
    assert ranges.calibration_texts == 512 and ranges.normalized
    assert info.self_check.startswith(("passed", "recorded")), info.self_check
    floats = client.embed(TEXTS).vectors
    restored = ranges.dequantize(result.vectors)
    step = (ranges.max - ranges.min) / 255
    inside = (floats >= ranges.min) & (floats <= ranges.max)
    error = np.abs(restored - floats) / step
    assert error[inside].max() <= 1.0 + 1e-3
    uint8 = client.embed(TEXTS, encoding="uint8").vectors
    np.testing.assert_array_equal(uint8.astype(np.int16) - 128, result.vectors)


def test_stream_items_come_back_encoded(client: EmbedClient) -> None:
    items = [(f"id{i}", text) for i, text in enumerate(TEXTS)] + [("bad", "")]
    results = list(client.embed_stream(items, encoding="binary"))
    assert [r.id for r in results] == [*(f"id{i}" for i in range(len(TEXTS))), "bad"]
    assert results[-1].error is not None
    expected = client.embed(TEXTS, encoding="binary").vectors
    got = np.stack([r.vector for r in results[:-1] if r.vector is not None])
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, expected)
    assert results[0].space is not None and results[0].space.encoding == "binary"
    int8 = [r.vector for r in client.embed_stream(TEXTS, encoding="int8")]
    np.testing.assert_array_equal(np.stack(int8), client.embed(TEXTS, encoding="int8").vectors)


def test_bad_encoding_and_chunk_options_are_invalid_argument(server: ServerThread) -> None:
    with grpc.insecure_channel(f"unix:{server.target}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for options, expected in (
            (pb.EmbedOptions(encoding=42), "FLOAT32, FLOAT16, INT8, UINT8, BINARY or UBINARY"),
            (pb.EmbedOptions(chunk_tokens=64), "only with truncation CHUNK"),
            (pb.EmbedOptions(truncation=9), "ERROR, END, START or CHUNK"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.Embed(pb.EmbedRequest(texts=["x"], options=options), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert expected in (info.value.details() or "")
    with EmbedClient(server.target) as client, pytest.raises(ValueError, match="int8"):
        client.embed(["x"], encoding="int4")  # type: ignore[typeddict-item]


def test_raw_batch_says_its_encoding(server: ServerThread) -> None:
    with grpc.insecure_channel(f"unix:{server.target}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        reply = stub.Embed(
            pb.EmbedRequest(texts=TEXTS, options=pb.EmbedOptions(encoding=pb.ENCODING_UBINARY)),
            timeout=60,
        )
    batch = reply.embeddings
    assert batch.encoding == pb.ENCODING_UBINARY and batch.dimensions == 384
    assert len(batch.vectors) == len(TEXTS) * 48
    assert reply.space.encoding == pb.ENCODING_UBINARY
