#!/usr/bin/env bash
# Installs the optimised BLAS that MLX's CPU backend needs to be fast on Linux.
# The mlx-cpu wheel bundles a reference BLAS ~50x slower for fp32 matmul; the
# server preloads OpenBLAS automatically when this library is present.
set -euo pipefail
[ "$(uname -s)" = "Linux" ] || exit 0
lib=/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libblas.so.3
[ -e "$lib" ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "installing OpenBLAS (libopenblas0-pthread) for MLX's CPU backend..."
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
else
  echo "note: $lib not found; MLX on CPU will be ~50x slower." >&2
  echo "      install it with: sudo apt-get install libopenblas0-pthread" >&2
fi
