"""The served all-MiniLM-L6-v2 vectors equal sentence-transformers' on the same model."""

from __future__ import annotations

import numpy as np
import pytest

from akidb_embed.store.registry import bundled_minilm_dir
from akidb_embed_client import EmbedClient
from tests.conftest import ServerThread
from tests.corpus import parity_texts

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def reference_vectors() -> tuple[list[str], np.ndarray]:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(str(bundled_minilm_dir()), device="cpu")
    texts = parity_texts()
    return texts, model.encode(texts, batch_size=16, normalize_embeddings=True)


@pytest.mark.parametrize("batch_size", [1, 32])
def test_served_vectors_match_sentence_transformers(
    server: ServerThread, reference_vectors: tuple[list[str], np.ndarray], batch_size: int
) -> None:
    texts, expected = reference_vectors
    assert len(texts) >= 50 and len({len(t) for t in texts}) > 40
    with EmbedClient(server.target, timeout=120) as client:
        got = np.concatenate(
            [
                client.embed(texts[i : i + batch_size]).vectors
                for i in range(0, len(texts), batch_size)
            ]
        )
    cosine = (got * expected).sum(axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    )
    max_abs = float(np.abs(got - expected).max())
    print(f"batch {batch_size}: min cosine {cosine.min():.8f}, max abs error {max_abs:.2e}")
    assert cosine.min() >= 0.9999, [texts[i] for i in np.where(cosine < 0.9999)[0]]
    assert max_abs < 1e-4
