#!/usr/bin/env bash
# The container image's recipe, one step per stage. The Dockerfile runs it, and
# `make image-check` (scripts/image-check.sh) runs the very same steps in a clean Debian root,
# so the two cannot drift.
#
#   image-install.sh build SRC   build stage: Python venv in /opt/akidb-embed with the client,
#                                the server (MLX CPU) and the embedded default model
#   image-install.sh runtime     final stage: Python, OpenBLAS, user 10001, the socket and
#                                cache directories (the venv is copied in afterwards)
#   image-install.sh smoke       serve, wait for SERVING, embed a text, stop (as uid 10001)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PREFIX=/opt/akidb-embed
UID_GID=10001
SOCKET_DIR=/run/akidb-embed
CACHE_DIR=/var/cache/akidb-embed

apt_install() {
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  apt-get clean
  rm -rf /var/lib/apt/lists/*
}

case "${1:-}" in
build)
  src=${2:?usage: image-install.sh build SRC}
  apt_install python3 python3-venv ca-certificates
  python3 -m venv "$PREFIX"
  pip=("$PREFIX/bin/python" -m pip --disable-pip-version-check --no-cache-dir --quiet)
  "${pip[@]}" install --upgrade pip
  # Non-editable: the wheel carries the default model's files (build_support/akidb_build.py).
  "${pip[@]}" install "$src/clients/python" "$src[cpu]"
  # pip is not needed to serve; compiled bytecode is (the root filesystem may be read-only).
  "${pip[@]}" uninstall -y pip
  "$PREFIX/bin/python" -m compileall -q "$PREFIX/lib" >/dev/null || true
  ;;
runtime)
  # python3 is the interpreter the venv points at; OpenBLAS makes MLX's CPU backend fast
  # (the server preloads it by itself).
  apt_install python3 libopenblas0-pthread ca-certificates
  groupadd --gid "$UID_GID" akidb-embed
  useradd --uid "$UID_GID" --gid "$UID_GID" --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin akidb-embed
  # The socket directory is a volume shared with the database: 0700, owned by the server's
  # user (the database runs as the same uid). The cache holds pulled models.
  install -d -o "$UID_GID" -g "$UID_GID" -m 0700 "$SOCKET_DIR"
  install -d -o "$UID_GID" -g "$UID_GID" -m 0750 "$CACHE_DIR"
  ;;
smoke)
  export PATH="$PREFIX/bin:$PATH" HF_HUB_OFFLINE=1 HF_HOME="$CACHE_DIR/huggingface"
  export AKIDB_EMBED_SOCKET="$SOCKET_DIR/embed.sock"
  ! "$PREFIX/bin/python" -c "import torch" 2>/dev/null || { echo "torch is installed" >&2; exit 1; }
  akidb-embed --version
  akidb-embed serve --log-format json 2>/tmp/serve.log &
  server=$!
  for _ in $(seq 120); do
    akidb-embed health --timeout 2 >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat /tmp/serve.log >&2; exit 1; }
    sleep 1
  done
  akidb-embed health
  # MLX on the CPU runs with Debian's OpenBLAS, not the wheel's slow reference BLAS.
  grep -o 'SERVING (backend: [^)]*)' /tmp/serve.log
  grep -q 'SERVING (backend: cpu (openblas' /tmp/serve.log
  out=$(akidb-embed embed --format jsonl "hello from the image")
  echo "${out:0:120}..."
  akidb-embed models
  kill -TERM "$server"
  wait "$server"
  echo "smoke: served and embedded offline as uid $(id -u); clean stop"
  ;;
*)
  echo "usage: image-install.sh build SRC | runtime | smoke" >&2
  exit 2
  ;;
esac
