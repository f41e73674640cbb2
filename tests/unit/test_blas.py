"""Automatic OpenBLAS for MLX's CPU backend: detection, the re-exec, the core fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from akidb_embed.host import blas

LIBRARY = blas.openblas_library()
needs_openblas = pytest.mark.skipif(
    LIBRARY is None or sys.platform != "linux", reason="Debian's libopenblas0-pthread not here"
)
REPO = Path(__file__).resolve().parents[2]


def test_loaded_libraries_reads_paths_from_proc_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3\n"
        "7f02-7f03 rw-p 00000000 00:00 0 \n"
        "7f04-7f05 r-xp 00000000 08:01 2 /venv/numpy.libs/libscipy_openblas64_-ab.so\n"
    )
    libraries = blas.loaded_libraries(maps)
    assert "/venv/numpy.libs/libscipy_openblas64_-ab.so" in libraries
    assert blas.mlx_openblas(libraries) == (
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
    )


def test_numpys_private_openblas_does_not_count() -> None:
    assert blas.mlx_openblas({"/venv/numpy.libs/libscipy_openblas64_-ab.so"}) is None


def test_openblas_library_finds_the_multiarch_path(tmp_path: Path) -> None:
    lib = tmp_path / "usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3"
    assert blas.openblas_library("aarch64", tmp_path) is None
    lib.parent.mkdir(parents=True)
    lib.touch()
    assert blas.openblas_library("aarch64", tmp_path) == lib


@pytest.mark.parametrize(
    ("detected", "flags", "expected"),
    [
        ("Prescott", {"avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"},
         "SkylakeX"),
        ("Prescott", {"avx2", "fma"}, "Haswell"),
        ("Nehalem", {"sse4_2"}, None),
        ("SkylakeX", {"avx2", "fma", "avx512f"}, None),
        ("Haswell", {"avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"},
         None),
        ("Zen", {"avx2", "fma"}, None),
    ],
)  # fmt: skip
def test_coretype_is_overridden_only_for_a_generic_fallback(
    detected: str, flags: set[str], expected: str | None
) -> None:
    assert blas.coretype_override(detected, flags) == expected


def test_blas_env_puts_the_library_first_and_sets_the_guard() -> None:
    env = blas.blas_env({"LD_PRELOAD": "/x/libfoo.so", blas.CORETYPE: "Haswell"}, Path("/l.so"))
    assert env["LD_PRELOAD"] == "/l.so:/x/libfoo.so"
    assert env[blas.REEXEC_GUARD] == "1"
    assert env[blas.CORETYPE] == "Haswell"  # an operator's choice is kept
    again = blas.blas_env(env, Path("/l.so"))
    assert again["LD_PRELOAD"] == "/l.so:/x/libfoo.so"


def test_the_guard_and_the_opt_out_prevent_a_reexec() -> None:
    assert blas.should_reexec({blas.REEXEC_GUARD: "1"}) is None
    assert blas.should_reexec({blas.OPT_OUT: "0"}) is None


def _child(code: str, env: dict[str, str]) -> str:
    env = {**env, "PYTHONPATH": f"{REPO / 'server'}{os.pathsep}{env.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("LD_PRELOAD", blas.REEXEC_GUARD, blas.CORETYPE, blas.OPT_OUT):
        env.pop(name, None)
    return env


REPORT = (
    "import sys; sys.argv = ['x', 'serve']\n"
    "from akidb_embed.host import blas\n"
    "blas.ensure_fast_blas()\n"
    "import mlx.core as mx\n"
    "from akidb_embed.runtime.backend import describe_backend\n"
    "print(describe_backend())\n"
)


@needs_openblas
def test_ensure_fast_blas_reexecs_with_openblas_preloaded() -> None:
    backend = _child(REPORT, _clean_env())
    assert backend.startswith("cpu (openblas"), backend
    # A core name is reported; never the generic fallback on a CPU with AVX2.
    if {"avx2", "fma"} <= blas.cpu_flags():
        assert "Prescott" not in backend, backend


@needs_openblas
def test_the_opt_out_keeps_the_bundled_blas() -> None:
    backend = _child(REPORT, {**_clean_env(), blas.OPT_OUT: "0"})
    assert backend.startswith("cpu (reference blas: install libopenblas0-pthread"), backend


@needs_openblas
def test_the_runner_preloads_for_any_command() -> None:
    code = "import os; print(os.environ.get('LD_PRELOAD', ''))"
    env = {**_clean_env(), "PYTHONPATH": str(REPO / "server")}
    done = subprocess.run(
        [sys.executable, "-m", "akidb_embed.host.blas", sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip().startswith(str(LIBRARY)), done.stderr
