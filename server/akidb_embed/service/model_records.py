"""What the server derives from a model once and keeps next to it.

* Calibration: the pooled vectors of the shipped calibration corpus (corpus.py), from which
  the int8/uint8 ranges of every output size follow (min and max per dimension after
  Matryoshka truncation and normalisation). Keyed by model revision and the precision the
  engine computes in (`profile.dtype`): `calibration-<dtype>-<device>.npy`.
* The self-check record: the vectors of 16 fixed probe texts and the path that made them
  (backend, precision, MLX version). Every later load embeds the probes again and compares
  before the model is served; a drift past the thresholds refuses the model
  (ModelLoadError, so ListModels and health show FAILED with the reason), so nothing is
  silently served into an index built with other vectors. Keyed apart (never compared) by
  revision, precision, device and probe set; compared across MLX versions and file
  contents, which is what the check is for.

A Hub model's records live in its cache folder (`models--org--name/akidb/derived/<commit>/`);
a bundled or local model's under `$AKIDB_CACHE_DIR/akidb-derived/` (its own directory may be
read-only). A folder that cannot be written leaves the records in memory only, with a warning.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import ModelLoadError
from ..host.device import device_kind
from ..modeling.corpus import calibration_texts, probe_texts
from ..modeling.engine import EmbeddingEngine, EmbedOptions, finish_batch
from ..store.model_cache import MANIFEST_DIR, cache_dir

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
# With the same key, the probe vectors (L2-normalised) must agree this closely. The same
# path gives the same bits (0 difference); MLX against sentence-transformers differs by
# about 2e-7 on all-MiniLM-L6-v2, so rounding changes of a new MLX release pass; 24 values
# of one weight matrix changed by a mantissa bit move the vectors by 9e-5 to 3e-4.
SELF_CHECK_MIN_COSINE = 0.99999
SELF_CHECK_MAX_ABS = 2e-5
# Calibration texts per forward.
CALIBRATION_BATCH = 32


def records_dir(directory: Path, source: str, revision: str, root: Path | None = None) -> Path:
    """Where a model's derived files go (see the module docstring)."""
    root = root or cache_dir()
    resolved = directory.resolve()
    snapshots = resolved.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        return snapshots.parent / MANIFEST_DIR / "derived" / resolved.name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_")[-80:] or "model"
    return root / "akidb-derived" / f"{slug}@{revision[:16]}"


def mlx_version() -> str:
    return str(getattr(mx, "__version__", "unknown"))


def path_key(engine: EmbeddingEngine) -> str:
    """The precision path in a file name: e.g. `q4-float32-cpu` for "q4->float32" on a CPU."""
    label = re.sub(r"[^A-Za-z0-9]+", "-", engine.profile.dtype).strip("-")
    return f"{label}-{device_kind()}"


def embed_pooled(engine: EmbeddingEngine, texts: Sequence[str]) -> np.ndarray:
    """Pooled native float32 vectors of `texts`, in order, in length-sorted batches (the
    engine's thread only)."""
    tokens = engine.tokenize_batch(texts, EmbedOptions())
    out = np.zeros((len(texts), engine.profile.dimensions), dtype=np.float32)
    order = np.argsort(-tokens.lengths, kind="stable")
    for start in range(0, len(order), CALIBRATION_BATCH):
        rows = order[start : start + CALIBRATION_BATCH]
        part = tokens.select(rows)
        out[rows] = engine.forward_packed(part.ids, part.lengths)
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save(path: Path, data: bytes) -> bool:
    try:
        _write_atomic(path, data)
    except OSError as exc:
        log.warning("cannot write %s (%s); keeping it in memory only", path, exc)
        return False
    return True


def calibration_path(folder: Path, engine: EmbeddingEngine) -> Path:
    return folder / f"calibration-{path_key(engine)}.npy"


def cached_calibration(engine: EmbeddingEngine, folder: Path) -> np.ndarray | None:
    path = calibration_path(folder, engine)
    try:
        cached = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    expected = (len(calibration_texts()), engine.profile.dimensions)
    return cached if cached.shape == expected and cached.dtype == np.float32 else None


def load_calibration(engine: EmbeddingEngine, folder: Path) -> np.ndarray:
    """The calibration vectors: read from the folder, else computed once and written."""
    cached = cached_calibration(engine, folder)
    if cached is not None:
        return cached
    texts = calibration_texts()
    path = calibration_path(folder, engine)
    vectors = embed_pooled(engine, texts)
    if not np.isfinite(vectors).all():
        raise ModelLoadError(
            f"model {engine.name!r} gives non-finite outputs on calibration texts: its weights "
            "are damaged; delete the model and pull it again"
        )
    from io import BytesIO

    buffer = BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    _save(path, buffer.getvalue())
    return vectors


@dataclass(frozen=True)
class Drift:
    min_cosine: float
    max_abs: float

    @property
    def within(self) -> bool:
        return self.min_cosine >= SELF_CHECK_MIN_COSINE and self.max_abs <= SELF_CHECK_MAX_ABS

    def __str__(self) -> str:
        return f"min cosine {self.min_cosine:.8f}, max abs difference {self.max_abs:.2e}"


def drift(recorded: np.ndarray, now: np.ndarray) -> Drift:
    """Both L2-normalised first."""
    a = finish_batch(recorded, recorded.shape[1], True).astype(np.float64)
    b = finish_batch(now, now.shape[1], True).astype(np.float64)
    cosine = (a * b).sum(axis=1) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30
    )
    return Drift(float(cosine.min()), float(np.abs(a - b).max()))


def probe_set_id() -> str:
    return hashlib.sha256("\n".join(probe_texts()).encode()).hexdigest()[:12]


def record_path(folder: Path, engine: EmbeddingEngine) -> Path:
    return folder / f"selfcheck-{path_key(engine)}-{probe_set_id()}.json"


def make_record(engine: EmbeddingEngine, vectors: np.ndarray) -> dict[str, Any]:
    return {
        "format": RECORD_FORMAT,
        "model": engine.source,
        "revision": engine.revision,
        "dtype": engine.profile.dtype,
        "device": device_kind(),
        "mlx": mlx_version(),
        "probe_set": probe_set_id(),
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shape": list(vectors.shape),
        "vectors": base64.b64encode(vectors.astype("<f4").tobytes()).decode(),
    }


def record_vectors(record: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(record["vectors"])
    return np.frombuffer(raw, dtype="<f4").reshape(record["shape"]).copy()


def self_check(engine: EmbeddingEngine, folder: Path) -> str:
    """Embed the probes; record them on the first load of this key, else compare. Returns
    what was found; raises ModelLoadError on a drift past the thresholds."""
    now = embed_pooled(engine, probe_texts())
    path = record_path(folder, engine)
    try:
        record = json.loads(path.read_text())
        recorded = record_vectors(record)
    except FileNotFoundError:
        record = None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"model {engine.name!r}: its self-check record {path} is unreadable ({exc}); "
            "delete it to record anew (the next load records the vectors it computes)"
        ) from exc
    if record is None:
        saved = _save(path, json.dumps(make_record(engine, now), indent=1).encode())
        where = str(path) if saved else "memory only: the folder is not writable"
        return (
            f"recorded {len(now)} probe vectors ({engine.profile.dtype} on {device_kind()}, "
            f"mlx {mlx_version()}; {where})"
        )
    found = drift(recorded, now) if recorded.shape == now.shape else Drift(-1.0, float("inf"))
    against = (
        f"the record of {record.get('recorded_at', '?')} (mlx {record.get('mlx', '?')}, "
        f"{record.get('device', '?')}, {record.get('dtype', '?')})"
    )
    if found.within:
        return f"passed: {found} against {against}"
    changed = []
    if record.get("mlx") != mlx_version():
        changed.append(f"MLX is {mlx_version()} now, {record.get('mlx')} then")
    causes = "; ".join(changed) or "same MLX version, so most likely the files changed"
    raise ModelLoadError(
        f"model {engine.name!r} failed its self-check: the vectors of the probe texts "
        f"drifted from {against}: {found} (limits: cosine >= {SELF_CHECK_MIN_COSINE}, "
        f"max abs <= {SELF_CHECK_MAX_ABS}); {causes}. Vectors now would not match an index "
        f"built with the recorded ones. If the weights were damaged, run `akidb-embed pull "
        f"{engine.name} --force` (or restore the files); if the change is intended (a new "
        f"MLX, re-indexing planned), delete {path} and restart to record anew"
    )


def prepare(engine: EmbeddingEngine, directory: Path) -> Path:
    """The self-check, and the calibration if it is cached (else it is computed on the first
    int8/uint8 request); on the engine's thread, before the model serves. Returns the
    records folder."""
    folder = records_dir(directory, engine.source, engine.revision)
    engine.self_check = self_check(engine, folder)
    log.info("model %s self-check %s", engine.name, engine.self_check)
    engine.calibration = cached_calibration(engine, folder)
    return folder
