#!/usr/bin/env bash
# Plan: what `cmake --install` and the .deb put on a machine. Builds the .deb with CPack from
# this build tree, reads its control fields (dependencies found by dpkg-shlibdeps), unpacks it
# into a scratch root with `dpkg -x`, and checks the layout: binaries that run, the systemd unit
# (verified by systemd-analyze against the unpacked binary), man pages that render, the example
# configuration (valid for the unpacked tandemd), the docs and the maintainer scripts. Then the
# same layout from `cmake --install --prefix`.
# Usage: package_test.sh BUILD_DIR
set -euo pipefail
BUILD=$(cd "$1" && pwd)
TMP=$(mktemp -d /var/tmp/tandem-pkg.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

(cd "$TMP" && cpack -G DEB -B "$TMP/out" --config "$BUILD/CPackConfig.cmake" >"$TMP/cpack.log" 2>&1) ||
  { cat "$TMP/cpack.log"; fail "cpack"; }
DEB=$(ls "$TMP"/out/tandem_*_amd64.deb 2>/dev/null | head -1)
[ -n "$DEB" ] || fail "no tandem_*_amd64.deb in $TMP/out: $(ls "$TMP/out")"
echo "built $(basename "$DEB") ($(stat -c %s "$DEB") bytes)"

[ "$(dpkg-deb -f "$DEB" Package)" = tandem ] || fail "Package field"
[ "$(dpkg-deb -f "$DEB" Section)" = admin ] || fail "Section field"
DEPENDS=$(dpkg-deb -f "$DEB" Depends)
echo "Depends: $DEPENDS"
for dep in liburing2 libssl3 libsystemd0 libstdc++6 libc6 procps; do
  grep -qE "(^|, )${dep//+/\\+}( |,|$)" <<<"$DEPENDS" || fail "Depends lacks $dep"
done
grep -q "nbd-client" <<<"$(dpkg-deb -f "$DEB" Recommends)" || fail "Recommends lacks nbd-client"
DESC=$(dpkg-deb -f "$DEB" Description)
grep -q "replicates Linux block devices" <<<"$DESC" || fail "Description: $DESC"
! grep -q ";" <<<"$DESC" || fail "Description has list separators: $DESC"

check_layout() {  # check_layout ROOT: the installed tree under ROOT (prefix /usr)
  local R=$1
  for f in usr/sbin/tandemd usr/bin/tandemctl; do
    [ -x "$R/$f" ] || fail "$f missing or not executable"
  done
  for f in usr/lib/systemd/system/tandemd.service usr/share/man/man8/tandemd.8 usr/share/man/man8/tandemctl.8 \
           usr/share/man/man5/tandemd.toml.5 usr/share/doc/tandem/examples/tandemd.toml \
           usr/share/doc/tandem/README.md usr/share/doc/tandem/operations.md usr/share/doc/tandem/configuration.md \
           usr/share/doc/tandem/api.md; do
    [ -f "$R/$f" ] || fail "$f missing"
  done
  # Nothing but the product: no test binaries, headers or static libraries.
  local extra
  extra=$(cd "$R" && find . -type f | grep -vE '^\./usr/(sbin/tandemd|bin/tandemctl|lib/systemd/system/tandemd\.service|share/man/man[58]/|share/doc/tandem/)' || true)
  [ -z "$extra" ] || fail "unexpected files installed: $extra"
  "$R/usr/sbin/tandemd" --version | grep -qx "tandemd 0.1.0" || fail "tandemd --version"
  if [ "$R" = "$TMP/root" ]; then  # the package's binaries are stripped (debug info stays in the build)
    ! readelf -S "$R/usr/sbin/tandemd" | grep -q "\.debug_info" || fail "tandemd in the .deb is not stripped"
  fi
  "$R/usr/bin/tandemctl" --help | grep -q "session" || fail "tandemctl --help"
  "$R/usr/sbin/tandemd" --check-config -c "$R/usr/share/doc/tandem/examples/tandemd.toml" >/dev/null ||
    fail "the example configuration does not pass --check-config"
  "$R/usr/sbin/tandemd" --systemd-dropin -c "$R/usr/share/doc/tandem/examples/tandemd.toml" |
    grep -qx "DeviceAllow=/dev/nvme0n1 rw" || fail "--systemd-dropin lacks the example's device"
  # The unit, pointed at the unpacked binary (systemd-analyze checks ExecStart= exists).
  sed "s|/usr/sbin/tandemd|$R/usr/sbin/tandemd|g" "$R/usr/lib/systemd/system/tandemd.service" >"$TMP/tandemd.service"
  (cd "$TMP" && systemd-analyze verify --man=no "$TMP/tandemd.service") || fail "systemd-analyze verify"
  # What the unit must say (issue: service): notify, watchdog, its directories, the sandbox.
  for line in "Type=notify" "WatchdogSec=30s" "ExecReload=/bin/kill -HUP \$MAINPID" "StateDirectory=tandem" \
              "RuntimeDirectory=tandem" "ProtectSystem=strict" "ProtectHome=yes" "PrivateTmp=yes" \
              "NoNewPrivileges=yes" "DevicePolicy=closed" "DeviceAllow=block-blkext rw" \
              "CapabilityBoundingSet=CAP_CHOWN CAP_IPC_LOCK" "LimitMEMLOCK=infinity" "RestartPreventExitStatus=2"; do
    grep -qxF "$line" "$R/usr/lib/systemd/system/tandemd.service" || fail "unit lacks: $line"
  done
  for m in man8/tandemd.8 man8/tandemctl.8 man5/tandemd.toml.5; do
    local out
    out=$(groff -man -Tutf8 "$R/usr/share/man/$m" 2>&1 >/dev/null | grep -v "cannot adjust line" || true)
    [ -z "$out" ] || fail "$m: $out"
  done
}

dpkg -x "$DEB" "$TMP/root"
check_layout "$TMP/root"
dpkg-deb -e "$DEB" "$TMP/control"
for s in postinst prerm postrm; do
  [ -x "$TMP/control/$s" ] || fail "maintainer script $s missing"
  sh -n "$TMP/control/$s" || fail "$s: syntax"
done
echo "deb layout OK"

DESTDIR="$TMP/inst" cmake --install "$BUILD" --prefix /usr >/dev/null
check_layout "$TMP/inst"
echo "cmake --install layout OK"

# The unit in the source tree, and how exposed it is (systemd's own score; 10 = not sandboxed).
sed "s|/usr/sbin/tandemd|$TMP/root/usr/sbin/tandemd|g" "$(dirname "$0")/../systemd/tandemd.service" >"$TMP/src.service"
(cd "$TMP" && systemd-analyze verify --man=no "$TMP/src.service") || fail "systemd-analyze verify (source unit)"
SCORE=$(cd "$TMP" && systemd-analyze security --offline=yes "$TMP/src.service" 2>/dev/null |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
echo "systemd-analyze security: exposure $SCORE"
awk -v s="$SCORE" 'BEGIN { exit !(s != "" && s + 0 <= 4.0) }' || fail "unit exposure $SCORE above 4.0"
echo "PASS"
