"""Pulling from a Hub-compatible server on loopback: cache hits, offline mode, revisions,
resume, damage, locks, and the errors a person gets."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from akidb_embed.errors import (
    DiskFull,
    HubAccessDenied,
    HubUnavailable,
    ModelNotAvailable,
    ModelNotFound,
    UnsupportedModel,
)
from akidb_embed.store import hub as hub_module
from akidb_embed.store.hub import pull
from akidb_embed.store.model_cache import HubRef, RepoCache, inspect
from akidb_embed.store.registry import CacheState, Registry

from .conftest import EXPECTED_FILES, TINY_REPO, HubEnv, tiny_bert_files

REF = HubRef(TINY_REPO)


def snapshot_files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.endswith(".incomplete")]


def test_first_pull_fetches_only_config_tokenizer_and_safetensors(hub_env: HubEnv) -> None:
    commit = hub_env.hub.repo(TINY_REPO).refs["main"]
    result = pull(REF, progress=False)

    assert result.downloaded
    assert result.commit == commit
    assert result.directory == hub_env.cache / "models--acme--tiny-bert" / "snapshots" / commit
    assert snapshot_files(result.directory) == EXPECTED_FILES
    for skipped in ("pytorch_model.bin", "README.md", "onnx/model.onnx", "onnx/config.json"):
        assert hub_env.hub.gets(skipped) == [], skipped
    files = tiny_bert_files()
    for name in EXPECTED_FILES:
        assert (result.directory / name).read_bytes() == files[name]
    # The manifest pins the commit and the Hub's sizes; sha256 for LFS files.
    assert result.manifest.commit == commit
    assert result.manifest.files["model.safetensors"].size == len(files["model.safetensors"])
    assert (
        result.manifest.files["model.safetensors"].sha256
        == hashlib.sha256(files["model.safetensors"]).hexdigest()
    )
    assert result.size_bytes == sum(len(files[n]) for n in EXPECTED_FILES)
    located = Registry().locate(Registry().resolve(TINY_REPO))
    assert located is not None
    assert located.revision == commit
    assert located.directory == result.directory


def test_second_pull_is_a_cache_hit_even_with_the_hub_stopped(hub_env: HubEnv) -> None:
    first = pull(REF, progress=False)
    requests = len(hub_env.hub.log)

    again = pull(REF, progress=False)
    assert not again.downloaded
    assert again.directory == first.directory
    # Only the model-info call: no file was fetched again.
    assert [p for _, p, _ in hub_env.hub.log[requests:]] == [f"/api/models/{TINY_REPO}"]

    hub_env.hub.stop()
    notes: list[str] = []
    offline_hit = pull(REF, progress=False, notify=notes.append)
    assert not offline_hit.downloaded
    assert offline_hit.commit == first.commit
    assert "cannot reach" in notes[0] and "using the cached commit" in notes[0]


def test_offline_mode_uses_only_the_cache(hub_env: HubEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    first = pull(REF, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests = len(hub_env.hub.log)

    cached = pull(REF, progress=False)
    assert not cached.downloaded and cached.commit == first.commit
    assert Registry().locate(Registry().resolve(TINY_REPO)) is not None

    hub_env.hub.repo("acme/other").add_commit(tiny_bert_files(seed=1))
    with pytest.raises(ModelNotAvailable, match="HF_HUB_OFFLINE=1 forbids downloads"):
        pull(HubRef("acme/other"), progress=False)
    assert len(hub_env.hub.log) == requests  # not one request in offline mode


def test_pinned_revision_branch_and_commit(hub_env: HubEnv) -> None:
    repo = hub_env.hub.repo(TINY_REPO)
    old = repo.refs["main"]
    repo.refs["v1"] = old
    new = repo.add_commit(tiny_bert_files(seed=2))  # main moves on
    registry = Registry()

    pinned = registry.pull(registry.resolve(f"{TINY_REPO}@{old}"), progress=False)
    assert pinned.revision == old
    by_tag = pull(HubRef(TINY_REPO, "v1"), progress=False)
    assert by_tag.commit == old and not by_tag.downloaded
    latest = registry.pull(registry.resolve(TINY_REPO), progress=False)
    assert latest.revision == new

    def config_seed(located_dir: Path) -> bytes:
        return (located_dir / "config.json").read_bytes()

    old_entry = registry.locate(registry.resolve(f"{TINY_REPO}@{old}"))
    tag_entry = registry.locate(registry.resolve(f"{TINY_REPO}@v1"))
    last = registry.locate(registry.resolve(TINY_REPO))
    assert old_entry is not None and tag_entry is not None and last is not None
    assert old_entry.revision == tag_entry.revision == old
    assert last.revision == new  # no revision: the commit pulled last
    assert config_seed(old_entry.directory) == tiny_bert_files()["config.json"]
    assert config_seed(last.directory) == tiny_bert_files(seed=2)["config.json"]

    with pytest.raises(ModelNotFound, match="revision 'nope' does not exist"):
        pull(HubRef(TINY_REPO, "nope"), progress=False)


def test_dropped_connection_resumes_with_a_range_request(
    hub_env: HubEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hf_constants

    # huggingface_hub resumes from the last chunk it wrote; make chunks small so that the
    # cut falls well after the first one (the real chunk size is 10 MB).
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    weights = tiny_bert_files()["model.safetensors"]
    cut = 700_000
    assert len(weights) > cut
    hub_env.hub.drop_once["model.safetensors"] = cut

    result = pull(REF, progress=False)

    ranges = hub_env.hub.gets("model.safetensors")
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1] is not None
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= cut
    assert (result.directory / "model.safetensors").read_bytes() == weights
    assert leftovers(hub_env.cache) == []


def test_failed_pull_cleans_up_and_the_next_pull_fetches_only_the_rest(hub_env: HubEnv) -> None:
    repo = RepoCache(TINY_REPO, hub_env.cache)
    stale = repo.folder / "blobs" / "deadbeef.1234abcd.incomplete"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a killed process")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    hub_env.hub.fail["model.safetensors"] = 500

    with pytest.raises(HubUnavailable, match="HTTP 500"):
        pull(REF, progress=False)

    assert leftovers(hub_env.cache) == []
    commit = hub_env.hub.repo(TINY_REPO).refs["main"]
    assert repo.read_manifest(commit) is None
    assert Registry().locate(Registry().resolve(TINY_REPO)) is None
    assert not (repo.snapshot(commit) / "model.safetensors").exists()

    del hub_env.hub.fail["model.safetensors"]
    result = pull(REF, progress=False)
    assert result.downloaded
    assert len(hub_env.hub.gets("/config.json")) == 2  # config.json and 1_Pooling/config.json
    assert len(hub_env.hub.gets("vocab.txt")) == 1  # kept from the failed pull
    assert snapshot_files(result.directory) == EXPECTED_FILES


@pytest.mark.parametrize("damage", ["truncate", "garble-header", "garble-data"])
def test_damaged_weights_are_detected_and_repaired_by_pull(hub_env: HubEnv, damage: str) -> None:
    first = pull(REF, progress=False)
    weights = first.directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    blob = weights.resolve()
    if damage == "truncate":
        blob.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "garble-header":
        data[8:16] = b"\xff" * 8
        blob.write_bytes(bytes(data))
    else:
        data[-100] ^= 0xFF  # same size, header intact: only the sha256 can tell
        blob.write_bytes(bytes(data))
    registry = Registry()
    entry = registry.resolve(TINY_REPO)

    status = registry.status(entry)
    if damage == "garble-data":
        assert status.state is CacheState.CACHED  # the cheap check cannot see it
        problems = inspect(REF, deep=True).problems
        assert problems == (
            "model.safetensors: its sha256 checksum does not match the one recorded when it "
            "was pulled",
        )
        assert registry.status(entry, deep=True).state is CacheState.DAMAGED
    else:
        assert status.state is CacheState.DAMAGED
        assert registry.locate(entry) is None
        assert "model.safetensors" in status.problem
        with pytest.raises(ModelNotAvailable, match=f"damaged.*akidb-embed pull {TINY_REPO}"):
            registry.require(entry)

    repaired = pull(REF, progress=False)
    assert repaired.downloaded
    assert len(hub_env.hub.gets("model.safetensors")) == 2
    assert weights.read_bytes() == tiny_bert_files()["model.safetensors"]
    assert registry.status(entry).state is CacheState.CACHED


def test_two_processes_pulling_at_once_fetch_each_file_once(hub_env: HubEnv) -> None:
    hub_env.hub.delay_s = 0.1  # ~2 s for the weights: the second process must wait
    script = (
        "from akidb_embed.store.hub import pull; from akidb_embed.store.model_cache import HubRef; "
        f"r = pull(HubRef({TINY_REPO!r}), progress=False, notify=print); "
        "print('RESULT', r.commit, r.downloaded)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=hub_env.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    results = sorted(out.split("RESULT")[1].split() for out, _ in outputs)
    commit = hub_env.hub.repo(TINY_REPO).refs["main"]
    assert results == [[commit, "False"], [commit, "True"]]
    assert any("another process is pulling" in out for out, _ in outputs)
    for name in EXPECTED_FILES:
        assert len(hub_env.hub.gets("/" + name)) == (2 if name == "config.json" else 1), name
    assert inspect(REF, deep=True).usable


def test_missing_repo_is_not_found(hub_env: HubEnv) -> None:
    with pytest.raises(ModelNotFound, match=r"acme/nope was not found.*HF_TOKEN"):
        pull(HubRef("acme/nope"), progress=False)
    assert not (hub_env.cache / "models--acme--nope").exists()


def test_gated_repo_asks_for_a_token(hub_env: HubEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_env.hub.repo("acme/gated").add_commit(tiny_bert_files())
    hub_env.hub.repo("acme/gated").token = "hf_secret"
    with pytest.raises(HubAccessDenied, match=r"gated or private.*HF_TOKEN.*hf auth login"):
        pull(HubRef("acme/gated"), progress=False)
    assert not (hub_env.cache / "models--acme--gated").exists()

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert pull(HubRef("acme/gated"), progress=False).downloaded


def test_pickle_only_repo_is_refused_before_any_download(hub_env: HubEnv) -> None:
    files = tiny_bert_files()
    del files["model.safetensors"]
    hub_env.hub.repo("acme/pickles").add_commit(files)
    with pytest.raises(UnsupportedModel, match=r"only pickled weights \(pytorch_model.bin\)"):
        pull(HubRef("acme/pickles"), progress=False)
    assert [m for m, p, _ in hub_env.hub.log if "/resolve/" in p] == []
    assert not (hub_env.cache / "models--acme--pickles").exists()


def test_unsupported_architecture_is_refused_before_the_weights(hub_env: HubEnv) -> None:
    files = tiny_bert_files()
    files["config.json"] = b'{"model_type": "llama"}'
    hub_env.hub.repo("acme/llama").add_commit(files)
    with pytest.raises(UnsupportedModel, match=r"'llama' model; akidb-embed supports: .*bert"):
        pull(HubRef("acme/llama"), progress=False)
    assert hub_env.hub.gets("model.safetensors") == []
    assert not (hub_env.cache / "models--acme--llama").exists()


def test_unreachable_hub_says_so(hub_env: HubEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(HubUnavailable, match=rf"cannot reach .*127.0.0.1:{port}.*HF_HUB_OFFLINE"):
        pull(REF, progress=False)
    assert time.monotonic() - start < 10


def test_disk_full_is_reported_with_sizes(hub_env: HubEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "free_bytes", lambda path: 1000)
    expected = r"needs \d+\.\d KB but .* has 1\.0 KB free.*AKIDB_CACHE_DIR"
    with pytest.raises(DiskFull, match=expected):
        pull(REF, progress=False)
    assert hub_env.hub.gets("model.safetensors") == []
    assert leftovers(hub_env.cache) == []


def test_enospc_during_download_is_disk_full(
    hub_env: HubEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*args: object, **kwargs: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hub_module, "snapshot_download", no_space)
    with pytest.raises(DiskFull, match="is full"):
        pull(REF, progress=False)


def test_two_threads_pulling_at_once_fetch_each_file_once(hub_env: HubEnv) -> None:
    from concurrent.futures import ThreadPoolExecutor

    hub_env.hub.delay_s = 0.02
    registry = Registry()
    entry = registry.resolve(TINY_REPO)
    with ThreadPoolExecutor(2) as pool:
        located = list(pool.map(lambda _: registry.ensure(entry, allow_download=True), range(2)))
    assert located[0] == located[1]
    assert len(hub_env.hub.gets("model.safetensors")) == 1


def test_killed_pull_leaves_a_cache_the_next_pull_completes(hub_env: HubEnv) -> None:
    hub_env.hub.delay_s = 0.2  # the weights take ~2 s: kill the process in the middle
    script = (
        "from akidb_embed.store.hub import pull; from akidb_embed.store.model_cache import HubRef; "
        f"pull(HubRef({TINY_REPO!r}), progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=hub_env.env())
    repo = RepoCache(TINY_REPO, hub_env.cache)
    commit = hub_env.hub.repo(TINY_REPO).refs["main"]
    deadline = time.monotonic() + 30
    while (
        not (hub_env.hub.gets("model.safetensors") and leftovers(hub_env.cache))
        or not (repo.snapshot(commit) / "vocab.txt").exists()
    ):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert Registry().locate(Registry().resolve(TINY_REPO)) is None  # no manifest yet
    hub_env.hub.delay_s = 0

    result = pull(REF, progress=False)  # the dead process's lock is gone with it
    assert result.downloaded and inspect(REF, deep=True).usable
    assert len(hub_env.hub.gets("vocab.txt")) == 1  # finished files are kept
    assert len(hub_env.hub.gets("model.safetensors")) == 2  # the partial one starts over
    # The dead process's partial files (the weights', and any other file that was in flight
    # at the kill: files download in parallel) are removed once clearly stale.
    partials = leftovers(hub_env.cache)
    assert partials
    for partial in partials:
        os.utime(partial, (time.time() - 3600, time.time() - 3600))
    assert not pull(REF, progress=False).downloaded
    assert leftovers(hub_env.cache) == []
