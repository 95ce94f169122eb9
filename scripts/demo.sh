#!/usr/bin/env bash
# The demo: builds tandem, starts tandemd on a file-backed volume, and shows real NBD clients
# writing and reading it: a filesystem made and checked through the export, a byte-exact copy
# out and back, and the dirty map that records every block written (what replication will
# ship). Cleans up everything it started. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
info() { printf '    %s\n' "$*"; }

say "Installing the Debian packages tandem needs (only what is missing)"
scripts/install-deps.sh

say "Building tandemd (release build, assertions on)"
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)" --target tandemd >/dev/null
TANDEMD=$ROOT/build/release/daemon/tandemd
info "built $TANDEMD ($($TANDEMD --version))"

WORK=$(mktemp -d /var/tmp/tandem-demo.XXXXXX)
PID=""
FUSE_PID=""
LOOP=""
cleanup() {
  set +e
  mountpoint -q "$WORK/fs" && umount "$WORK/fs"
  [ -n "$LOOP" ] && losetup -d "$LOOP"
  mountpoint -q "$WORK/fuse" && fusermount3 -u "$WORK/fuse"
  [ -n "$FUSE_PID" ] && wait "$FUSE_PID" 2>/dev/null
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then kill -TERM "$PID"; wait "$PID"; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() {  # wait_for PATH WHAT: bounded wait (30 s) for a path to appear
  for _ in $(seq 300); do [ -e "$1" ] && return 0; sleep 0.1; done
  echo "timed out waiting for $2" >&2; exit 1
}

SOCK=$WORK/vol0.nbd
cat > "$WORK/tandemd.toml" <<TOML
[node]
name = "site-a"
state_dir = "$WORK/state"

[[volume]]
id = "vol0"
path = "$WORK/vol0.img"     # a file stands in for /dev/nvme0n1
size = "1GiB"
nbd_socket = "$SOCK"
TOML

say "Checking the configuration"
"$TANDEMD" --check-config -c "$WORK/tandemd.toml"

say "Starting tandemd: it owns vol0 and exports it over NBD on $SOCK"
"$TANDEMD" -c "$WORK/tandemd.toml" 2> "$WORK/tandemd.log" &
PID=$!
wait_for "$SOCK" "tandemd to export vol0"
sed 's/^/    log: /' "$WORK/tandemd.log"
URI="nbd+unix:///vol0?socket=$SOCK"

say "What a host sees (nbdinfo)"
nbdinfo "$URI" | grep -E 'export-size|can_flush|can_fua|can_multi_conn|can_trim|can_zero|block_size' | sed 's/^/    /'

say "Writing and reading raw blocks with qemu-io (pattern, FUA write, zeroes, read-back checks)"
qemu-io -f raw -c 'write -P 0x42 0 4M' -c 'write -f -P 0x43 4M 1M' -c 'write -z 8M 1M' \
  -c 'read -P 0x42 0 4M' -c 'read -P 0x43 4M 1M' -c 'read -P 0 8M 1M' "$URI" | grep -E '^(wrote|read)' | sed 's/^/    /'

say "Putting an ext4 filesystem on the volume (nbdfuse turns the export into a file, losetup into a disk)"
mkdir -p "$WORK/fuse" "$WORK/fs"
nbdfuse "$WORK/fuse/disk" --unix "$SOCK" &
FUSE_PID=$!
wait_for "$WORK/fuse/disk" "nbdfuse"
LOOP=$(losetup --find --show --direct-io=on "$WORK/fuse/disk")
info "block device $LOOP is backed by tandem's vol0"
mkfs.ext4 -q -F -E nodiscard -L tandem-demo "$LOOP"
mount "$LOOP" "$WORK/fs"
cp -r "$ROOT/engine" "$ROOT/docs" "$WORK/fs/" 2>/dev/null || cp -r "$ROOT/engine" "$WORK/fs/"
head -c 20M /dev/urandom > "$WORK/fs/random.bin"
SUM=$(sha256sum "$WORK/fs/random.bin" | cut -d' ' -f1)
info "copied $(find "$WORK/fs" -type f | wc -l) files ($(du -sh "$WORK/fs" | cut -f1)) onto the filesystem"
umount "$WORK/fs"
say "Checking the filesystem (e2fsck -fn) and reading a file back"
e2fsck -fn "$LOOP" 2>&1 | tail -1 | sed 's/^/    /'
mount -o ro "$LOOP" "$WORK/fs"
[ "$(sha256sum "$WORK/fs/random.bin" | cut -d' ' -f1)" = "$SUM" ] && info "random.bin reads back identical (sha256 $SUM)"
umount "$WORK/fs"
losetup -d "$LOOP"; LOOP=""
fusermount3 -u "$WORK/fuse"; wait "$FUSE_PID"; FUSE_PID=""

say "Copying the whole volume out with nbdcopy (4 connections) and comparing with the backing file"
nbdcopy -C 4 "$URI" "$WORK/copy.img" </dev/null >/dev/null 2>&1
info "volume via NBD: $(xxh128sum "$WORK/copy.img" 2>/dev/null | cut -d' ' -f1)"
info "backing file:   $(xxh128sum "$WORK/vol0.img" 2>/dev/null | cut -d' ' -f1)"

say "Stopping tandemd cleanly (SIGTERM): requests finish, data and the dirty map are flushed"
kill -TERM "$PID"; wait "$PID"; PID=""
tail -2 "$WORK/tandemd.log" | sed 's/^/    log: /'

say "The dirty map: every 4 KiB block written since the volume was created (what replication will ship)"
"$TANDEMD" -c "$WORK/tandemd.toml" --inspect 2>/dev/null | /usr/bin/python3 -c '
import json, sys
v = json.load(sys.stdin)[0]
blocks = v["size_bytes"] // 4096
print("    volume %s, uuid %s: %d of %d blocks dirty (%.1f%%), in %d extents"
      % (v["id"], v["uuid"], v["dirty_blocks"], blocks, 100.0 * v["dirty_blocks"] / blocks, len(v["dirty_extents"])))'

say "Done. Next: two sites replicating (see the README)."
