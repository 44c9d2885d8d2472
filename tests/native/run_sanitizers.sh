#!/usr/bin/env bash
# Build tests/native/stress.cc with the native core under ThreadSanitizer and, separately,
# AddressSanitizer + LeakSanitizer + UBSan, run both, exit non-zero on any report. With
# frontend_calls > 0 (and grpc++ installed), do the same for the native front end
# (tests/native/frontend_stress.cc; grpc's own internals are suppressed under TSan,
# tsan_grpc.supp says why). It is off by default: its two builds add a minute or two, and the
# unit test that runs this script has a 600 s budget.
#
#   tests/native/run_sanitizers.sh [publishes=1000000] [batcher_requests=20000] [frontend_calls=0]
#   tests/native/run_sanitizers.sh 1000000 20000 2000     # the core and the front end
#
# Needs g++ with libtsan/libasan/libubsan (Debian: gcc 12 ships them as libtsan2, libasan8,
# libubsan1, pulled in by g++-12).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PUBLISHES="${1:-1000000}"
REQUESTS="${2:-20000}"
CALLS="${3:-0}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
SRCS=("$ROOT/csrc/core/snapshot.cc" "$ROOT/csrc/core/router.cc" "$ROOT/csrc/core/batcher.cc" "$ROOT/tests/native/stress.cc")
COMMON=(-std=c++17 -O1 -g -fno-omit-frame-pointer -Wall -Wextra -Werror -I"$ROOT/csrc/core" -pthread)

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

if [ "$CALLS" -gt 0 ] && pkg-config --exists grpc++; then
  read -r -a GRPCPP <<<"$(pkg-config --cflags --libs grpc++)"
  FE=("$ROOT/csrc/frontend/frontend.cc" "$ROOT/tests/native/frontend_stress.cc")
  FE_COMMON=(-std=c++17 -O1 -g -fno-omit-frame-pointer -Wall -Wextra -Werror -I"$ROOT/csrc/frontend" -pthread)
  echo "== front end: build (tsan, asan) in parallel"
  g++ "${FE_COMMON[@]}" -fsanitize=thread "${FE[@]}" "${GRPCPP[@]}" -o "$OUT/fe_tsan" &
  tsan_build=$!
  g++ "${FE_COMMON[@]}" -fsanitize=address,undefined -fno-sanitize-recover=undefined "${FE[@]}" "${GRPCPP[@]}" \
    -o "$OUT/fe_asan" &
  asan_build=$!
  wait "$tsan_build"
  wait "$asan_build"
  echo "== front end: ThreadSanitizer"
  TSAN_OPTIONS="halt_on_error=1:exitcode=66:second_deadlock_stack=1:suppressions=$ROOT/tests/native/tsan_grpc.supp" \
    "$OUT/fe_tsan" "$CALLS"
  echo "== front end: AddressSanitizer + LeakSanitizer + UBSan"
  ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:exitcode=67" UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
    "$OUT/fe_asan" "$CALLS"
else
  echo "== front end: skipped ($([ "$CALLS" -gt 0 ] && echo "grpc++ not installed" || echo "pass frontend_calls, e.g. 2000"))"
fi
echo "== sanitizers clean"
