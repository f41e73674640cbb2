"""The Dockerfile, its recipe script and the Kubernetes manifest agree. (`make image-check`
runs the recipe itself in clean Debian roots; it is slow and not part of the test suite.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from tests.ops.test_deploy import parse_cli, pod_spec

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
RECIPE = REPO / "scripts" / "image-install.sh"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            rows.append((keyword.upper(), rest.strip()))
    return rows


def test_the_dockerfile_runs_the_shared_recipe_in_two_stages() -> None:
    rows = instructions()
    stages = [rest for keyword, rest in rows if keyword == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build")
    runs = [rest for keyword, rest in rows if keyword == "RUN"]
    # Every RUN is a step of the script image-check runs too: nothing to drift.
    assert runs == ["image-install.sh build /src", "image-install.sh runtime"]
    assert ("COPY", "--from=build /opt/akidb-embed /opt/akidb-embed") in rows
    for step in ("build)", "runtime)", "smoke)"):
        assert step in RECIPE.read_text()


def test_the_image_matches_the_kubernetes_manifest() -> None:
    rows = dict(instructions())
    spec = pod_spec()
    user = rows["USER"]
    assert user == f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
    assert f"UID_GID={spec['securityContext']['runAsUser']}" in RECIPE.read_text()
    env = dict(re.findall(r"(\w+)=(\S+)", rows["ENV"]))
    volumes = json.loads(rows["VOLUME"])
    socket = PurePosixPath(env["AKIDB_EMBED_SOCKET"])
    assert str(socket.parent) in volumes
    assert any(PurePosixPath(env["HF_HOME"]).is_relative_to(v) for v in volumes)
    # The health check is the CLI's probe; the entry point serves.
    health = rows["HEALTHCHECK"].split(" CMD ", 1)[1]
    probe = parse_cli(json.loads(health))
    assert probe.command == "health"
    command = json.loads(rows["ENTRYPOINT"]) + json.loads(rows["CMD"])
    assert parse_cli(command).command == "serve"
    [embed] = [c for c in spec["initContainers"] if c["name"] == "akidb-embed"]
    assert embed["image"].startswith("akidb-embed:")


def test_the_build_context_leaves_out_local_state() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in ("**/.venv", ".git", "clients/rust/target", "server/akidb_embed/bundled"):
        assert path in ignored


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_the_scripts_parse() -> None:
    for script in (RECIPE, REPO / "scripts" / "image-check.sh"):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    usage = subprocess.run(["bash", str(RECIPE)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
