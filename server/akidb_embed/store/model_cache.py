"""The on-disk model cache: huggingface_hub's cache layout plus akidb-embed's manifests.

huggingface_hub lays a repository out as `<cache>/models--org--name/` with `blobs/`,
`snapshots/<commit>/` (symlinks into blobs) and `refs/<branch>`. akidb-embed adds
`akidb/<commit>.json`, a manifest of the files it pulled with the sizes (and sha256 of LFS
files) the Hub listed, written only after those files passed verification, and
`akidb/current`, the commit pulled last. A snapshot counts as cached only with a manifest and
files that still pass the cheap checks (present, sizes, safetensors headers); before a model
is loaded, and in `akidb-embed models` / `pull`, the deep check also compares every file's
sha256 with the manifest's (the Hub's for LFS files, the one computed at pull time for the
small files the Hub lists no sha256 for). Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock

from ..errors import InvalidArgument
from .safetensors_header import SafetensorsError, check_file

CACHE_ENV = "AKIDB_CACHE_DIR"
MANIFEST_DIR = "akidb"
MANIFEST_FORMAT = 1

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
# huggingface_hub's rules for a repo id, with the namespace required; ".." and "--" are out
# (a path escape, and the cache's folder separator).
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?"
REPO_ID_RE = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
# Branch, tag, `refs/pr/N` or commit. Stored under refs/, so no "..", no leading "/".
REVISION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now rather than at import."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def cache_dir() -> Path:
    """AKIDB_CACHE_DIR, else huggingface_hub's own rule (HF_HUB_CACHE, HF_HOME/hub, ...),
    evaluated now so a changed environment is honoured."""

    def expand(value: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(value)))

    for name in (CACHE_ENV, "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return expand(os.environ[name])
    if os.environ.get("HF_HOME"):
        return expand(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return expand(xdg) / "huggingface" / "hub"


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def validate_repo_id(repo_id: str) -> str:
    if not REPO_ID_RE.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise InvalidArgument(
            f"{repo_id!r} is not a Hugging Face repository id; use the form org/name "
            "(letters, digits, '-', '_', '.'; no '..' or '--'), e.g. BAAI/bge-small-en-v1.5"
        )
    return repo_id


def validate_revision(revision: str) -> str:
    parts = revision.split("/")
    if (
        not REVISION_RE.fullmatch(revision)
        or any(part in ("", ".", "..") for part in parts)
        or revision.endswith((".lock", ".json"))
    ):
        raise InvalidArgument(
            f"{revision!r} is not a usable revision; give a branch, tag or 40-hex commit "
            "(letters, digits, '-', '_', '.', '/'; no '..' or empty path parts)"
        )
    return revision


def looks_like_hub_id(text: str) -> bool:
    """`org/name[@rev]` rather than a registry name or a local path (/x, ./x, ~/x)."""
    return "/" in text and not text.startswith(("/", ".", "~"))


@dataclass(frozen=True)
class HubRef:
    """A Hub repository and, optionally, a revision (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str, revision: str | None = None) -> HubRef:
        """`org/name[@revision]`; an explicit `revision` argument wins over the `@` part."""
        repo_id, _, at_revision = text.strip().partition("@")
        revision = revision or at_revision or None
        return cls(
            validate_repo_id(repo_id),
            validate_revision(revision) if revision is not None else None,
        )

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class ManifestFile:
    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class Manifest:
    """What a successful pull fetched and verified."""

    repo_id: str
    revision: str
    commit: str
    files: dict[str, ManifestFile]
    pulled_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "pulled_at": self.pulled_at,
            "files": {p: {"size": f.size, "sha256": f.sha256} for p, f in self.files.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            repo_id=str(data["repo_id"]),
            revision=str(data["revision"]),
            commit=str(data["commit"]),
            pulled_at=str(data.get("pulled_at", "")),
            files={
                str(p): ManifestFile(int(f["size"]), f.get("sha256"))
                for p, f in dict(data["files"]).items()
            },
        )


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# File identity -> its sha256, for this process. A file rewritten in place gets a new mtime
# and ctime (and a replaced one a new inode), so it is hashed again; one left alone is hashed
# once per process: at its first verification after start.
_HASHED: dict[tuple[str, int, int, int, int, int], str] = {}
_HASHED_LOCK = threading.Lock()


def content_sha256(path: Path) -> str:
    """sha256 of the file's bytes, remembered while the file's identity is unchanged."""
    target = path.resolve()
    info = target.stat()
    key = (str(target), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    with _HASHED_LOCK:
        known = _HASHED.get(key)
    if known is not None:
        return known
    digest = sha256_file(target)
    with _HASHED_LOCK:
        _HASHED[key] = digest
    return digest


def checksum_problem(name: str) -> str:
    return f"{name}: its sha256 checksum does not match the one recorded when it was pulled"


def file_problem(path: Path, expected: ManifestFile, *, deep: bool = False) -> str | None:
    """Why a cached file is unusable, or None. `deep` also compares the content's sha256 with
    the recorded one (files with none recorded: the cheap checks only)."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != expected.size:
        return f"{path.name} is {size} bytes, the Hub lists {expected.size}"
    if path.suffix == ".safetensors":
        try:
            check_file(path)
        except (SafetensorsError, OSError) as exc:
            return str(exc)
    if deep and expected.sha256 and content_sha256(path) != expected.sha256:
        return checksum_problem(path.name)
    return None


class RepoCache:
    """One repository's folder in the cache."""

    def __init__(self, repo_id: str, root: Path | None = None) -> None:
        self.repo_id = validate_repo_id(repo_id)
        self.root = (root or cache_dir()).expanduser()
        self.folder_name = "models--" + repo_id.replace("/", "--")
        self.folder = self.root / self.folder_name

    @property
    def lock_path(self) -> Path:
        # Beside huggingface_hub's own per-file locks.
        return self.root / ".locks" / self.folder_name / "akidb-pull.lock"

    def lock(self) -> filelock.FileLock:
        """Held for a whole pull or removal of this repository, across processes."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self.lock_path))

    def snapshot(self, commit: str) -> Path:
        return self.folder / "snapshots" / commit

    def manifest_path(self, commit: str) -> Path:
        return self.folder / MANIFEST_DIR / f"{commit}.json"

    def commit_for(self, revision: str | None) -> str | None:
        """The commit a revision names, from the cache alone. None: the commit pulled last."""
        if revision is not None and COMMIT_RE.fullmatch(revision):
            return revision
        candidates = (
            [self.folder / "refs" / revision]
            if revision is not None
            else [self.folder / MANIFEST_DIR / "current", self.folder / "refs" / "main"]
        )
        for path in candidates:
            try:
                commit = path.read_text().strip()
            except OSError:
                continue
            if COMMIT_RE.fullmatch(commit):
                return commit
        return None

    def read_manifest(self, commit: str) -> Manifest | None:
        try:
            data = json.loads(self.manifest_path(commit).read_text())
            manifest = Manifest.from_json(data)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return manifest if manifest.commit == commit else None

    def write_manifest(self, manifest: Manifest) -> None:
        _atomic_write(self.manifest_path(manifest.commit), json.dumps(manifest.to_json(), indent=1))
        _atomic_write(self.folder / MANIFEST_DIR / "current", manifest.commit)

    def manifests(self) -> list[Manifest]:
        found = []
        for path in sorted((self.folder / MANIFEST_DIR).glob("*.json")):
            manifest = self.read_manifest(path.stem)
            if manifest is not None:
                found.append(manifest)
        return found

    def problems(self, manifest: Manifest, *, deep: bool = False) -> list[str]:
        snapshot = self.snapshot(manifest.commit)
        if "config.json" not in manifest.files:
            return ["the manifest lists no config.json"]
        found = (
            file_problem(snapshot / path, expected, deep=deep)
            for path, expected in manifest.files.items()
        )
        return [p for p in found if p is not None]

    def damaged_files(self, manifest: Manifest, *, deep: bool = False) -> list[str]:
        """Files present (or dangling links) that fail the checks."""
        snapshot = self.snapshot(manifest.commit)
        return [
            path
            for path, expected in manifest.files.items()
            if (snapshot / path).is_symlink() or (snapshot / path).exists()
            if file_problem(snapshot / path, expected, deep=deep) is not None
        ]

    def write_ref(self, revision: str, commit: str) -> None:
        """Record which commit a branch or tag named when it was pulled (as huggingface_hub
        does), so the cache can answer for that name offline."""
        if revision != commit:
            _atomic_write(self.folder / "refs" / validate_revision(revision), commit)

    def size_on_disk(self, commit: str, paths: list[str]) -> int:
        blobs = {(self.snapshot(commit) / p).resolve() for p in paths}
        return sum(b.stat().st_size for b in blobs if b.is_file())

    def discard(self, commit: str, paths: list[str]) -> None:
        """Delete files (the snapshot link and the blob behind it) so a pull fetches them anew."""
        for relative in paths:
            link = self.snapshot(commit) / relative
            blob = link.resolve()
            for path in (link, blob):
                if path.is_relative_to(self.folder):
                    path.unlink(missing_ok=True)

    def remove_incomplete(self, older_than_s: float = 0.0) -> None:
        """Partial downloads huggingface_hub left behind (a killed process cannot resume them)."""
        now = datetime.now().timestamp()
        for partial in (self.folder / "blobs").glob("*.incomplete"):
            try:
                if now - partial.stat().st_mtime >= older_than_s:
                    partial.unlink()
            except OSError:
                pass

    def remove_commit(self, commit: str) -> None:
        """Delete one snapshot, its manifest, refs to it, and blobs no other snapshot uses."""
        shutil.rmtree(self.snapshot(commit), ignore_errors=True)
        shutil.rmtree(self.folder / MANIFEST_DIR / "derived" / commit, ignore_errors=True)
        self.manifest_path(commit).unlink(missing_ok=True)
        for ref in [*(self.folder / "refs").rglob("*"), self.folder / MANIFEST_DIR / "current"]:
            if ref.is_file() and ref.read_text().strip() == commit:
                ref.unlink()
        used = {p.resolve() for p in (self.folder / "snapshots").rglob("*") if p.is_symlink()}
        for blob in (self.folder / "blobs").glob("*"):
            if blob.resolve() not in used:
                blob.unlink(missing_ok=True)
        if not any((self.folder / "snapshots").glob("*")):
            self.remove_all()

    def remove_all(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class CacheCheck:
    """The cache's answer for a reference: usable snapshot, or why not."""

    ref: HubRef
    commit: str | None
    directory: Path | None
    manifest: Manifest | None
    problems: tuple[str, ...] = ()
    size_bytes: int = 0

    @property
    def usable(self) -> bool:
        return self.manifest is not None and self.directory is not None and not self.problems


def inspect(ref: HubRef, root: Path | None = None, *, deep: bool = False) -> CacheCheck:
    """Offline: is `ref` cached and verified? `deep` also compares sha256 checksums (it reads
    every file once per process; see content_sha256)."""
    repo = RepoCache(ref.repo_id, root)
    commit = repo.commit_for(ref.revision)
    if commit is None:
        return CacheCheck(ref, None, None, None)
    manifest = repo.read_manifest(commit)
    if manifest is None:
        return CacheCheck(ref, commit, None, None)
    problems = tuple(repo.problems(manifest, deep=deep))
    size = repo.size_on_disk(commit, list(manifest.files))
    return CacheCheck(ref, commit, repo.snapshot(commit), manifest, problems, size)


def cached_repo_ids(root: Path | None = None) -> list[str]:
    """Repositories with at least one akidb-embed manifest in the cache."""
    root = root or cache_dir()
    found = []
    for folder in sorted(root.glob("models--*--*")):
        if any((folder / MANIFEST_DIR).glob("*.json")):
            found.append(folder.name.removeprefix("models--").replace("--", "/", 1))
    return found
