"""The registry on its own: name resolution (registry names, `name@revision`, Hub ids,
operator directories), the NOT_FOUND / not-downloaded / damaged messages, where a model's
files are (cache, bundled copy, local directory) and in what state, and removal.

Offline: cached repositories are written here in the cache's own layout (model_cache.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from akidb_embed.errors import (
    DamagedModel,
    ErrorKind,
    InvalidArgument,
    ModelNotAvailable,
    ModelNotFound,
)
from akidb_embed.store.model_cache import Manifest, ManifestFile, RepoCache
from akidb_embed.store.registry import (
    BUNDLED_MANIFEST,
    DEFAULT_MODEL,
    KNOWN_MODELS,
    CacheState,
    Registry,
    build_manifest,
    bundled_minilm_dir,
    content_revision,
    directory_size,
    installed_manifest,
)

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
MINILM_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"


def model_files(seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    weights = {"encoder.weight": rng.standard_normal((16, 8)).astype(np.float32)}
    return {
        "config.json": json.dumps({"model_type": "bert", "seed": seed}).encode(),
        "model.safetensors": save(weights),
        "tokenizer.json": b'{"version": "1.0"}',
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    }


def cache_repo(
    root: Path,
    repo_id: str,
    commit: str = COMMIT_A,
    revision: str = "main",
    files: dict[str, bytes] | None = None,
) -> Path:
    """A pulled snapshot in the cache's layout: files, manifest, `current` and the ref."""
    files = model_files() if files is None else files
    repo = RepoCache(repo_id, root)
    snapshot = repo.snapshot(commit)
    for name, data in files.items():
        path = snapshot / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    recorded = {
        name: ManifestFile(len(data), hashlib.sha256(data).hexdigest())
        for name, data in files.items()
    }
    repo.write_manifest(Manifest(repo_id, revision, commit, recorded))
    repo.write_ref(revision, commit)
    return snapshot


def local_model(root: Path, name: str = "my-model") -> Path:
    directory = root / name
    for relative, data in model_files().items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A registry over an empty cache of its own."""
    return Registry(cache_root=tmp_path / "cache")


# --- names ---------------------------------------------------------------------------------


def test_every_known_name_resolves_to_its_own_entry(registry: Registry) -> None:
    for known in KNOWN_MODELS:
        assert registry.resolve(known.name) == known
        assert registry.resolve(f"  {known.name}\t") == known
    assert registry.resolve("").name == DEFAULT_MODEL
    assert Registry(default_model="bge-small-en-v1.5").resolve("").name == "bge-small-en-v1.5"


def test_name_at_revision_keeps_the_source_and_names_the_revision(registry: Registry) -> None:
    entry = registry.resolve("bge-small-en-v1.5@v2")
    assert entry.name == "bge-small-en-v1.5@v2"
    assert entry.source == registry.resolve("bge-small-en-v1.5").source
    assert entry.revision == "v2" and not entry.local
    with pytest.raises(InvalidArgument, match="not a usable revision"):
        registry.resolve("bge-small-en-v1.5@../../etc")
    with pytest.raises(InvalidArgument, match="not a usable revision"):
        registry.resolve("bge-small-en-v1.5@")


def test_hub_ids_resolve_to_themselves(registry: Registry) -> None:
    entry = registry.resolve("Acme/Some.Model_1")
    assert (entry.name, entry.source, entry.revision) == (
        "Acme/Some.Model_1",
        "Acme/Some.Model_1",
        None,
    )
    assert "Hub" in entry.description
    assert not entry.local


def test_unknown_name_is_not_found_and_lists_every_name_and_the_hub_form(
    registry: Registry, tmp_path: Path
) -> None:
    registry.add_local(local_model(tmp_path, "zz-operator-model"))
    with pytest.raises(ModelNotFound) as info:
        registry.resolve("nomic-embed@v1")
    error = info.value
    assert error.kind is ErrorKind.NOT_FOUND
    assert "unknown model 'nomic-embed@v1'" in error.message
    known = [e.name for e in KNOWN_MODELS] + ["zz-operator-model"]
    listed = error.message.split("known models: ", 1)[1].split(";", 1)[0]
    assert listed.split(", ") == sorted(known)
    assert "org/name@revision" in error.message


def test_paths_are_not_names(registry: Registry, tmp_path: Path) -> None:
    directory = local_model(tmp_path)
    for name in (str(directory), "./my-model", "~/my-model"):
        with pytest.raises(ModelNotFound):
            registry.resolve(name)


# --- operator directories ------------------------------------------------------------------


def test_add_local_needs_a_config_and_serves_the_directory_by_its_name(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(InvalidArgument, match=r"not a model directory \(no config.json\)"):
        registry.add_local(empty)
    with pytest.raises(ModelNotFound):
        registry.resolve("not-a-model")

    monkeypatch.setenv("HOME", str(tmp_path))
    directory = local_model(tmp_path)
    entry = registry.add_local(Path("~/my-model"))
    assert entry.name == "my-model" and entry.local
    assert entry.source == str(directory.resolve())
    assert registry.resolve("my-model") == entry
    renamed = registry.add_local(directory, name="other-name")
    assert registry.resolve("other-name") == renamed
    assert renamed.source == entry.source


def test_local_directory_state_size_and_content_revision(
    registry: Registry, tmp_path: Path
) -> None:
    directory = local_model(tmp_path)
    entry = registry.add_local(directory)
    status = registry.status(entry)
    assert status.state is CacheState.LOCAL
    assert status.located is not None
    assert status.located.directory == directory.resolve()
    expected_size = sum(len(data) for data in model_files().values())
    assert status.located.size_bytes == expected_size == directory_size(directory)
    revision = status.located.revision
    assert re.fullmatch(r"local-[0-9a-f]{12}", revision)
    assert registry.locate(entry) == status.located
    assert registry.require(entry) == status.located
    assert registry.verified(entry) == status.located  # no record to check against

    (directory / "README.md").write_text("notes that are not part of the model")
    assert content_revision(directory) == revision
    (directory / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    assert content_revision(directory) != revision
    assert registry.status(entry).located.revision == content_revision(directory)  # type: ignore[union-attr]


def test_a_local_directory_has_no_revisions_and_is_never_pulled_or_deleted(
    registry: Registry, tmp_path: Path
) -> None:
    directory = local_model(tmp_path)
    entry = registry.add_local(directory)
    with pytest.raises(InvalidArgument, match="'my-model' is a local directory; it has no rev"):
        registry.resolve("my-model@main")
    with pytest.raises(InvalidArgument, match="nothing to pull"):
        registry.pull(entry)
    with pytest.raises(InvalidArgument, match="does not delete it"):
        registry.remove(entry)
    assert (directory / "model.safetensors").is_file()


# --- the cache -----------------------------------------------------------------------------


def test_cached_hub_model_is_located_at_its_snapshot(registry: Registry) -> None:
    snapshot = cache_repo(registry.root, "acme/tiny")
    entry = registry.resolve("acme/tiny")
    status = registry.status(entry)
    assert status.state is CacheState.CACHED
    assert status.located is not None
    assert status.located.directory == snapshot
    assert status.located.revision == COMMIT_A
    assert status.located.size_bytes == sum(len(d) for d in model_files().values())
    assert registry.verified(entry) == status.located
    assert registry.ensure(entry, allow_download=False) == status.located


def test_revisions_are_answered_from_the_cache_refs(registry: Registry) -> None:
    cache_repo(registry.root, "acme/tiny", COMMIT_A, "v1", model_files(1))
    cache_repo(registry.root, "acme/tiny", COMMIT_B, "main", model_files(2))
    pinned = registry.locate(registry.resolve("acme/tiny@v1"))
    latest = registry.locate(registry.resolve("acme/tiny"))
    by_commit = registry.locate(registry.resolve(f"acme/tiny@{COMMIT_A}"))
    assert pinned is not None and latest is not None and by_commit is not None
    assert pinned.revision == COMMIT_A == by_commit.revision
    assert latest.revision == COMMIT_B  # the commit pulled last

    missing = registry.resolve("acme/tiny@v3")
    assert registry.status(missing).state is CacheState.MISSING
    with pytest.raises(ModelNotAvailable) as info:
        registry.require(missing)
    assert info.value.kind is ErrorKind.FAILED_PRECONDITION
    assert "'acme/tiny@v3' (acme/tiny) is not downloaded" in info.value.message
    assert "run `akidb-embed pull acme/tiny@v3` first" in info.value.message


def test_entries_list_hub_ids_pulled_by_id_once(registry: Registry, tmp_path: Path) -> None:
    cache_repo(registry.root, "acme/tiny")
    cache_repo(registry.root, "BAAI/bge-small-en-v1.5")  # a registry name's source
    RepoCache("acme/unfinished", registry.root).snapshot(COMMIT_A).mkdir(parents=True)
    registry.add_local(local_model(tmp_path))
    names = [e.name for e in registry.entries()]
    assert names[: len(KNOWN_MODELS)] == [e.name for e in KNOWN_MODELS]
    assert "my-model" in names and "acme/tiny" in names
    assert "BAAI/bge-small-en-v1.5" not in names  # listed as bge-small-en-v1.5
    assert "acme/unfinished" not in names  # no manifest: nothing was pulled
    assert len(names) == len(set(names))


def test_damaged_cache_is_reported_not_located_and_never_pulled_over(
    registry: Registry,
) -> None:
    snapshot = cache_repo(registry.root, "acme/tiny")
    weights = snapshot / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    entry = registry.resolve("acme/tiny")
    status = registry.status(entry)
    assert status.state is CacheState.DAMAGED and status.located is None
    assert "model.safetensors" in status.problem
    assert registry.locate(entry) is None

    with pytest.raises(ModelNotAvailable) as refused:
        registry.require(entry)
    message = refused.value.message
    assert "the files of 'acme/tiny' are damaged: " in message
    assert status.problem in message
    assert "run `akidb-embed pull acme/tiny --force` to fetch them again" in message
    with pytest.raises(DamagedModel, match="are damaged"):
        registry.verified(entry)
    # Damaged files are repaired by a forced pull, not replaced by a silent one.
    with pytest.raises(DamagedModel):
        registry.ensure(entry, allow_download=True)


def test_changed_bytes_are_seen_by_the_deep_check_only(registry: Registry) -> None:
    snapshot = cache_repo(registry.root, "acme/tiny")
    tokenizer = snapshot / "tokenizer.json"
    original = tokenizer.read_bytes()
    tokenizer.write_bytes(original.replace(b"1.0", b"9.9"))
    assert len(tokenizer.read_bytes()) == len(original)
    entry = registry.resolve("acme/tiny")
    assert registry.status(entry).state is CacheState.CACHED
    deep = registry.status(entry, deep=True)
    assert deep.state is CacheState.DAMAGED
    assert "tokenizer.json: its sha256 checksum does not match" in deep.problem
    with pytest.raises(DamagedModel, match=r"tokenizer\.json"):
        registry.verified(entry)


# --- the bundled default -------------------------------------------------------------------


@pytest.fixture
def bundled() -> Path:
    directory = bundled_minilm_dir()
    if directory is None:
        pytest.skip("the bundled all-MiniLM-L6-v2 is not installed")
    return directory


def test_bundled_default_serves_only_its_unpinned_name(registry: Registry, bundled: Path) -> None:
    status = registry.status(registry.resolve(DEFAULT_MODEL))
    assert status.state is CacheState.BUNDLED
    assert status.located is not None and status.located.directory == bundled
    assert status.located.revision == content_revision(bundled)
    # A pinned revision is a Hub commit; the bundled copy is not one.
    pinned = registry.resolve(f"{DEFAULT_MODEL}@v1")
    assert registry.status(pinned).state is CacheState.MISSING
    with pytest.raises(ModelNotAvailable, match=re.escape(f"pull {DEFAULT_MODEL}@v1")):
        registry.require(pinned)
    # Removing the default never touches the package's files.
    assert registry.remove(registry.resolve(DEFAULT_MODEL)) == []
    assert (bundled / "model.safetensors").is_file()


def test_a_pulled_copy_wins_over_the_bundled_one_and_damage_is_not_hidden(
    registry: Registry, bundled: Path
) -> None:
    snapshot = cache_repo(registry.root, MINILM_SOURCE)
    entry = registry.resolve(DEFAULT_MODEL)
    cached = registry.status(entry)
    assert cached.state is CacheState.CACHED
    assert cached.located is not None and cached.located.directory == snapshot
    (snapshot / "config.json").unlink()
    damaged = registry.status(entry)
    assert damaged.state is CacheState.DAMAGED
    assert "config.json is missing" in damaged.problem
    with pytest.raises(ModelNotAvailable, match=re.escape(f"pull {DEFAULT_MODEL} --force")):
        registry.require(entry)


def test_build_manifest_reads_the_builds_hash_lines(tmp_path: Path) -> None:
    directory = local_model(tmp_path)
    config = (directory / "config.json").read_bytes()
    lines = [
        f"{hashlib.sha256(config).hexdigest()}  config.json",
        "",
        f"{'0' * 64}  1_Pooling/config.json",
        f"{'f' * 64}  gone.safetensors",
    ]
    (directory / BUNDLED_MANIFEST).write_text("\n".join(lines) + "\n")
    found = build_manifest(directory)
    assert set(found) == {"config.json", "1_Pooling/config.json", "gone.safetensors"}
    assert found["config.json"] == ManifestFile(len(config), hashlib.sha256(config).hexdigest())
    assert found["1_Pooling/config.json"].sha256 == "0" * 64
    assert found["gone.safetensors"].size == -1  # a missing file can never match
    assert build_manifest(tmp_path) == {}
    assert installed_manifest("no-such-distribution-akidb", directory) == {}


# --- removal -------------------------------------------------------------------------------


def test_remove_deletes_the_whole_repository_or_one_revision(registry: Registry) -> None:
    cache_repo(registry.root, "acme/tiny", COMMIT_A, "v1", model_files(1))
    cache_repo(registry.root, "acme/tiny", COMMIT_B, "main", model_files(2))
    repo = RepoCache("acme/tiny", registry.root)

    assert registry.remove(registry.resolve("acme/tiny@v9")) == []
    assert registry.remove(registry.resolve("acme/tiny@v1")) == [COMMIT_A]
    assert not repo.snapshot(COMMIT_A).exists()
    assert registry.locate(registry.resolve("acme/tiny@v1")) is None
    kept = registry.locate(registry.resolve("acme/tiny"))
    assert kept is not None and kept.revision == COMMIT_B

    cache_repo(registry.root, "acme/tiny", COMMIT_A, "v1", model_files(1))
    assert registry.remove(registry.resolve("acme/tiny")) == [COMMIT_A, COMMIT_B]
    assert not repo.folder.exists()
    assert registry.status(registry.resolve("acme/tiny")).state is CacheState.MISSING
    assert registry.remove(registry.resolve("acme/never-pulled")) == []
