#!/usr/bin/env bash
# Builds the guest kernel once per machine: Debian's linux-source, `make tinyconfig` plus
# guest/kernel.config, everything built in, booted by QEMU as an ELF (PVH) with no initramfs.
# ~7 minutes on 2 cores; cached under CAKEWORK_KERNEL_DIR by a hash of the config and source version.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${CAKEWORK_KERNEL_DIR:-/var/cache/cakework-kernel}"
src_tar=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null || true)
if [ -z "$src_tar" ]; then
  echo "guest-kernel: /usr/src/linux-source-6.1.tar.xz is missing (apt-get install linux-source-6.1)" >&2
  exit 1
fi
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$(cat guest/kernel.config <(echo "$src_version") | sha256sum | cut -c1-16)
target="$out_dir/vmlinux-$key"
if [ -s "$target" ]; then
  ln -sfn "vmlinux-$key" "$out_dir/vmlinux"
  exit 0
fi
echo "guest-kernel: building the guest kernel (once per machine, ~7 minutes)"
mkdir -p "$out_dir"
build=$(mktemp -d "$out_dir/build.XXXXXX")
trap 'rm -rf "$build"' EXIT
tar -xJf "$src_tar" -C "$build" --strip-components=1
cd "$build"
make -s tinyconfig >/dev/null
./scripts/kconfig/merge_config.sh -m .config "$OLDPWD/guest/kernel.config" >/dev/null
make -s olddefconfig >/dev/null
# Every fragment line must survive olddefconfig, or the guest silently lacks a feature.
missing=$(grep -E '^CONFIG_[A-Z0-9_]+=y' "$OLDPWD/guest/kernel.config" | while read -r line; do grep -qx "$line" .config || echo "$line"; done)
if [ -n "$missing" ]; then echo "guest-kernel: options not applied: $missing" >&2; fi
make -s -j"$(nproc)" vmlinux >/dev/null
cp vmlinux "$target.part"
mv "$target.part" "$target"
ln -sfn "vmlinux-$key" "$out_dir/vmlinux"
echo "guest-kernel: built $target"
