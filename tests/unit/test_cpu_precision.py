"""Choosing fp32 or bf16 for the CPU engine (precision.py), and where the choice shows."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from akidb_embed.cli import main as cli
from akidb_embed.errors import ModelLoadError
from akidb_embed.modeling import cpu_bf16
from akidb_embed.modeling.precision import (
    CPU_PRECISION_ENV,
    CpuPrecision,
    cpu_precision_choice,
    resolve_cpu_path,
)
from akidb_embed.runtime.backend import cpu_precision

BF16_FLAGS = {"avx512f", "avx512_bf16"}
AMX_FLAGS = {"avx512f", "amx_bf16", "amx_tile"}
AVX2_FLAGS = {"avx2", "fma"}


def env(value: str) -> dict[str, str]:
    return {CPU_PRECISION_ENV: value}


@pytest.fixture()
def no_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_bf16, "_module", None)
    monkeypatch.setattr(cpu_bf16, "_error", "the bf16 extension is not built (test)")


def test_choice_parses_and_rejects() -> None:
    assert cpu_precision_choice({}) is CpuPrecision.AUTO
    assert cpu_precision_choice(env(" BF16 ")) is CpuPrecision.BF16
    with pytest.raises(ModelLoadError, match="auto, fp32, bf16"):
        cpu_precision_choice(env("int8"))


@pytest.mark.parametrize("flags", [BF16_FLAGS, AMX_FLAGS, AVX2_FLAGS, set()])
def test_fp32_is_always_fp32(flags: set[str]) -> None:
    path = resolve_cpu_path(env("fp32"), flags)
    assert not path.bf16 and path.label == "fp32"
    assert "fp32" in path.describe()


@pytest.mark.parametrize("flags", [AVX2_FLAGS, set(), {"avx512f", "avx512bw"}])
def test_auto_stays_fp32_without_bf16_instructions(flags: set[str]) -> None:
    path = resolve_cpu_path(env("auto"), flags)
    assert not path.bf16
    assert "no avx512_bf16 or amx_bf16" in path.reason


@pytest.mark.usefixtures("no_extension")
def test_auto_stays_fp32_without_the_extension() -> None:
    path = resolve_cpu_path({}, AMX_FLAGS)
    assert not path.bf16
    assert "not built" in path.describe()


@pytest.mark.usefixtures("no_extension")
def test_forced_bf16_without_the_extension_fails_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match="bf16 extension is not built"):
        resolve_cpu_path(env("bf16"), BF16_FLAGS)
    monkeypatch.setenv(CPU_PRECISION_ENV, "bf16")
    assert cpu_precision().startswith("unavailable: ")


@pytest.mark.skipif(cpu_bf16.extension() is None, reason=str(cpu_bf16.load_error()))
def test_auto_picks_bf16_with_flags_and_extension() -> None:
    ext = cpu_bf16.extension()
    assert ext is not None
    path = resolve_cpu_path({}, BF16_FLAGS)
    assert path.bf16 == bool(ext.bf16_supported())
    if path.bf16:
        assert path.describe().startswith("bf16 linears (onednn ")


def fake_extension(monkeypatch: pytest.MonkeyPatch, *, runnable: bool, isa: str) -> None:
    """An extension that loads, with oneDNN seeing `isa` (the real one depends on the CPU)."""
    fake = SimpleNamespace(
        bf16_runnable=lambda: runnable,
        bf16_supported=lambda: isa in ("avx512_core_bf16", "avx512_core_amx"),
        isa=lambda: isa,
        onednn_version=lambda: "2.6.3",
    )
    monkeypatch.setattr(cpu_bf16, "_module", fake)
    monkeypatch.setattr(cpu_bf16, "_error", None)


def test_forced_bf16_runs_emulated_and_says_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    # AVX512 without bf16 instructions: oneDNN emulates bf16.
    fake_extension(monkeypatch, runnable=True, isa="avx512_core")
    path = resolve_cpu_path(env("bf16"), {"avx512f"})
    assert path.bf16
    assert path.reason == "onednn 2.6.3 avx512_core; this CPU has no bf16 instructions: slow"
    assert not resolve_cpu_path({}, {"avx512f"}).bf16


def test_forced_bf16_where_onednn_has_no_kernel_fails_to_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # AVX2 alone: every bf16 layer would fail at load, so the engine refuses up front.
    fake_extension(monkeypatch, runnable=False, isa="avx2")
    with pytest.raises(ModelLoadError, match=r"no bf16 matmul for this CPU \(its ISA: avx2\)"):
        resolve_cpu_path(env("bf16"), AVX2_FLAGS)
    assert not resolve_cpu_path({}, AVX2_FLAGS).bf16


def test_real_extension_knows_whether_it_can_run() -> None:
    ext = cpu_bf16.extension()
    if ext is None:
        pytest.skip(str(cpu_bf16.load_error()))
    if ext.bf16_supported():
        assert ext.bf16_runnable()
    if cpu_bf16.runnable():
        assert resolve_cpu_path(env("bf16"), AVX2_FLAGS).bf16
        assert cpu_bf16.unavailable_reason() == ""
    else:
        assert ext.isa() in ("sse41", "avx", "avx2")
        with pytest.raises(ModelLoadError, match="no bf16 matmul"):
            resolve_cpu_path(env("bf16"), AVX2_FLAGS)


def test_backend_string_names_the_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_PRECISION_ENV, "fp32")
    assert cpu_precision() == f"fp32 ({CPU_PRECISION_ENV}=fp32)"


def test_serve_accepts_cpu_precision() -> None:
    args = cli.build_parser().parse_args(["serve", "--cpu-precision", "bf16"])
    assert args.cpu_precision == "bf16"
    # Without the flag: $AKIDB_EMBED_CPU_PRECISION (tests/conftest.py pins fp32), else auto.
    absent = cli.build_parser().parse_args(["serve"]).cpu_precision
    assert absent == os.environ.get(CPU_PRECISION_ENV, "auto")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--cpu-precision", "fp16"])


def test_native_build_skips_cleanly_without_its_tools(tmp_path: Path) -> None:
    """`make setup` on a machine without mlx/CMake/oneDNN: exit 0, say why, build nothing."""
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        ["bash", "scripts/build-native.sh"],
        cwd=repo,
        env={**os.environ, "PY": "/bin/false", "BUILD_DIR": str(tmp_path / "build")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "bf16 extension: not built" in done.stderr
    assert "the CPU engine stays fp32" in done.stderr
    assert not (tmp_path / "build").exists()
