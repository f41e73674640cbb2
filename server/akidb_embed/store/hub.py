"""Pull models from the Hugging Face Hub into the cache.

huggingface_hub moves the bytes (`snapshot_download`: ETags, retries, Range resume within a
download, its own per-file locks, atomic renames). This module decides what to fetch, holds a
per-repository lock across the whole pull, checks the result against the Hub's listing, writes
the manifest that makes the snapshot count as cached (model_cache.py), and turns failures into
errors a person can act on. Pickled weights are never fetched.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import httpx2
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from ..errors import (
    DamagedModel,
    DiskFull,
    EmbedError,
    HubAccessDenied,
    HubUnavailable,
    ModelNotAvailable,
    ModelNotFound,
    Unavailable,
    UnsupportedModel,
)
from ..modeling.loader import PICKLED_SUFFIXES
from ..modeling.models import ARCHITECTURES
from .model_cache import (
    CacheCheck,
    HubRef,
    Manifest,
    ManifestFile,
    RepoCache,
    cache_dir,
    content_sha256,
    human_size,
    inspect,
    offline_mode,
)

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
# What a model needs: config, tokenizer and sentence-transformers files, safetensors weights.
WANTED_SUFFIXES = (".json", ".safetensors", ".txt")
# sentence-transformers module folders are named "<index>_<Module>": 1_Pooling, 2_Dense.
MODULE_DIR_RE = re.compile(r"\d+_[A-Za-z]\w*")
# Partial downloads older than this belong to a process that died mid-pull.
STALE_PARTIAL_S = 60.0
API_TIMEOUT_S = 30.0
# How long a pull waits for another process pulling the same repository.
LOCK_TIMEOUT_S = 3600.0

Notify = Callable[[str], None]


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class PullResult:
    ref: HubRef
    commit: str
    directory: Path
    manifest: Manifest
    size_bytes: int
    # False when the cache already held a verified copy (nothing was fetched).
    downloaded: bool


def select_files(paths: Iterable[str]) -> list[str]:
    """Top-level json/txt/safetensors plus the files of sentence-transformers module folders;
    never pickles, never other exports (onnx/, openvino/)."""
    chosen = []
    for path in paths:
        parts = path.split("/")
        if not path.endswith(WANTED_SUFFIXES):
            continue
        if len(parts) == 1 or (len(parts) == 2 and MODULE_DIR_RE.fullmatch(parts[0])):
            chosen.append(path)
    return sorted(chosen)


def _silent_tqdm() -> type[hf_tqdm]:
    class Silent(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    return Silent


def free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _hub_error(exc: BaseException, ref: HubRef, url: str) -> EmbedError:
    """A huggingface_hub / httpx failure as a domain error that says what to do."""
    page = f"{url}/{ref.repo_id}"
    if isinstance(exc, EmbedError):
        return exc
    if isinstance(exc, GatedRepoError) or (
        isinstance(exc, HfHubHTTPError)
        and exc.response is not None
        and exc.response.status_code in (401, 403)
        and not isinstance(exc, RepositoryNotFoundError)
    ):
        return HubAccessDenied(
            f"{ref.repo_id} is gated or private and this machine has no access: accept its terms "
            f"at {page} with your account, then set HF_TOKEN=<token> (https://huggingface.co/"
            "settings/tokens) or run `hf auth login` (`huggingface-cli login`), and pull again"
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFound(
            f"revision {ref.revision!r} does not exist in {ref.repo_id}; "
            f"pick a branch, tag or commit listed at {page}/tree/main"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelNotFound(
            f"repository {ref.repo_id} was not found on {url}; check the spelling (org/name). "
            "If it is private, set HF_TOKEN or run `hf auth login`"
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return ModelNotAvailable(
            f"{ref} is not in the cache and HF_HUB_OFFLINE=1 forbids downloads: unset "
            "HF_HUB_OFFLINE and pull it, or copy the cache from a machine that has it"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskFull(
            f"the disk holding the model cache ({cache_dir()}) is full while pulling {ref}: "
            f"free space there, or set AKIDB_CACHE_DIR to a directory on a larger disk"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ModelNotAvailable(
            f"cannot write to the model cache {cache_dir()} ({exc.strerror}: {exc.filename}): "
            "set AKIDB_CACHE_DIR to a writable directory"
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return HubUnavailable(
            f"the Hub at {url} answered HTTP {status} while pulling {ref}: try again later"
            + (" (rate limited: set HF_TOKEN to raise the limit)" if status == 429 else "")
        )
    if isinstance(exc, (httpx2.HTTPError, LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return HubUnavailable(
            f"cannot reach the Hugging Face Hub at {url} to pull {ref} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}): "
            "check the network, proxy (HTTPS_PROXY) and HF_ENDPOINT; to use only cached "
            "models set HF_HUB_OFFLINE=1"
        )
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return HubUnavailable(f"a download for {ref} arrived incomplete ({exc}); pull again")
    raise exc


def list_remote(
    api: HfApi, ref: HubRef, timeout_s: float = API_TIMEOUT_S
) -> tuple[str, list[RemoteFile]]:
    """The commit the revision points at now, and the repository's files with sizes."""
    info = api.model_info(
        ref.repo_id, revision=ref.revision, files_metadata=True, timeout=timeout_s
    )
    if not info.sha:
        raise HubUnavailable(f"the Hub gave no commit for {ref}; check HF_ENDPOINT")
    files = []
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        size = lfs.size if lfs is not None else sibling.size
        if size is None:
            raise HubUnavailable(f"the Hub listed {sibling.rfilename} in {ref} without a size")
        files.append(RemoteFile(sibling.rfilename, int(size), lfs.sha256 if lfs else None))
    return info.sha, files


def _check_weights_present(ref: HubRef, names: list[str], chosen: list[str]) -> None:
    if any(p.endswith(".safetensors") for p in chosen):
        return
    pickled = [p for p in names if p.endswith(PICKLED_SUFFIXES)]
    detail = f"only pickled weights ({', '.join(pickled[:4])})" if pickled else "no weights"
    raise UnsupportedModel(
        f"{ref.repo_id} has {detail} and no *.safetensors; akidb-embed never loads pickled "
        "weights: pick a repository that ships safetensors (many have a `refs/pr/N` "
        "conversion: pull it with --revision)"
    )


def _check_architecture(ref: HubRef, config_path: Path) -> None:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"{ref}: config.json is unreadable ({exc})") from exc
    model_type = str(config.get("model_type", "")) if isinstance(config, dict) else ""
    if model_type not in ARCHITECTURES:
        raise UnsupportedModel(
            f"{ref.repo_id} is a {model_type or 'model without model_type'!r} model; "
            f"akidb-embed supports: {', '.join(sorted(ARCHITECTURES))}"
        )


def _acquire(lock: filelock.FileLock, ref: HubRef, notify: Notify, timeout_s: float) -> None:
    try:
        lock.acquire(timeout=0)
        return
    except filelock.Timeout:
        notify(f"another process is pulling {ref.repo_id}; waiting for it to finish")
    try:
        lock.acquire(timeout=timeout_s)
    except filelock.Timeout as exc:
        raise Unavailable(
            f"another process has held the pull lock for {ref.repo_id} for {timeout_s:.0f} s "
            f"({lock.lock_file}); wait for it, or stop it and pull again"
        ) from exc


def _cached_result(check: CacheCheck) -> PullResult:
    assert check.manifest is not None and check.directory is not None and check.commit
    return PullResult(
        check.ref, check.commit, check.directory, check.manifest, check.size_bytes, False
    )


def pull(
    ref: HubRef,
    *,
    force: bool = False,
    progress: bool | None = None,
    notify: Notify | None = None,
    root: Path | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
    max_workers: int = 8,
    name: str | None = None,
    api_timeout_s: float = API_TIMEOUT_S,
) -> PullResult:
    """Fetch `ref` into the cache (or confirm a verified copy is there) and return it.

    Blocking; safe to run in a worker thread and from several processes at once. `progress`:
    None shows huggingface_hub's bars when stderr is a terminal. Raises EmbedError
    subclasses: ModelNotFound, HubAccessDenied, HubUnavailable, UnsupportedModel, DiskFull,
    DamagedModel, ModelNotAvailable (offline and not cached), InvalidArgument.
    `name`: what the user calls the model, for the commands messages suggest. A cached copy
    is used without the Hub only after its sha256 checksums match the manifest.
    """
    say = notify or logger.info
    root = (root or cache_dir()).expanduser()
    url = endpoint()
    command = f"akidb-embed pull {name or ref} --force"
    if offline_mode():
        check = inspect(ref, root, deep=True)
        if check.usable and not force:
            return _cached_result(check)
        if check.problems and not force:
            raise DamagedModel(
                f"the cached copy of {ref} is damaged ({'; '.join(check.problems)}) and "
                f"HF_HUB_OFFLINE=1 forbids fetching it again: unset HF_HUB_OFFLINE and run "
                f"`{command}`"
            )
        raise _hub_error(OfflineModeIsEnabled("offline"), ref, url)

    repo = RepoCache(ref.repo_id, root)
    try:
        lock = repo.lock()
        _acquire(lock, ref, say, lock_timeout_s)
    except OSError as exc:
        raise _hub_error(exc, ref, url) from exc
    try:
        return _pull_locked(
            ref, repo, url, force, progress, say, max_workers, command, api_timeout_s
        )
    finally:
        lock.release()


def _pull_locked(
    ref: HubRef,
    repo: RepoCache,
    url: str,
    force: bool,
    progress: bool | None,
    say: Notify,
    max_workers: int,
    command: str,
    api_timeout_s: float,
) -> PullResult:
    repo.remove_incomplete(older_than_s=STALE_PARTIAL_S)
    api = HfApi(endpoint=url)
    try:
        commit, remote = list_remote(api, ref, api_timeout_s)
    except HubUnavailable:
        raise
    except Exception as exc:
        error = _hub_error(exc, ref, url)
        if isinstance(error, HubUnavailable) and not force:
            check = inspect(ref, repo.root, deep=True)
            if check.usable:
                say(f"{error.message}; using the cached commit {check.commit}")
                return _cached_result(check)
            if check.problems:
                raise DamagedModel(
                    f"the cached copy of {ref} is damaged ({'; '.join(check.problems)}) and "
                    f"cannot be fetched again now: {error.message}. Once the Hub answers, "
                    f"run `{command}`"
                ) from exc
        raise error from exc

    chosen = select_files(f.path for f in remote)
    _check_weights_present(ref, [f.path for f in remote], chosen)
    wanted = {f.path: f for f in remote if f.path in chosen}
    manifest = Manifest(
        repo_id=ref.repo_id,
        revision=ref.revision or "main",
        commit=commit,
        files={p: ManifestFile(f.size, f.sha256) for p, f in wanted.items()},
    )
    if "config.json" not in wanted:
        raise UnsupportedModel(f"{ref.repo_id} has no config.json at the top; it is not a model")

    existing = repo.read_manifest(commit)
    if force:
        repo.discard(commit, chosen)
    elif existing is not None and _same_listing(existing, manifest):
        damaged = repo.damaged_files(existing, deep=True)
        if not damaged and not repo.problems(existing):
            existing = _with_local_hashes(repo, existing)
            _record(repo, ref, existing)
            size = repo.size_on_disk(commit, list(existing.files))
            return PullResult(ref, commit, repo.snapshot(commit), existing, size, False)
        say(f"cached files of {ref} failed verification; fetching them again")
        repo.discard(commit, damaged)

    created_folder = not repo.folder.exists()
    try:
        return _download(
            ref, repo, url, commit, manifest, progress, say, max_workers, api_timeout_s
        )
    except BaseException as exc:
        _clean_failed_pull(repo, commit, manifest, exc, created_folder)
        if isinstance(exc, Exception):
            raise _hub_error(exc, ref, url) from exc
        raise


def _download(
    ref: HubRef,
    repo: RepoCache,
    url: str,
    commit: str,
    manifest: Manifest,
    progress: bool | None,
    say: Notify,
    max_workers: int,
    api_timeout_s: float,
) -> PullResult:
    snapshot = repo.snapshot(commit)
    # Files damaged on disk would be kept by huggingface_hub (it trusts existing links).
    repo.discard(commit, repo.damaged_files(manifest))

    show = progress if progress is not None else sys.stderr.isatty()
    tqdm_class = None if show else _silent_tqdm()
    # config.json first: refuse an unsupported architecture before fetching its weights.
    config_path = hf_hub_download(
        ref.repo_id,
        "config.json",
        revision=commit,
        cache_dir=repo.root,
        endpoint=url,
        etag_timeout=api_timeout_s,
        tqdm_class=tqdm_class,
    )
    _check_architecture(ref, Path(config_path))

    missing = sum(f.size for p, f in manifest.files.items() if not (snapshot / p).is_file())
    free = free_bytes(repo.root)
    if missing > free:
        raise DiskFull(
            f"pulling {ref} needs {human_size(missing)} but {repo.root} has "
            f"{human_size(free)} free: free space there, or set AKIDB_CACHE_DIR to a directory "
            "on a larger disk"
        )
    say(
        f"pulling {ref.repo_id} at {commit[:12]}: {len(manifest.files)} files, "
        f"{human_size(missing)} to fetch"
    )
    snapshot_download(
        ref.repo_id,
        revision=commit,
        cache_dir=repo.root,
        endpoint=url,
        allow_patterns=[glob.escape(p) for p in manifest.files],
        etag_timeout=api_timeout_s,
        tqdm_class=tqdm_class,
        max_workers=max_workers,
    )
    problems = repo.problems(manifest, deep=True)
    if problems:
        raise DamagedModel(
            f"downloaded files of {ref} failed verification ({'; '.join(problems)}); "
            "the damaged files were removed: pull again"
        )
    manifest = _with_local_hashes(repo, manifest)
    _record(repo, ref, manifest)
    size = repo.size_on_disk(commit, list(manifest.files))
    return PullResult(ref, commit, snapshot, manifest, size, True)


def _same_listing(cached: Manifest, remote: Manifest) -> bool:
    """The cached manifest describes the files the Hub lists now: same paths and sizes, and
    the Hub's sha256 where it gives one (the cache adds its own for the other files)."""
    if cached.files.keys() != remote.files.keys():
        return False
    return all(
        cached.files[p].size == f.size and (f.sha256 is None or cached.files[p].sha256 == f.sha256)
        for p, f in remote.files.items()
    )


def _with_local_hashes(repo: RepoCache, manifest: Manifest) -> Manifest:
    """Record a sha256 for each verified file the Hub gave none for (config, tokenizer), so
    later damage to them is caught as well."""
    snapshot = repo.snapshot(manifest.commit)
    files = {
        p: f if f.sha256 else ManifestFile(f.size, content_sha256(snapshot / p))
        for p, f in manifest.files.items()
    }
    return dataclasses.replace(manifest, files=files)


def _record(repo: RepoCache, ref: HubRef, manifest: Manifest) -> None:
    """Mark the verified snapshot as cached, pulled last, and named by the asked revision."""
    repo.write_manifest(manifest)
    if ref.revision is not None:
        repo.write_ref(ref.revision, manifest.commit)


def _clean_failed_pull(
    repo: RepoCache, commit: str, manifest: Manifest, exc: BaseException, created_folder: bool
) -> None:
    """Leave no partial or damaged file behind. Verified files stay, so the next pull fetches
    only the rest; a pull that can never succeed leaves nothing at all. (huggingface_hub
    deletes its own partial file when a download fails.)"""
    repo.remove_incomplete(older_than_s=STALE_PARTIAL_S)
    never = isinstance(exc, (UnsupportedModel, HubAccessDenied, ModelNotFound))
    if never and created_folder:
        shutil.rmtree(repo.folder, ignore_errors=True)
        return
    snapshot = repo.snapshot(commit)
    repo.discard(commit, repo.damaged_files(manifest, deep=isinstance(exc, DamagedModel)))
    if snapshot.is_dir() and not any(snapshot.rglob("*")):
        shutil.rmtree(snapshot, ignore_errors=True)
