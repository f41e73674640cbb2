"""Where a model's derived files go, and that they go with its commit."""

from __future__ import annotations

from pathlib import Path

from akidb_embed.service.model_records import records_dir
from akidb_embed.store.model_cache import RepoCache


def test_hub_records_live_in_the_repos_cache_folder(tmp_path: Path) -> None:
    repo = RepoCache("org/name", tmp_path)
    commit = "a" * 40
    snapshot = repo.snapshot(commit)
    snapshot.mkdir(parents=True)
    folder = records_dir(snapshot, "org/name", commit, root=tmp_path)
    assert folder == repo.folder / "akidb" / "derived" / commit
    folder.mkdir(parents=True)
    (folder / "selfcheck-x.json").write_text("{}")
    repo.remove_commit(commit)
    assert not folder.exists()


def test_bundled_and_local_records_live_under_the_cache_root(tmp_path: Path) -> None:
    model = tmp_path / "read-only" / "model"
    model.mkdir(parents=True)
    folder = records_dir(model, str(model), "local-0123456789abcdef", root=tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" / "akidb-derived"
    assert folder.name.endswith("_model@local-0123456789")
