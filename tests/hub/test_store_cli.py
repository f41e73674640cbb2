"""`pull`, `models` and `rm` on the command line, against the fake Hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from akidb_embed.cli.store import main
from akidb_embed.store.registry import Registry

from .conftest import TINY_REPO, HubEnv


def test_pull_models_rm_round_trip(hub_env: HubEnv, capsys: pytest.CaptureFixture[str]) -> None:
    commit = hub_env.hub.repo(TINY_REPO).refs["main"]

    assert main(["pull", TINY_REPO]) == 0
    out, err = capsys.readouterr()
    assert f"{TINY_REPO}: {TINY_REPO} at {commit}" in out
    assert "pulling acme/tiny-bert" in err

    assert main(["models"]) == 0
    out, _ = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.startswith(TINY_REPO))
    assert row.split()[1:4] == [TINY_REPO, "cached", commit[:12]]
    qwen = next(line for line in out.splitlines() if line.startswith("qwen3-0.6b-4bit"))
    assert "not_downloaded" in qwen

    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[TINY_REPO]["revision"] == commit
    assert rows[TINY_REPO]["size_bytes"] > 0
    assert rows[TINY_REPO]["loaded"] is None

    assert main(["rm", TINY_REPO]) == 0
    assert "removed acme/tiny-bert" in capsys.readouterr().out
    assert not (hub_env.cache / "models--acme--tiny-bert").exists()
    assert main(["rm", TINY_REPO]) == 1
    assert "not in the cache" in capsys.readouterr().err


def test_pull_with_revision_flag_and_force(
    hub_env: HubEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = hub_env.hub.repo(TINY_REPO)
    first = repo.refs["main"]
    repo.add_commit({**repo.commits[first], "vocab.txt": b"changed\n"})

    assert main(["pull", TINY_REPO, "--revision", first]) == 0
    assert f"at {first}" in capsys.readouterr().out
    assert main(["pull", TINY_REPO, "--revision", first, "--force"]) == 0
    assert len(hub_env.hub.gets("model.safetensors")) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pull", "acme/missing"], "acme/missing was not found"),
        (["pull", "no-such-model"], "unknown model 'no-such-model'"),
        (["pull", "acme/x@../../etc"], "not a usable revision"),
        (["rm", "acme/x@.."], "not a usable revision"),
    ],
)
def test_cli_errors_exit_non_zero_with_a_message(
    hub_env: HubEnv, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if message in line]
    assert line.startswith("akidb-embed: error: ")


def test_server_pulls_on_demand_only_when_allowed(hub_env: HubEnv) -> None:
    from akidb_embed.errors import ModelNotAvailable

    registry = Registry()
    entry = registry.resolve(TINY_REPO)
    expected = re.escape(f"run `akidb-embed pull {TINY_REPO}` first")
    with pytest.raises(ModelNotAvailable, match=expected):
        registry.ensure(entry, allow_download=False)
    assert hub_env.hub.log == []
    located = registry.ensure(entry, allow_download=True)
    assert located.revision == hub_env.hub.repo(TINY_REPO).refs["main"]
    assert registry.ensure(entry, allow_download=False) == located


def test_rm_one_revision_keeps_the_other_and_shared_blobs(
    hub_env: HubEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    from .conftest import tiny_bert_files

    repo = hub_env.hub.repo(TINY_REPO)
    old = repo.refs["main"]
    new = repo.add_commit({**tiny_bert_files(seed=3), "vocab.txt": repo.commits[old]["vocab.txt"]})
    assert main(["pull", f"{TINY_REPO}@{old}"]) == 0
    assert main(["pull", TINY_REPO]) == 0

    assert main(["rm", f"{TINY_REPO}@{old}"]) == 0
    assert f"removed {TINY_REPO}@{old}" in capsys.readouterr().out
    registry = Registry()
    assert registry.locate(registry.resolve(f"{TINY_REPO}@{old}")) is None
    kept = registry.locate(registry.resolve(TINY_REPO))
    assert kept is not None and kept.revision == new
    assert (kept.directory / "vocab.txt").read_bytes() == repo.commits[old]["vocab.txt"]
    blobs = list((hub_env.cache / "models--acme--tiny-bert" / "blobs").iterdir())
    kept_files = [p for p in kept.directory.rglob("*") if p.is_file()]
    assert len(blobs) == len(kept_files)  # the removed snapshot's own blobs are gone


def test_akidb_embed_command_has_pull_rm_and_an_offline_models(
    hub_env: HubEnv, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from akidb_embed.cli.main import main as akidb_embed

    assert akidb_embed(["pull", TINY_REPO]) == 0
    capsys.readouterr()

    no_server = ["--socket", str(tmp_path / "none.sock"), "--timeout", "2"]
    assert akidb_embed(["models", *no_server]) == 0
    out, err = capsys.readouterr()
    assert "no server answers" in err and "listing the registry and the cache" in err
    assert any(line.startswith(TINY_REPO) and "cached" in line for line in out.splitlines())

    assert akidb_embed(["models", "--offline", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[TINY_REPO]["status"] == "cached"

    assert akidb_embed(["rm", TINY_REPO]) == 0
    assert akidb_embed(["pull", "acme/missing"]) == 1
    assert "acme/missing was not found" in capsys.readouterr().err
