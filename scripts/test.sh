#!/usr/bin/env bash
# The test command: installs what the tests need, builds tandem with AddressSanitizer and
# UndefinedBehaviorSanitizer (warnings as errors), and runs every test but benchmarks and
# torture runs under ctest. Must run as root (loop devices, mounts, FUSE).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# Sanitizer settings: abort on the first error, with a readable report.
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:strict_string_checks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
cmake --preset asan
cmake --build --preset asan -j "$(nproc)"
ctest --preset asan
