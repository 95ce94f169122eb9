#!/usr/bin/env bash
# Installs the Debian 12 packages tandem needs to build, test and demo. Idempotent: when every
# package is already installed it does nothing (no apt-get update, no network).
set -euo pipefail

PACKAGES=(
  # build
  g++ cmake ninja-build pkg-config ccache git
  libboost1.81-dev liburing-dev libssl-dev libxxhash-dev libspdlog-dev libfmt-dev
  libtomlplusplus-dev libcli11-dev nlohmann-json3-dev libsystemd-dev libgtest-dev libnbd-dev clang-format
  # real clients and tools used by the tests, the demo and the benchmarks
  libnbd-bin python3-libnbd nbdkit fuse3 qemu-utils fio xxhash openssl curl
  e2fsprogs util-linux mount procps iproute2 rsync
  # packaging and the service checks (cpack's dpkg-shlibdeps, systemd-analyze, man pages)
  dpkg-dev systemd groff-base
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]}; run as root to install them" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
