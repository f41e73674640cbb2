#!/usr/bin/env bash
# Installs Node.js and npm for the contract test in clients/node if they are
# missing (Debian bookworm's nodejs is 18, which has `node --test`). Idempotent.
set -euo pipefail
command -v node >/dev/null && command -v npm >/dev/null && exit 0
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
  echo "clients/node needs Node.js >= 18 and npm: install them (e.g. apt-get install nodejs npm)" >&2
  exit 1
fi
echo "installing Node.js and npm for clients/node..."
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
