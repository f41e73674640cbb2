"""The deployment examples parse, and agree with the CLI and with each other."""

from __future__ import annotations

import configparser
import plistlib
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from akidb_embed.cli.main import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes" / "akidb-with-embed-sidecar.yaml"
SYSTEMD = DEPLOY / "systemd" / "akidb-embed.service"
LAUNCHD = DEPLOY / "launchd" / "com.akidb.embed.plist"


def parse_cli(argv: list[str]) -> Any:
    """The real CLI parser accepts the command line (exits on an unknown flag)."""
    assert Path(argv[0]).name == "akidb-embed", argv
    return build_parser().parse_args(argv[1:])


def k8s_documents(kind: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d and d["kind"] == kind]


def pod_spec() -> dict[str, Any]:
    [deployment] = k8s_documents("Deployment")
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def quantity(value: str) -> float:
    """A Kubernetes quantity ("2", "500m", "1Gi", "512Mi") as a number (bytes, cores)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if str(value).endswith(suffix):
            return float(str(value)[: -len(suffix)]) * factor
    return float(value)


def test_kubernetes_resources_agree_with_the_worker_count() -> None:
    from akidb_embed.runtime.workers import DEFAULT_MODEL_BYTES, workers_for_memory

    [embed] = [c for c in pod_spec()["initContainers"] if c["name"] == "akidb-embed"]
    serve = parse_cli(embed["command"])
    requests, limits = embed["resources"]["requests"], embed["resources"]["limits"]
    # Guaranteed QoS: what is asked for is what is allowed.
    assert requests == limits
    cpus = quantity(limits["cpu"])
    # One engine worker per CPU, and the server's own default for this memory limit
    # (cgroup memory.max) is at least that many: the two never disagree.
    assert serve.workers == cpus
    assert workers_for_memory(int(quantity(limits["memory"])), DEFAULT_MODEL_BYTES) >= serve.workers


def test_kubernetes_model_cache_survives_restarts() -> None:
    spec = pod_spec()
    [embed] = [c for c in spec["initContainers"] if c["name"] == "akidb-embed"]
    env = {e["name"]: e.get("value") for e in embed["env"]}
    mounts = {m["name"]: m["mountPath"] for m in embed["volumeMounts"]}
    [volume] = [v for v in spec["volumes"] if v["name"] == "model-cache"]
    # On a claim, not an emptyDir: models survive the pod.
    claim = volume["persistentVolumeClaim"]["claimName"]
    [pvc] = [p for p in k8s_documents("PersistentVolumeClaim") if p["metadata"]["name"] == claim]
    assert quantity(pvc["spec"]["resources"]["requests"]["storage"]) >= 2**30
    assert PurePosixPath(env["HF_HOME"]).is_relative_to(mounts["model-cache"])
    # A ReadWriteOnce claim cannot be mounted by the next pod while the old one runs.
    if pvc["spec"]["accessModes"] == ["ReadWriteOnce"]:
        [deployment] = k8s_documents("Deployment")
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
    # The image the manifest names is the one `make image` builds.
    makefile = (DEPLOY.parent / "Makefile").read_text()
    assert f"IMAGE ?= {embed['image']}" in makefile
    assert spec["securityContext"]["runAsUser"] == 10001


def test_kubernetes_sidecar_shares_the_socket_and_probes_it() -> None:
    spec = pod_spec()
    [embed] = [c for c in spec["initContainers"] if c["name"] == "akidb-embed"]
    assert embed["restartPolicy"] == "Always"  # native sidecar: up before, down after the db
    [database] = spec["containers"]
    serve = parse_cli(embed["command"])
    assert serve.command == "serve"
    socket = PurePosixPath(str(serve.socket))

    # Both containers mount the same emptyDir, and the socket is inside it, one level down:
    # the emptyDir root is world-writable and the server refuses to put a socket there.
    [volume] = [v for v in spec["volumes"] if "emptyDir" in v and v["name"] == "embed-socket"]
    mounts = {
        c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (embed, database)
    }
    mount = PurePosixPath(mounts["akidb-embed"][volume["name"]])
    assert mounts["akidb"][volume["name"]] == str(mount)
    assert socket.is_relative_to(mount) and socket.parent != mount
    # The volume's world-writable root is above the socket's directory: the server refuses
    # that unless told only this pod's containers (one user) reach it.
    assert serve.trust_socket_parents
    env = {e["name"]: e["value"] for e in database["env"]}
    assert env["AKIDB_EMBED_SOCKET"] == str(socket)

    # Exec probes run the health command on that socket (kubelet's grpc probe needs TCP).
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = embed[kind]
        health = parse_cli(probe["exec"]["command"])
        assert health.command == "health", kind
        assert health.socket == str(socket), kind
        assert health.timeout < probe["timeoutSeconds"], kind
    # The startup probe gives model loading minutes before liveness takes over.
    startup = embed["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120

    assert spec["terminationGracePeriodSeconds"] > serve.grace
    for container in (embed, database):
        assert container["resources"]["requests"]["cpu"]
        assert container["resources"]["requests"]["memory"]
    # The metrics port is declared where it is served and where Prometheus looks for it.
    assert serve.metrics_port == embed["ports"][0]["containerPort"]
    annotations = pod_annotations()
    assert annotations["prometheus.io/port"] == str(serve.metrics_port)
    # Both containers share the same user, so the 0600 socket in a 0700 directory is enough.
    assert serve.socket_mode == "600"
    assert spec["securityContext"]["runAsUser"]


def pod_annotations() -> dict[str, str]:
    [deployment] = k8s_documents("Deployment")
    annotations: dict[str, str] = deployment["spec"]["template"]["metadata"]["annotations"]
    return annotations


def read_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string(SYSTEMD.read_text())
    return unit


def exec_start_argv(unit: configparser.ConfigParser) -> list[str]:
    # systemd joins backslash-continued lines; configparser keeps them as indented lines.
    joined = " ".join(
        line.rstrip("\\").strip() for line in unit["Service"]["ExecStart"].split("\n")
    )
    return joined.split()


def test_systemd_unit_fields() -> None:
    unit = read_unit()
    service = unit["Service"]
    serve = parse_cli(exec_start_argv(unit))
    assert serve.command == "serve"
    # Ready when SERVING (sd_notify READY=1 from the server), not when launched: Before=
    # and `systemctl start` then wait for the model to be warm, and TimeoutStartSec bounds it.
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert "Before" in unit["Unit"]
    assert float(service["TimeoutStartSec"]) >= 60
    # PrivateDevices= would hide a GPU from mlx[cuda].
    assert "PrivateDevices" not in service
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["User"] and service["Group"]
    assert float(service["TimeoutStopSec"]) > serve.grace
    # The socket is in the directory systemd creates for the service, which is 0750, with a
    # 0660 socket: the database's user reaches it through the group, nobody else does.
    assert service["RuntimeDirectoryMode"] == "0750"
    assert Path(str(serve.socket)).parent == Path("/run") / service["RuntimeDirectory"]
    assert serve.socket_mode == "660"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify insists the binary exists: point ExecStart at one that does.
    text = SYSTEMD.read_text().replace("/opt/akidb-embed/.venv/bin/akidb-embed", "/bin/true")
    unit = tmp_path / SYSTEMD.name
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr and "Invalid" not in result.stderr, result.stderr


def test_launchd_plist() -> None:
    plist = plistlib.loads(LAUNCHD.read_bytes())
    assert plist["Label"] == "com.akidb.embed"
    serve = parse_cli(plist["ProgramArguments"])
    assert serve.command == "serve"
    assert plist["RunAtLoad"] is True
    # Restart after a crash, not after a clean (exit 0) stop.
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ExitTimeOut"] > serve.grace
    assert plist["Umask"] == 0o077
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert PurePosixPath(plist[key]).is_absolute()  # launchd does not expand ~


POOL = DEPLOY / "kubernetes" / "embed-pool.yaml"


def test_kubernetes_pool_deployment_service_probes_and_budget() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(POOL.read_text()) if d}
    assert set(docs) == {"Deployment", "Service", "PodDisruptionBudget"}
    deployment, service, budget = docs["Deployment"], docs["Service"], docs["PodDisruptionBudget"]
    replicas = deployment["spec"]["replicas"]
    assert replicas >= 2
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [embed] = pod["spec"]["containers"]
    serve = parse_cli(embed["command"])
    assert serve.command == "serve"
    # TCP only, on every interface of the pod: the clients come from other pods.
    assert serve.no_socket and serve.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in embed["ports"]}
    assert ports["grpc"] == serve.port
    assert ports["metrics"] == serve.metrics_port
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(serve.metrics_port)

    # Kubelet's gRPC probes (grpc.health.v1) on the serving port.
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = embed[kind]
        assert probe["grpc"]["port"] == serve.port, kind
        assert "exec" not in probe and "httpGet" not in probe, kind
    startup = embed["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    # Draining must finish before kubelet's SIGKILL.
    assert pod["spec"]["terminationGracePeriodSeconds"] > serve.grace
    assert embed["resources"]["requests"]["cpu"] and embed["resources"]["requests"]["memory"]

    # Headless: DNS returns one address per ready pod, so clients balance per call.
    spec = service["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["selector"].items() <= labels.items()
    [port] = spec["ports"]
    assert port["port"] == serve.port and port["targetPort"] in ("grpc", serve.port)

    # Voluntary disruptions leave most replicas up.
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < budget["spec"]["maxUnavailable"] < replicas
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0
