"""Use an optimised BLAS for MLX's CPU backend on Linux, with no manual step.

The `mlx-cpu` wheel bundles a reference BLAS: fp32 matmul is ~50x slower than OpenBLAS.
Its symbols can only be replaced before the process starts (LD_PRELOAD), so the CLI calls
`ensure_fast_blas()` first thing, which re-executes the process once with Debian's
OpenBLAS (`libopenblas0-pthread`) preloaded when it is installed and not yet loaded.

OpenBLAS builds with DYNAMIC_ARCH pick their kernels from the CPU model, and fall back to
a generic SSE3 core ("Prescott") on models newer than the build: Debian's 0.3.21 does so on
recent Xeons, 4.7x slower than its AVX-512 kernels. The re-exec then also sets
OPENBLAS_CORETYPE from the CPU's flags.

`python -m akidb_embed.host.blas CMD...` runs any command that way (the Makefile's tests and
benchmark); with no command it prints the backend Health reports.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .device import gpu_backend

# Set in the re-executed process so a preload that does not take cannot loop.
REEXEC_GUARD = "AKIDB_EMBED_BLAS_REEXEC"
# "0" turns the automatic preload off (to measure the bundled BLAS, say).
OPT_OUT = "AKIDB_EMBED_PRELOAD_BLAS"
CORETYPE = "OPENBLAS_CORETYPE"
INSTALL_HINT = "install libopenblas0-pthread"

# OpenBLAS cores whose sgemm kernels use AVX2 or AVX-512 (lower case).
_AVX512_CORES = {"skylakex", "cooperlake", "sapphirerapids"}
_AVX2_CORES = {"haswell", "zen", "excavator", *_AVX512_CORES}
_AVX512_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def openblas_library(machine: str | None = None, root: Path = Path("/")) -> Path | None:
    """Debian/Ubuntu's multi-arch OpenBLAS (pthread build), if installed."""
    machine = machine or platform.machine()
    path = root / "usr" / "lib" / f"{machine}-linux-gnu" / "openblas-pthread" / "libblas.so.3"
    return path if path.exists() else None


def loaded_libraries(maps: Path = Path("/proc/self/maps")) -> set[str]:
    """Paths of the files mapped into this process (Linux only)."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return set()
    # Fields: address perms offset dev inode [pathname]; anonymous maps have no path.
    return {fields[5] for fields in map(str.split, lines) if len(fields) >= 6}


# Debian's OpenBLAS variants; numpy's wheel maps its own private OpenBLAS, which MLX does
# not use, so a bare "openblas" in a path proves nothing.
_DEBIAN_OPENBLAS_DIRS = ("/openblas-pthread/", "/openblas-openmp/", "/openblas-serial/")


def mlx_openblas(libraries: set[str] | None = None) -> str | None:
    """The Debian OpenBLAS mapped into this process (where MLX's `libblas` resolves)."""
    libraries = loaded_libraries() if libraries is None else libraries
    found = sorted(lib for lib in libraries if any(d in lib for d in _DEBIAN_OPENBLAS_DIRS))
    return found[0] if found else None


def openblas_loaded(libraries: set[str] | None = None) -> bool:
    return mlx_openblas(libraries) is not None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def best_coretype(flags: set[str]) -> str | None:
    """The OpenBLAS x86-64 core with the widest sgemm kernels these CPU flags run."""
    if flags >= _AVX512_FLAGS:
        return "SkylakeX"
    if flags >= {"avx2", "fma"}:
        return "Haswell"
    return None


def coretype_override(detected: str, flags: set[str]) -> str | None:
    """OPENBLAS_CORETYPE to set when OpenBLAS fell back to a pre-AVX2 core; else None."""
    if detected.lower() in _AVX2_CORES:
        return None
    return best_coretype(flags)


def openblas_corename(library: Path | str) -> str:
    """The core whose kernels `library` picked (loads it into this process)."""
    try:
        lib = ctypes.CDLL(str(library))
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return str(lib.openblas_get_corename().decode())
    except (OSError, AttributeError):
        return ""


def blas_env(env: Mapping[str, str], library: Path) -> dict[str, str]:
    """`env` with `library` first in LD_PRELOAD, OPENBLAS_CORETYPE if needed, the guard set."""
    out = dict(env)
    existing = [p for p in out.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    if str(library) not in existing:
        out["LD_PRELOAD"] = ":".join([str(library), *existing])
    if CORETYPE not in out:
        coretype = coretype_override(openblas_corename(library), cpu_flags())
        if coretype is not None:
            out[CORETYPE] = coretype
    out[REEXEC_GUARD] = "1"
    return out


def should_reexec(env: Mapping[str, str]) -> Path | None:
    """The library to preload, or None when this process should run as it is."""
    if sys.platform != "linux" or env.get(OPT_OUT) == "0" or env.get(REEXEC_GUARD):
        return None
    library = openblas_library()
    if library is None or gpu_backend() is not None:
        return None
    # Preloaded by hand: re-exec only to fix a generic-core fallback.
    if openblas_loaded() and (
        CORETYPE in env or coretype_override(openblas_corename(library), cpu_flags()) is None
    ):
        return None
    return library


def ensure_fast_blas() -> None:
    """Re-execute this process with OpenBLAS preloaded, if that would help; else return.

    Call it before any work starts: the process image is replaced.
    """
    library = should_reexec(os.environ)
    if library is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps `-m module` and interpreter flags, unlike argv.
    os.execve(sys.executable, list(sys.orig_argv), blas_env(os.environ, library))


def describe_cpu_blas() -> str:
    """e.g. "openblas SkylakeX", or the reference BLAS with what to install."""
    library = mlx_openblas()
    if library is None:
        return f"reference blas: {INSTALL_HINT} for ~50x faster matmuls"
    core = openblas_corename(library)
    return f"openblas {core}" if core else "openblas"


def set_openblas_threads(threads: int) -> bool:
    """Set the loaded OpenBLAS's thread count (e.g. 1 per worker process); False if none."""
    library = mlx_openblas()
    if library is None:
        return False
    try:
        ctypes.CDLL(library).openblas_set_num_threads(int(threads))
    except (OSError, AttributeError):
        return False
    return True


def openblas_threads() -> int | None:
    """The loaded OpenBLAS's thread count; None without one."""
    library = mlx_openblas()
    if library is None:
        return None
    try:
        return int(ctypes.CDLL(library).openblas_get_num_threads())
    except (OSError, AttributeError):
        return None


def run_with_fast_blas(command: Sequence[str]) -> None:
    """exec `command` with OpenBLAS preloaded when it is installed (Linux)."""
    env = dict(os.environ)
    library = openblas_library() if sys.platform == "linux" else None
    if library is not None and env.get(OPT_OUT) != "0":
        env = blas_env(env, library)
    os.execvpe(command[0], list(command), env)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if args:
        run_with_fast_blas(args)
    print(describe_cpu_blas())


if __name__ == "__main__":
    main()
