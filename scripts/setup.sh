#!/usr/bin/env bash
# The set-up behind `npm start` and `npm test` (with --test): system packages (installed when run as
# root), npm dependencies, the TypeScript build and, for tests, the cached test images. Idempotent and
# quick when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"

# command → Debian package
need=(mkfs.erofs:erofs-utils zstd:zstd mknod:coreutils)
if [ "$mode" = "--test" ]; then
  need+=(docker-registry:docker-registry htpasswd:apache2-utils mmdebstrap:mmdebstrap busybox:busybox-static
         skopeo:skopeo umoci:umoci fsck.erofs:erofs-utils)
fi
missing=()
for pair in "${need[@]}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}; install them (as root: apt-get install ${missing[*]}) or run this as root" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: installing npm dependencies"
  npm ci --no-audit --no-fund --loglevel=error
fi

npx tsc -p tsconfig.json
if [ "$mode" = "--test" ]; then
  npx tsc -p tsconfig.check.json
  bash scripts/test-fixtures.sh
fi
