#!/usr/bin/env bash
# The set-up behind `npm start` and `npm test` (with --test): system packages (installed when run as
# root), npm dependencies, the TypeScript build and, for tests, the cached test images. Idempotent and
# quick when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"

# command → Debian package
need=(mkfs.erofs:erofs-utils zstd:zstd mknod:coreutils
      qemu-system-x86_64:qemu-system-x86 cpio:cpio gcc:gcc mkfs.ext4:e2fsprogs ip:iproute2 nft:nftables
      flex:flex bison:bison bc:bc make:make /usr/src/linux-source-6.1.tar.xz:linux-source-6.1
      /usr/include/libelf.h:libelf-dev /usr/include/stdio.h:libc6-dev
      buildah:buildah runc:runc git:git)
if [ "$mode" = "--test" ]; then
  need+=(docker-registry:docker-registry htpasswd:apache2-utils mmdebstrap:mmdebstrap busybox:busybox-static
         skopeo:skopeo umoci:umoci fsck.erofs:erofs-utils)
fi
missing=()
for pair in "${need[@]}"; do
  what="${pair%%:*}"
  if [ "${what#/}" != "$what" ]; then [ -e "$what" ] || missing+=("${pair##*:}")
  else command -v "$what" >/dev/null 2>&1 || missing+=("${pair##*:}"); fi
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

# Guest: the kernel (built once per machine, cached) and the init inside an initramfs.
bash scripts/guest-kernel.sh
mkdir -p dist/guest
if [ ! -s dist/guest/initramfs.cpio ] || [ guest/init.c -nt dist/guest/initramfs.cpio ]; then
  stage=$(mktemp -d)
  gcc -static -Os -Wall -o "$stage/init" guest/init.c
  mkdir -p "$stage/dev" "$stage/proc" "$stage/sys" "$stage/mnt"
  (cd "$stage" && find . | cpio -o -H newc --quiet -R 0:0) > dist/guest/initramfs.cpio.part
  mv dist/guest/initramfs.cpio.part dist/guest/initramfs.cpio
  rm -rf "$stage"
fi
if [ "$mode" = "--test" ]; then
  npx tsc -p tsconfig.check.json
  bash scripts/test-fixtures.sh
fi
