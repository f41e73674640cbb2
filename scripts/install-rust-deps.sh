#!/usr/bin/env bash
# Installs what clients/rust needs to build and test offline on Debian bookworm:
# protoc, and the crates it uses as Debian packages (librust-*-dev put their
# sources under /usr/share/cargo/registry, which clients/rust/.cargo/config.toml
# uses instead of crates.io). Also a Rust toolchain (Debian's cargo/rustc 1.63)
# if there is none. Idempotent; quiet when everything is there.
set -euo pipefail

packages=(
  protobuf-compiler           # protoc 3.21, run by prost-build in build.rs
  librust-prost-dev           # 0.11
  librust-prost-types-dev
  librust-prost-build-dev
  librust-h2-dev              # 0.3: the HTTP/2 client gRPC runs on
  librust-http-dev            # 0.2
  librust-bytes-dev
  librust-tokio-dev           # 1.24 (Debian's package carries every feature's deps)
  librust-futures-core-dev
  librust-futures-util-dev
  librust-percent-encoding-dev  # grpc-message is percent-encoded
  librust-tempfile-dev        # tests: temporary socket directories
)
command -v cargo >/dev/null || packages+=(cargo rustc)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
  echo "clients/rust needs these Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "installing for clients/rust: ${missing[*]}"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
