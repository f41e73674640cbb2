#!/usr/bin/env bash
# Installs the optimised BLAS that MLX's CPU backend needs to be fast on Linux.
# The mlx-cpu wheel bundles a reference BLAS ~50x slower for fp32 matmul; the
# server preloads OpenBLAS automatically when this library is present.
# On x86-64 it also installs oneDNN (libdnnl-dev), CMake and a C++ compiler for the bf16
# linear layer (ext/bf16): optional, the CPU engine stays fp32 without them.
set -euo pipefail
[ "$(uname -s)" = "Linux" ] || exit 0
lib=/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libblas.so.3
packages=()
[ -e "$lib" ] || packages+=(libopenblas0-pthread)
if [ "$(uname -m)" = "x86_64" ]; then
  [ -e /usr/include/oneapi/dnnl/dnnl.hpp ] || packages+=(libdnnl-dev)
  command -v cmake >/dev/null || packages+=(cmake)
  command -v c++ >/dev/null || packages+=(g++)
fi
[ ${#packages[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "installing ${packages[*]} for MLX's CPU backend..."
  apt-get update -qq >/dev/null || true
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null; then
    # The bf16 extension's build tools are optional; OpenBLAS is not.
    [ -e "$lib" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
    echo "note: could not install ${packages[*]}; the CPU engine may stay fp32" >&2
  fi
else
  [ -e "$lib" ] || {
    echo "note: $lib not found; MLX on CPU will be ~50x slower." >&2
    echo "      install it with: sudo apt-get install libopenblas0-pthread" >&2
  }
  echo "note: for bf16 on CPUs with AVX512-BF16/AMX: sudo apt-get install ${packages[*]}" >&2
fi
