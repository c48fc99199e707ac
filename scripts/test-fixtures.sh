#!/usr/bin/env bash
# Builds the test images' root filesystems once per machine (they need Debian's package mirror,
# so they are made here at set-up time, never inside a test). Cached under CAKEWORK_FIXTURES_DIR.
set -euo pipefail
dir="${CAKEWORK_FIXTURES_DIR:-/var/cache/cakework-fixtures}"
mkdir -p "$dir"
if [ ! -s "$dir/debian-minbase.tar" ]; then
  echo "setup: building the Debian minbase test image with mmdebstrap (once per machine)"
  mmdebstrap --quiet --format=tar --variant=minbase bookworm "$dir/debian-minbase.tar.part"
  mv "$dir/debian-minbase.tar.part" "$dir/debian-minbase.tar"
fi
if [ ! -s "$dir/debian-minbase.tar.gz" ]; then
  gzip -6 -c "$dir/debian-minbase.tar" > "$dir/debian-minbase.tar.gz.part"
  mv "$dir/debian-minbase.tar.gz.part" "$dir/debian-minbase.tar.gz"
fi
