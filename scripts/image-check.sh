#!/usr/bin/env bash
# `make image-check`: prove the container recipe without a container runtime or a base
# image. Builds two clean Debian roots (mmdebstrap, else debootstrap), runs the Dockerfile's
# two stages in them with the same script (scripts/image-install.sh build / runtime), copies
# the venv across as `COPY --from=build` does, then serves and embeds inside the final root
# as uid 10001 with no network for the model, and reports its size. Needs root; slow.
set -euo pipefail
cd "$(dirname "$0")/.."
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
KEEP=${KEEP:-0}

[ "$(id -u)" = 0 ] || { echo "image-check: run as root (it builds chroots)" >&2; exit 1; }
if ! command -v mmdebstrap >/dev/null && ! command -v debootstrap >/dev/null; then
  echo "==> installing mmdebstrap"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
fi

work=$(mktemp -d /var/tmp/akidb-image-check.XXXXXX)
mounted=()
cleanup() {
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
  # --one-file-system: never into a mount that outlived its stage (proc, dev).
  if [ "$KEEP" = 1 ]; then echo "kept $work"; else rm -rf --one-file-system "$work"; fi
}
trap cleanup EXIT

bootstrap() {  # a minimal Debian root, as the base image would be
  echo "==> debian $SUITE root for the $(basename "$1") stage"
  if command -v mmdebstrap >/dev/null; then
    mmdebstrap --quiet --variant=minbase "$SUITE" "$1" "$MIRROR"
  else
    debootstrap --variant=minbase "$SUITE" "$1" "$MIRROR" >/dev/null
  fi
  cp /etc/resolv.conf "$1/etc/resolv.conf"
  # This machine's own CAs (a proxy that inspects TLS needs them); ca-certificates picks
  # them up when the stage installs it.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$1/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/"
  fi
  install -m 0755 scripts/image-install.sh "$1/usr/local/sbin/image-install.sh"
}

in_root() {  # chroot with the image's environment, not this shell's
  local root=$1
  shift
  local pass=()
  for name in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL; do
    [ -n "${!name:-}" ] && pass+=("$name=${!name}")
  done
  {
    local rc=0
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
      LANG=C.UTF-8 "${pass[@]}" chroot "$@" 2>&1 || rc=$?
    echo "$rc" >"$work/status"
  } | { grep -v -e 'posix_openpt' -e 'apt-utils' || true; } | sed 's/^/    /'
  return "$(cat "$work/status")"
}

started=$(date +%s)
bootstrap "$work/build"
# The build context, as .dockerignore leaves it.
mkdir "$work/build/src"
tar --create --exclude-vcs --exclude-from=<(grep -v '^#' .dockerignore | sed 's|^\*\*/||') . |
  tar --extract --directory "$work/build/src"
echo "==> stage build: image-install.sh build /src"
in_root "$work/build" "$work/build" image-install.sh build /src

bootstrap "$work/final"
echo "==> stage final: image-install.sh runtime, then COPY --from=build /opt/akidb-embed"
in_root "$work/final" "$work/final" image-install.sh runtime
cp -a "$work/build/opt/akidb-embed" "$work/final/opt/akidb-embed"

size_mb=$(du -sx --block-size=1M "$work/final" | cut -f1)
venv_mb=$(du -sx --block-size=1M "$work/final/opt/akidb-embed" | cut -f1)

echo "==> smoke test in the final root as uid 10001 (model from the image, HF_HUB_OFFLINE=1)"
for fs in proc dev; do
  mount --bind "/$fs" "$work/final/$fs" && mounted+=("$work/final/$fs")
done
mount -t tmpfs tmpfs "$work/final/dev/shm" && mounted+=("$work/final/dev/shm")
rm -f "$work/final/etc/resolv.conf"  # serving needs no network
in_root "$work/final" --userspec=10001:10001 "$work/final" image-install.sh smoke

echo "image-check: OK in $(($(date +%s) - started)) s; final root ${size_mb} MB uncompressed" \
  "(/opt/akidb-embed ${venv_mb} MB)"
