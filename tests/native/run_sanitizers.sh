#!/usr/bin/env bash
# Build tests/native/stress.cc with the native core under ThreadSanitizer and, separately,
# AddressSanitizer + LeakSanitizer + UBSan, run both, exit non-zero on any report.
#
#   tests/native/run_sanitizers.sh [publishes=1000000] [batcher_requests=20000]
#
# Needs g++ with libtsan/libasan/libubsan (Debian: gcc 12 ships them as libtsan2, libasan8,
# libubsan1, pulled in by g++-12).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PUBLISHES="${1:-1000000}"
REQUESTS="${2:-20000}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
SRCS=("$ROOT/csrc/snapshot.cc" "$ROOT/csrc/router.cc" "$ROOT/csrc/batcher.cc" "$ROOT/tests/native/stress.cc")
COMMON=(-std=c++17 -O1 -g -fno-omit-frame-pointer -Wall -Wextra -Werror -I"$ROOT/csrc" -pthread)

echo "== build (tsan, asan) in parallel"
g++ "${COMMON[@]}" -fsanitize=thread "${SRCS[@]}" -o "$OUT/stress_tsan" &
tsan_build=$!
g++ "${COMMON[@]}" -fsanitize=address,undefined -fno-sanitize-recover=undefined "${SRCS[@]}" -o "$OUT/stress_asan" &
asan_build=$!
wait "$tsan_build"
wait "$asan_build"

echo "== ThreadSanitizer"
TSAN_OPTIONS="halt_on_error=1:exitcode=66:second_deadlock_stack=1" "$OUT/stress_tsan" "$PUBLISHES" "$REQUESTS"
echo "== AddressSanitizer + LeakSanitizer + UBSan"
ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:exitcode=67:strict_init_order=1" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" "$OUT/stress_asan" "$PUBLISHES" "$REQUESTS"
echo "== sanitizers clean"
