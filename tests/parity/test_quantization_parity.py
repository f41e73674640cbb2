"""Served encodings against sentence-transformers' quantize_embeddings on the same
calibration corpus, and retrieval quality of int8 and binary on real titles and bodies."""

from __future__ import annotations

import ast
import inspect
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from akidb_embed.modeling.corpus import calibration_texts, stdlib_files
from akidb_embed.store.registry import bundled_minilm_dir
from akidb_embed_client import EmbedClient
from tests.conftest import ServerThread
from tests.corpus import parity_texts

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def client(server: ServerThread) -> EmbedClient:
    return EmbedClient(server.target, timeout=300)


@pytest.fixture(scope="module")
def reference() -> tuple[list[str], np.ndarray, np.ndarray]:
    """sentence-transformers' vectors of the parity texts and of the calibration corpus."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(bundled_minilm_dir()), device="cpu")
    texts = parity_texts()
    vectors = model.encode(texts, batch_size=32, normalize_embeddings=True)
    calibration = model.encode(list(calibration_texts()), batch_size=32, normalize_embeddings=True)
    return texts, vectors, calibration


def quantize(vectors: np.ndarray, precision: str, **kwargs: object) -> np.ndarray:
    from sentence_transformers.util.quantization import quantize_embeddings

    return np.asarray(quantize_embeddings(vectors, precision, **kwargs))  # type: ignore[arg-type]


def test_binary_is_bit_identical_and_int8_within_one_step(
    client: EmbedClient, reference: tuple[list[str], np.ndarray, np.ndarray]
) -> None:
    texts, st_vectors, st_calibration = reference
    floats = client.embed(texts).vectors
    for precision in ("binary", "ubinary"):
        served = client.embed(texts, encoding=precision).vectors  # type: ignore[typeddict-item]
        # The definition, on the served float32 vectors: bit for bit.
        np.testing.assert_array_equal(served, quantize(floats, precision))
        # Against sentence-transformers' own vectors: a bit may differ only where its value
        # is within rounding of 0.
        theirs = quantize(st_vectors, precision)
        differ = np.unpackbits((served ^ theirs).view(np.uint8), axis=1).astype(bool)
        near_zero = np.abs(st_vectors) < 1e-5
        print(f"{precision}: {int(differ.sum())} of {differ.size} bits differ from ST's vectors")
        assert not (differ & ~near_zero).any()
    info = next(m for m in client.list_models() if m.name == "all-minilm-l6-v2")
    ranges = info.ranges()
    assert ranges is not None
    st_ranges = np.vstack([st_calibration.min(axis=0), st_calibration.max(axis=0)])
    range_error = float(np.abs(np.vstack([ranges.min, ranges.max]) - st_ranges).max())
    print(f"ranges: max abs difference from ST's calibration {range_error:.2e}")
    for precision in ("int8", "uint8"):
        served = client.embed(texts, encoding=precision).vectors  # type: ignore[typeddict-item]
        ours = quantize(floats, precision, ranges=np.vstack([ranges.min, ranges.max]))
        np.testing.assert_array_equal(served, ours)
        theirs = quantize(st_vectors, precision, calibration_embeddings=st_calibration)
        steps = np.abs(served.astype(np.int16) - theirs.astype(np.int16))
        print(
            f"{precision}: max {int(steps.max())} step(s) from ST's quantize_embeddings, "
            f"{float((steps > 0).mean()):.4%} of values differ"
        )
        assert steps.max() <= 1


def titled_bodies(limit: int) -> tuple[list[str], list[str]]:
    """Real labelled pairs: a function's docstring summary line (the title, the query) and
    the rest of its docstring (the body, the document)."""
    titles: list[str] = []
    bodies: list[str] = []
    seen: set[str] = set()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files(root):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.ClassDef):
                continue
            doc = inspect.cleandoc(ast.get_docstring(node) or "")
            title, _, body = doc.partition("\n\n")
            title = " ".join(title.split())
            body = re.sub(r"\s+", " ", body).strip()[:1000]
            if len(title) < 25 or len(body) < 200 or title in seen:
                continue
            seen.add(title)
            titles.append(title)
            bodies.append(body)
            if len(titles) >= limit:
                return titles, bodies
    return titles, bodies


def recall_at(scores: np.ndarray, k: int) -> float:
    """Query i's relevant document is document i."""
    top = np.argsort(-scores, axis=1)[:, :k]
    return float((top == np.arange(len(scores))[:, None]).any(axis=1).mean())


@pytest.mark.timeout(900)
def test_int8_and_binary_retrieval_keep_recall(client: EmbedClient) -> None:
    titles, bodies = titled_bodies(300)
    assert len(titles) >= 300
    queries = client.embed(titles).vectors
    docs = client.embed(bodies).vectors
    base = recall_at(queries @ docs.T, 10)
    info = next(m for m in client.list_models() if m.name == "all-minilm-l6-v2")
    ranges = info.ranges()
    assert ranges is not None
    # int8 documents, dequantised with the ranges ListModels gives; float32 queries.
    int8_docs = client.embed(bodies, encoding="int8").vectors
    int8 = recall_at(queries @ ranges.dequantize(int8_docs).T, 10)
    # Binary documents and queries: Hamming distance for 40 candidates, then rescoring
    # with the float32 vectors. (The served bits are those of the served floats, bit for
    # bit: the test above; here they are taken from the floats to embed the bodies once.)
    bin_docs = docs > 0
    bin_queries = np.unpackbits(client.embed(titles, encoding="ubinary").vectors, axis=1) > 0
    hamming = (bin_queries[:, None, :] != bin_docs[None, :, :]).sum(axis=2)
    candidates = np.argsort(hamming, axis=1, kind="stable")[:, :40]
    rescored = np.full(hamming.shape, -np.inf)
    rows = np.arange(len(titles))[:, None]
    rescored[rows, candidates] = np.einsum("qd,qkd->qk", queries, docs[candidates])
    binary = recall_at(rescored, 10)
    print(
        f"recall@10 on {len(titles)} title->body pairs: float32 {base:.4f}, "
        f"int8 {int8:.4f} ({int8 / base:.4f}x), binary+rescore {binary:.4f} "
        f"({binary / base:.4f}x)"
    )
    assert int8 >= 0.98 * base
    assert binary >= 0.95 * base
