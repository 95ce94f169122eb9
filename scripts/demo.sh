#!/usr/bin/env bash
# The two-site demo: builds tandem, starts two tandemd on this machine -- site-a (the source)
# and site-b (the destination) -- replicating a file-backed volume over mutual TLS on
# loopback, and walks through what an operator does: a filesystem written on site-a, synced
# with a progress bar, a planned failover to site-b (the same files, the same checksums), and
# a failback to site-a. Everything it starts is stopped and removed at the end, on error and
# on Ctrl-C too. Run as root on Debian 12: ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '\n\033[1;31mdemo: %s\033[0m\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run me as root: I install packages, mount filesystems and attach loop devices"

SID=s-vol0      # the replication session: both sites call it by the same name
WAIT_S=60       # bound on every wait for something to start, appear or stop
SYNC_S=300      # bound on every sync, failover and reprotect (tandemctl --wait --timeout)

WORK=$(mktemp -d /var/tmp/tandem-demo.XXXXXX)  # /var/tmp: a real disk (O_DIRECT works there)
declare -A DPID=()      # site -> tandemd PID
declare -A FUSE_PID=()  # site -> nbdfuse PID
STOP_RC=0

# reap PID: waits up to WAIT_S for PID to exit, SIGKILL if it will not; its status in STOP_RC.
reap() {
  local pid=$1 deadline=$((SECONDS + WAIT_S))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "demo: PID $pid did not stop within ${WAIT_S}s: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  STOP_RC=0
  wait "$pid" 2>/dev/null || STOP_RC=$?
}
# stop_pid PID: SIGTERM, then reap.
stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  reap "$1"
}

# mounted DIR: something is mounted on DIR (from /proc/mounts: works on a dead FUSE mount too).
mounted() { awk -v d="$1" '$2 == d { found = 1 } END { exit !found }' /proc/mounts; }
# detach SITE: unmounts SITE's filesystem, detaches its loop device, unmounts its nbdfuse.
detach() {
  local site=$1 loop
  if mounted "$WORK/$site/fs"; then umount "$WORK/$site/fs" || umount -l "$WORK/$site/fs"; fi
  # Every loop device on this site's nbdfuse file (found in sysfs: even one attached by a
  # losetup that was interrupted before it could say its name).
  for loop in $(losetup -l -n -O NAME,BACK-FILE | awk -v f="$WORK/$site/fuse/disk" '$2 == f {print $1}'); do
    losetup -d "$loop"
  done
  if mounted "$WORK/$site/fuse"; then
    fusermount3 -u "$WORK/$site/fuse" || fusermount3 -uz "$WORK/$site/fuse"
  fi
  if [ -n "${FUSE_PID[$site]:-}" ]; then  # it exits by itself once unmounted
    reap "${FUSE_PID[$site]}"
    FUSE_PID[$site]=""
  fi
  rm -f "$WORK/$site/nbdfuse.pid"
}

cleanup() {
  local rc=$? site
  set +e
  trap '' INT TERM  # every step below is bounded: let it finish
  if [ "$rc" -ne 0 ]; then
    printf '\n==> Stopped (exit status %s): undoing everything. The last lines of each log:\n' "$rc" >&2
    for site in site-a site-b; do
      if [ -f "$WORK/$site/tandemd.log" ]; then tail -8 "$WORK/$site/tandemd.log" | sed "s/^/    $site: /" >&2; fi
    done
  fi
  for site in site-a site-b; do detach "$site" 2>/dev/null; done
  for site in site-a site-b; do
    if [ -n "${DPID[$site]:-}" ]; then stop_pid "${DPID[$site]}"; fi
  done
  rm -rf --one-file-system "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "${TANDEM_DEMO_BIN:-}" ]; then
  # The test suite runs the demo on the binaries it built (tests/CMakeLists.txt: demo).
  TANDEMD=$TANDEM_DEMO_BIN/tandemd
  TANDEMCTL=$TANDEM_DEMO_BIN/tandemctl
else
  say "Installing the Debian packages tandem needs (only what is missing)"
  scripts/install-deps.sh

  say "Building tandemd (the daemon) and tandemctl (its command line), release build"
  if ! { cmake --preset release && cmake --build --preset release -j "$(nproc)" --target tandemd tandemctl; } \
      > "$WORK/build.log" 2>&1; then
    tail -30 "$WORK/build.log" >&2
    die "the build failed (above: the end of its output)"
  fi
  TANDEMD=$ROOT/build/release/daemon/tandemd
  TANDEMCTL=$ROOT/build/release/daemon/tandemctl
fi
info "using $($TANDEMD --version) and tandemctl from ${TANDEMD%/tandemd}"

# wait_until SECONDS WHAT COMMAND...: runs COMMAND every 0.1 s until it succeeds, or gives up.
wait_until() {
  local secs=$1 what=$2 deadline=$((SECONDS + $1))
  shift 2
  while ((SECONDS < deadline)); do
    "$@" && return 0
    sleep 0.1
  done
  die "timed out after ${secs}s waiting for $what"
}

# ctl SITE ARGS...: tandemctl on SITE's API socket, printing the command line as one types it.
# Its output is indented like the rest, except a --wait on a terminal: there tandemctl draws a
# progress bar, which needs the terminal.
ctl() {
  local site=$1
  shift
  printf '    \033[2m$ tandemctl --socket %s/api.sock %s\033[0m\n' "$site" "$*"
  if [ -t 1 ] && [[ " $* " == *" --wait "* || " $* " == *" wait "* ]]; then
    "$TANDEMCTL" --socket "$WORK/$site/api.sock" --timeout "$SYNC_S" "$@"
  else
    "$TANDEMCTL" --socket "$WORK/$site/api.sock" --timeout "$SYNC_S" "$@" 2>&1 | sed 's/^/    /'
    return "${PIPESTATUS[0]}"
  fi
}
# field SITE KEY: one field of the session, as SITE sees it.
field() {
  "$TANDEMCTL" --socket "$WORK/$1/api.sock" --json session show "$SID" 2>/dev/null |
    /usr/bin/python3 -c 'import json, sys; v = json.load(sys.stdin).get(sys.argv[1]); print("" if v is None else v)' "$2"
}
session_is() {  # session_is SITE ROLE STATE
  [ "$(field "$1" role)" = "$2" ] && [ "$(field "$1" state)" = "$3" ]
}
# sync_wait SITE: start a cycle on SITE and follow it until it has committed.
sync_wait() { ctl "$1" session sync "$SID" --wait; }
# said SITE PATTERN: the last line of SITE's log that matches, without its time and level.
said() {
  { grep -E "$2" "$WORK/$1/tandemd.log" || true; } | tail -1 |
    sed -E 's/^[^ ]+ \[[a-z]+\] (session [^ ]+: )?//; s/^/    '"$1"' log: /'
}
# shipped SITE: what the last cycle shipped, from SITE's log.
shipped() {
  { grep -E 'cycle [0-9]+ committed: [0-9]+ blocks in [0-9]+ ms' "$WORK/$1/tandemd.log" || true; } | tail -1 |
    sed -E 's/.*cycle ([0-9]+) committed: ([0-9]+) blocks in ([0-9]+) ms.*/\1 \2 \3/' | {
    read -r cycle blocks ms || return 0
    info "$1 log: cycle $cycle shipped $blocks blocks of 4 KiB ($((blocks * 4096 / 1048576)) MiB) in $ms ms"
  }
}
free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

say "Making a throwaway certificate authority, and a certificate for each site"
info "The two sites trust each other through mutual TLS: each presents a certificate signed by a"
info "CA both know, and each checks that the other's certificate carries the peer's name."
CERTS=$WORK/certs
mkdir -p "$CERTS"
(
  cd "$CERTS"
  umask 077
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
  openssl req -x509 -new -key ca.key -subj "/CN=tandem demo CA" -days 1 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
  for site in site-a site-b; do
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$site.key" 2>/dev/null
    openssl req -new -key "$site.key" -subj "/CN=$site" -out "$site.csr"
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=DNS:$site" > "$site.ext"
    openssl x509 -req -in "$site.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -sha256 \
      -extfile "$site.ext" -out "$site.crt" 2>/dev/null
    rm -f "$site.csr" "$site.ext"
  done
  rm -f ca.srl ca.key
  chmod 600 ./*.key
  chmod 644 ./*.crt
)
for site in site-a site-b; do
  openssl verify -CAfile "$CERTS/ca.crt" "$CERTS/$site.crt" >/dev/null || die "$site.crt does not verify"
  info "$site.crt: for the name $site, signed by the demo CA; $site.key: $(stat -c %A "$CERTS/$site.key") (root only)"
done
info "The CA's own key is deleted right away: nothing else can be signed with it."

PORT_A=$(free_port)
PORT_B=$(free_port)
while [ "$PORT_B" = "$PORT_A" ]; do PORT_B=$(free_port); done
declare -A PORT=([site-a]=$PORT_A [site-b]=$PORT_B)
declare -A PEER=([site-a]=site-b [site-b]=site-a)
declare -A ROLE=([site-a]=source [site-b]=destination)
for site in site-a site-b; do
  peer=${PEER[$site]}
  mkdir -p "$WORK/$site/fuse" "$WORK/$site/fs"
  cat > "$WORK/$site/tandemd.toml" <<TOML
[node]
name = "$site"
state_dir = "$WORK/$site/state"
api_socket = "$WORK/$site/api.sock"

[[volume]]
id = "vol0"
path = "$WORK/$site/vol0.img"     # a file stands in for /dev/nvme0n1
size = "1GiB"
nbd_socket = "$WORK/$site/vol0.nbd"

[tls]
ca = "$CERTS/ca.crt"
cert = "$CERTS/$site.crt"
key = "$CERTS/$site.key"

[peer]
name = "$peer"
address = "127.0.0.1:${PORT[$peer]}"  # where $peer listens
listen = "127.0.0.1:${PORT[$site]}"   # where this site listens for $peer
rate_limit = "40MiB"          # like a WAN link (and slow enough to watch)

[[session]]
id = "$SID"
volumes = ["vol0"]
remote_volumes = ["vol0"]
role = "${ROLE[$site]}"
rpo_seconds = 3600   # a cycle every 30 minutes: in this demo, syncs happen when we ask
TOML
  "$TANDEMD" --check-config -c "$WORK/$site/tandemd.toml" >/dev/null || die "tandemd refused $site's configuration"
done

say "Starting site-a: it owns the volume (the source). Its copy, site-b, comes later."
info "Each tandemd has its own 1 GiB volume file, state directory, NBD socket (where hosts read"
info "and write the volume) and API socket (where tandemctl talks to it). site-a listens on port"
info "$PORT_A, site-b on $PORT_B. site-a's configuration, paths relative to $WORK"
info "(site-b's mirrors it):"
grep -v '^$' "$WORK/site-a/tandemd.toml" | sed "s|$WORK/||g; s/^/    | /"
# start SITE: tandemd for SITE, in its own process group (setsid), so that a Ctrl-C reaches
# only this script, which then stops everything in order (filesystems first, daemons last).
start() {
  setsid "$TANDEMD" -c "$WORK/$1/tandemd.toml" > "$WORK/$1/tandemd.log" 2>&1 &
  DPID[$1]=$!
  wait_until "$WAIT_S" "tandemd $1 to start" up "$1"
  info "$1: tandemd is running (PID ${DPID[$1]})"
}
up() {
  kill -0 "${DPID[$1]}" 2>/dev/null || die "tandemd $1 exited during start (its log is below)"
  [ -S "$WORK/$1/vol0.nbd" ] && [ -S "$WORK/$1/api.sock" ]
}
start site-a
info "Its peer is not there yet: site-a serves its volume anyway and remembers every block"
info "written, for later."
ctl site-a session list

# attach SITE [ro]: SITE's NBD export -> a file (nbdfuse) -> a block device (losetup): LOOP.
attach() {
  local site=$1 ro=${2:-}
  setsid nbdfuse ${ro:+-r} -P "$WORK/$site/nbdfuse.pid" "$WORK/$site/fuse/disk" \
    "nbd+unix:///vol0?socket=$WORK/$site/vol0.nbd" &
  FUSE_PID[$site]=$!
  wait_until "$WAIT_S" "nbdfuse on $site" test -s "$WORK/$site/nbdfuse.pid"
  LOOP=$(losetup --find --show --direct-io=on ${ro:+--read-only} "$WORK/$site/fuse/disk")
}
# manifest DIR: the sha256 of every file under DIR.
manifest() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }
# write_files DIR: a copy of tandem's sources and docs, and a file of random bytes.
write_files() {
  mkdir -p "$1"
  cp -r "$ROOT/engine" "$ROOT/docs" "$1/"
  head -c 64M /dev/urandom > "$1/random.bin"
  sync -f "$1"  # until then, some of it is only in the page cache, not on the volume
  info "wrote $(find "$1" -type f | wc -l) files ($(du -sh "$1" | cut -f1)) to ${1#"$WORK/site-a/fs"}"
}

say "Putting an ext4 filesystem with some files on site-a's volume"
info "A host uses a tandem volume like any disk: nbdfuse turns site-a's NBD export into a file,"
info "losetup turns that file into a block device, and that gets a filesystem."
attach site-a
info "site-a's vol0 is the block device $LOOP"
mkfs.ext4 -q -F -E nodiscard -L tandem-demo "$LOOP"
mount "$LOOP" "$WORK/site-a/fs"
write_files "$WORK/site-a/fs/first"

say "Starting site-b, the copy: the initial sync"
start site-b
info "The sites connect and check each other's certificates. site-b's volume is blank, so"
info "site-a ships everything it holds (blocks never written are sent as \"zero\", not as"
info "data). site-b is not a usable copy until this initial sync and the first cycle after it"
info "are committed: until then it says Initializing."
ctl site-a session wait "$SID"
wait_until "$WAIT_S" "the session to be OK on site-b" session_is site-b Destination OK
said site-a 'initial sync complete'
ctl site-b session list

say "More files on site-a, and a sync: only the new blocks travel"
info "site-a records every block written since the last sync; a sync ships exactly those"
info "blocks. When it ends, site-b holds site-a's volume as it was when the sync began."
write_files "$WORK/site-a/fs/second"
sync_wait site-a
shipped site-a
info "The session as each site sees it (LAG: written on the source, not yet on the destination):"
ctl site-a session list
ctl site-b session list

say "A planned failover: site-b takes over"
echo "written on site-a just before the failover, $(date -u)" > "$WORK/site-a/fs/last-words.txt"
info "One more file on site-a, last-words.txt, not synced: the failover will ship it."
manifest "$WORK/site-a/fs" > "$WORK/manifest"
info "Recorded the sha256 of all $(wc -l < "$WORK/manifest") files on site-a."
info "First, as an operator would, stop using the volume on site-a: unmount the filesystem"
info "(that writes out what is still in the page cache) and detach the disk."
detach site-a
info "Then ask site-a, the source, for a planned failover. It makes its volume read-only,"
info "ships the last changes, then the roles swap: site-b becomes the source (writable) and"
info "site-a its destination. Nothing written on site-a is lost."
ctl site-a session failover "$SID" --wait
wait_until "$WAIT_S" "site-b to be the source" session_is site-b Source Failed_Over
said site-a 'planned failover complete'
ctl site-a session list
ctl site-b session list

say "Reading the files on site-b"
info "Mounting site-b's copy read-only (nbdfuse -r, losetup -r, mount -o ro,noload): we only look."
attach site-b ro
mount -o ro,noload "$LOOP" "$WORK/site-b/fs"
info "site-b's vol0 is $LOOP:"
ls -l "$WORK/site-b/fs" | sed 's/^/    | /'
info "last-words.txt on site-b: \"$(cat "$WORK/site-b/fs/last-words.txt")\""
(cd "$WORK/site-b/fs" && sha256sum --quiet --strict -c "$WORK/manifest") || die "site-b's files differ from site-a's"
info "All $(wc -l < "$WORK/manifest") files on site-b match the checksums taken on site-a."
detach site-b

say "Failback: site-a becomes the source again"
info "After a failover both sites wait in Failed_Over: nothing replicates until the operator"
info "says so. Reprotect, on the new source (site-b), starts replicating in the new direction,"
info "site-b -> site-a, shipping only the blocks that changed on either side since the failover."
ctl site-b session reprotect "$SID" --wait
said site-b 'reprotect: .* to ship'
info "Then a planned failover back, asked of site-b (the source now). With --reverse it goes"
info "on into reprotect by itself and ends with site-a the source, replicating to site-b again."
ctl site-b session failover "$SID" --reverse --wait
wait_until "$WAIT_S" "site-a to be the source, OK" session_is site-a Source OK
wait_until "$WAIT_S" "site-b to be the destination, OK" session_is site-b Destination OK
ctl site-a session list
ctl site-b session list

say "site-a after the round trip: the same files, and writable again"
attach site-a
mount "$LOOP" "$WORK/site-a/fs"
(cd "$WORK/site-a/fs" && sha256sum --quiet --strict -c "$WORK/manifest") || die "site-a's files changed on the way"
info "All $(wc -l < "$WORK/manifest") files on site-a still match their checksums."
echo "written on site-a after the failback, $(date -u)" > "$WORK/site-a/fs/back-home.txt"
sync -f "$WORK/site-a/fs"
info "Wrote back-home.txt: site-a takes writes again, and a sync takes them to site-b."
sync_wait site-a
detach site-a

say "Stopping both daemons (SIGTERM: they finish what is in flight and exit cleanly)"
for site in site-a site-b; do
  stop_pid "${DPID[$site]}"
  DPID[$site]=""
  [ "$STOP_RC" -eq 0 ] || die "tandemd $site exited with status $STOP_RC"
  info "$site: tandemd stopped (exit status 0)"
done

say "Done: everything the demo started is stopped, and its files (in $WORK) are removed."
