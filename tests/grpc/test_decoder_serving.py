"""Decoder models through the real server: Qwen3 instructions and Matryoshka sizes, Gemma
prompts and its fixed Matryoshka sizes, on tiny random checkpoints (parity with transformers
is tests/parity/test_decoders.py)."""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest

from akidb_embed.api.server import ServerConfig
from akidb_embed_client import EmbedClient, EmbedClientError
from tests.conftest import ServerThread
from tests.fixtures import tiny_models as tiny

TEXTS = tiny.sample_texts(6, seed=3)


@pytest.fixture(scope="module")
def decoder_server(tmp_path_factory: pytest.TempPathFactory) -> ServerThread:
    root = tmp_path_factory.mktemp("decoder-models")
    qwen = tiny.build_qwen3(root / "tiny-qwen3")
    gemma = tiny.build_gemma3(root / "tiny-gemma")
    sock = tmp_path_factory.mktemp("sock") / "embed.sock"
    config = ServerConfig(socket_path=sock, models=[], local_model_dirs=[qwen, gemma])
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def test_qwen3_instruction_matryoshka_and_listing(decoder_server: ServerThread) -> None:
    with EmbedClient(decoder_server.target, timeout=60) as client:
        full = client.embed(TEXTS, model="tiny-qwen3")
        assert full.space.pooling == "last_token"
        native = full.space.dimensions
        # Matryoshka: the first 32 values of the raw vector, re-normalised.
        raw = client.embed(TEXTS, model="tiny-qwen3", normalize=False).vectors
        small = client.embed(TEXTS, model="tiny-qwen3", dimensions=32)
        expected = raw[:, :32] / np.linalg.norm(raw[:, :32], axis=1, keepdims=True)
        np.testing.assert_allclose(small.vectors, expected, atol=1e-5)
        assert small.space.dimensions == 32 and small.space.fingerprint != full.space.fingerprint
        with pytest.raises(EmbedClientError) as info:
            client.embed(TEXTS, model="tiny-qwen3", dimensions=16)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"from 32 to {native}" in info.value.message
        # An instruction is formatted with the model's template: same as the literal prefix.
        task = "Given a question, retrieve passages that answer it"
        by_instruction = client.embed(TEXTS[:2], model="tiny-qwen3", instruction=task).vectors
        literal = client.embed(
            TEXTS[:2], model="tiny-qwen3", prompt=f"Instruct: {task}\nQuery:"
        ).vectors
        np.testing.assert_allclose(by_instruction, literal, atol=1e-6)
        assert float(by_instruction[0] @ full.vectors[0]) < 0.9999
        info_by_name = {m.name: m for m in client.list_models()}
        qwen = info_by_name["tiny-qwen3"]
        assert qwen.state == "loaded" and qwen.architecture == "qwen3"
        assert "query" in qwen.prompts and qwen.pooling == "last_token"


def test_gemma_prompts_and_fixed_matryoshka_sizes(decoder_server: ServerThread) -> None:
    with EmbedClient(decoder_server.target, timeout=60) as client:
        query = client.embed(TEXTS, model="tiny-gemma", prompt_name="query")
        document = client.embed(TEXTS, model="tiny-gemma", prompt_name="document")
        assert query.space.pooling == "mean"
        assert (np.sum(query.vectors * document.vectors, axis=1) < 0.9999).all()
        gemma = {m.name: m for m in client.list_models()}["tiny-gemma"]
        assert gemma.architecture == "gemma3_text"
        assert list(gemma.matryoshka_dimensions)
        size = sorted(gemma.matryoshka_dimensions)[0]
        assert client.embed(TEXTS, model="tiny-gemma", dimensions=size).vectors.shape[1] == size
        with pytest.raises(EmbedClientError) as info:
            client.embed(TEXTS, model="tiny-gemma", dimensions=size + 1)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "one of" in info.value.message
        with pytest.raises(EmbedClientError) as info:
            client.embed(TEXTS, model="tiny-gemma", prompt_name="no-such-prompt")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_encodings_come_after_matryoshka_truncation(decoder_server: ServerThread) -> None:
    with EmbedClient(decoder_server.target, timeout=120) as client:
        small = client.embed(TEXTS, model="tiny-qwen3", dimensions=32).vectors
        bits = client.embed(TEXTS, model="tiny-qwen3", dimensions=32, encoding="ubinary")
        assert bits.vectors.shape == (len(TEXTS), 4) and bits.space.dimensions == 32
        np.testing.assert_array_equal(np.unpackbits(bits.vectors, axis=1).astype(bool), small > 0)
        int8 = client.embed(TEXTS, model="tiny-qwen3", dimensions=32, encoding="int8")
        native = client.embed(TEXTS, model="tiny-qwen3", encoding="int8")
        assert int8.vectors.shape == (len(TEXTS), 32) and int8.vectors.dtype == np.int8
        assert int8.space.ranges_id and int8.space.ranges_id != native.space.ranges_id
        assert int8.space.fingerprint != native.space.fingerprint
        info = next(m for m in client.list_models() if m.name == "tiny-qwen3")
        assert info.ranges() is not None and info.ranges().id == native.space.ranges_id  # type: ignore[union-attr]


def test_chunks_of_a_last_token_model_embed_as_their_slices(decoder_server: ServerThread) -> None:
    text = " ".join(tiny.sample_texts(12, seed=5, min_words=20, max_words=40))
    with EmbedClient(decoder_server.target, timeout=120) as client:
        result = client.embed(
            [text], model="tiny-qwen3", truncation="chunk", chunk_tokens=24, instruction="find"
        )
        chunks = result.chunks
        assert len(chunks) > 3 and chunks[0].char_start == 0 and chunks[-1].char_end == len(text)
        assert all(a.char_end == b.char_start for a, b in itertools.pairwise(chunks))
        slices = [text[c.char_start : c.char_end] for c in chunks]
        alone = client.embed(slices, model="tiny-qwen3", truncation="error", instruction="find")
        cosine = (result.vectors * alone.vectors).sum(axis=1)
        assert cosine.min() >= 0.9999 and max(result.token_counts) <= 24
