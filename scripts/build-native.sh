#!/usr/bin/env bash
# Builds akidb-embed's bf16 linear layer for MLX's CPU backend (ext/bf16) against the MLX
# wheel's CMake config, into server/akidb_embed/modeling/_bf16*.so. Optional: when a piece is missing
# (Linux x86-64, a C++ compiler, CMake, nanobind, oneDNN's headers) it says so and exits 0,
# and the server computes in fp32 as before. `make setup` runs it; so does `make native`.
set -uo pipefail
PY=${PY:-.venv/bin/python}
BUILD=${BUILD_DIR:-build/native}
DEST=server/akidb_embed/modeling
skip() { echo "bf16 extension: not built ($*); the CPU engine stays fp32" >&2; exit 0; }

[ "$(uname -s)" = "Linux" ] || skip "not Linux"
case "$(uname -m)" in x86_64) ;; *) skip "not x86-64" ;; esac
command -v cmake >/dev/null || skip "cmake not found"
command -v c++ >/dev/null || skip "no C++ compiler"
mlx_cmake=$("$PY" -c 'import mlx, pathlib; print(pathlib.Path(mlx.__path__[0]) / "share/cmake/MLX")' 2>/dev/null) \
  || skip "mlx is not installed in $PY"
[ -f "$mlx_cmake/MLXConfig.cmake" ] || skip "the mlx wheel has no $mlx_cmake/MLXConfig.cmake"
nb_cmake=$("$PY" -m nanobind --cmake_dir 2>/dev/null) || skip "nanobind is not installed in $PY"
[ -f /usr/include/oneapi/dnnl/dnnl.hpp ] || [ -n "${dnnl_DIR:-}" ] || skip "oneDNN not found (apt-get install libdnnl-dev)"

log=$BUILD/build.log
mkdir -p "$BUILD"
if ! { cmake -S ext/bf16 -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
        -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
        -DMLX_DIR="$mlx_cmake" -Dnanobind_ROOT="$nb_cmake" \
     && cmake --build "$BUILD" -j "$(nproc)"; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  skip "the build failed; full log in $log"
fi
so=$(ls "$BUILD"/_bf16*.so 2>/dev/null | head -n 1)
[ -n "$so" ] || skip "the build produced no module; see $log"
rm -f "$DEST"/_bf16*.so
cp "$so" "$DEST/"
echo "bf16 extension: built $DEST/$(basename "$so")"
