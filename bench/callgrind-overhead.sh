#!/usr/bin/env bash
# Instructions the gateway executes per request, counted by callgrind: a figure that a shared,
# noisy machine does not move (user-space instructions only: the kernel's work for the
# gateway's system calls is not counted, and neither is time spent waiting).
#
#   bench/callgrind-overhead.sh TOLLGATE_BINARY [RATE] [SECONDS] [-- overhead options...]
#
# Runs the overhead benchmark (target/release/overhead, next to this script's target dir, or
# $OVERHEAD) with the gateway under `valgrind --tool=callgrind`, at RATE requests/s (default
# 30: the gateway runs ~50x slower under valgrind) for SECONDS (default 10) after a 1 s
# warm-up, non-streamed unless `-- --stream` is given. The counters are zeroed when the
# benchmark starts its rates and dumped when the gateway's run has ended, so they cover the
# gateway's warm-up and measured requests (and its idle time during the direct run, a few
# /metrics scrapes and the ledger's writes, as at any rate). Prints one line:
#   instructions_per_request=N requests=R instructions=I binary=PATH
# Note: at low rates each database write carries fewer records than at 1,000/s.
# KEEP=FILE in the environment keeps the callgrind profile of the window.
set -euo pipefail
BIN="$(realpath "$1")"
RATE="${2:-30}"
SECS="${3:-10}"
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OVERHEAD="${OVERHEAD:-${CARGO_TARGET_DIR:-$ROOT/target}/release/overhead}"
WORK="$(mktemp -d /tmp/callgrind-overhead.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/wrap.sh" <<EOF
#!/bin/sh
echo \$\$ > "$WORK/pid"
exec valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" "$BIN" "\$@"
EOF
chmod +x "$WORK/wrap.sh"
"$OVERHEAD" --binary "$WORK/wrap.sh" --rates "$RATE" --duration "$SECS" --warmup 1 \
    --no-search "$@" > "$WORK/out" 2> "$WORK/err" &
BENCH=$!
# Zero when the rates start (after start-up, the key and the check request) ...
until grep -q "^load average before" "$WORK/err" 2>/dev/null; do
    kill -0 "$BENCH" 2>/dev/null || { cat "$WORK/err" >&2; exit 1; }
    sleep 0.2
done
callgrind_control -z "$(cat "$WORK/pid")" > /dev/null 2>&1
# ... dump when the gateway's run is done (its line is printed after both paths ran).
until grep -q "gateway p99" "$WORK/err" 2>/dev/null; do
    kill -0 "$BENCH" 2>/dev/null || { cat "$WORK/err" >&2; exit 1; }
    sleep 0.2
done
callgrind_control -d "$(cat "$WORK/pid")" > /dev/null 2>&1
wait "$BENCH" || { cat "$WORK/err" >&2; exit 1; }
# The dump after zeroing is the last part file.
PART="$(ls -t "$WORK"/callgrind.out* | head -1)"
IR="$(awk '/^(summary|totals):/ {print $2; exit}' "$PART")"
# Requests through the gateway in the window: warm-up and measured run.
REQS="$(awk -v rate="$RATE" -v secs="$SECS" 'BEGIN { printf "%d", rate * (secs + 1) }')"
ERR="$(grep -c "NOT sustained" "$WORK/err" || true)"
# KEEP=FILE keeps the profile (for callgrind_annotate --inclusive=yes FILE).
[ -n "${KEEP:-}" ] && cp "$PART" "$KEEP"
echo "instructions_per_request=$(( IR / REQS )) requests=$REQS instructions=$IR not_sustained_runs=$ERR binary=$BIN"
