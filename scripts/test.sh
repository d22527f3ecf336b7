#!/usr/bin/env bash
# The whole test suite, from a fresh clone: fetches the model, sets up the Python test
# environment, checks formatting and lints, builds, runs the Rust tests (unit, real-model,
# HTTP with async-openai), the ledger store on a real PostgreSQL, and the Python OpenAI SDK
# tests (API, billing, PostgreSQL outage) against the real server.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n==> %s\n' "$*"; }

step "fetch the development model"
scripts/fetch-model.sh
step "fetch llama.cpp's tokenizer test vocabularies"
scripts/fetch-vocabs.sh
step "python test environment"
scripts/setup-python.sh
step "cargo fmt --check"
cargo fmt --all -- --check
step "the book (docs/): build it, check its links and README.md's"
scripts/book.sh
step "cargo clippy"
cargo clippy --release --workspace --all-targets -- -D warnings
step "cargo clippy: no function over 80 lines outside tests (clippy.toml)"
cargo clippy --release --workspace -- -D warnings -D clippy::too_many_lines
step "cargo build"
cargo build --release --workspace --bins
step "cargo test"
cargo test --release --workspace
step "benchmark smoke run: the overhead bench, a few seconds, no assertion on speed"
# Keeps the benchmark from rotting: it must run, and its ledger check (one record per request
# the gateway answered) must hold.
cargo run --release -q -p tollgate-bench --bin overhead -- --rates 50 --duration 1 --warmup 0 --no-search >/dev/null
# The same with held connections: a few idle keep-alive connections and slow streams, which must
# all survive the run (each idle one answers a second request, each stream ends with [DONE]).
cargo run --release -q -p tollgate-bench --bin overhead -- --rates 50 --duration 1 --warmup 0 --no-search \
    --idle-connections 20 --slow-streams 5 >/dev/null

# The kernel unit tests run every SIMD path this CPU has against the portable loops whatever
# is selected; the model-level checks above ran the widest path. Run them again on each
# narrower path this CPU can force (TOLLGATE_CPU_KERNELS), so every path is exercised end to end
# wherever the CPU allows it: on an AVX-512 machine avx2 and scalar, on an AVX2 one scalar.
cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
has() { for f in "$@"; do [[ " $cpu_flags " == *" $f "* ]] || return 1; done; }
narrower=(scalar)
if has avx512f avx512bw avx512vl avx512_vnni avx2 fma; then
    narrower=(avx2 scalar)
fi
for kernels in "${narrower[@]}"; do
    step "cargo test: the model checks on the $kernels kernels (TOLLGATE_CPU_KERNELS=$kernels)"
    TOLLGATE_CPU_KERNELS="$kernels" cargo test --release -p tollgate-runtime --test equivalence --test batching --test engine
done
step "PostgreSQL for the ledger tests (Debian's server, throwaway cluster)"
PG_URL="$(scripts/postgres.sh reset)"
trap 'scripts/postgres.sh stop >/dev/null 2>&1 || true' EXIT
step "cargo test: ledger store on PostgreSQL"
TOLLGATE_TEST_POSTGRES_URL="$PG_URL" cargo test --release -p tollgate-metering --features postgres-tests --test store_postgres --test migrations
TOLLGATE_TEST_POSTGRES_URL="$PG_URL" cargo test --release -p tollgate-gateway --features postgres-tests --test store_postgres
step "headless Chromium for the console's browser test (Debian's packages)"
scripts/chromium.sh >/dev/null
step "python SDK, chat template and console tests"
cargo build --release -p tollgate-runtime --example render_chat_template
TOLLGATE_RENDER_BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/render_chat_template" \
TOLLGATE_REQUIRE_ALL=1 TOLLGATE_TEST_POSTGRES=1 TOLLGATE_BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/tollgate" \
    "${TOLLGATE_VENV:-$ROOT/.venv}/bin/python" -m pytest tests/python -q -p no:cacheprovider \
        -W error::pytest.PytestUnhandledThreadExceptionWarning
step "benchmark smoke run on PostgreSQL: one gateway, then two sharing the ledger and limits"
PG_URL="$(scripts/postgres.sh reset)"
cargo run --release -q -p tollgate-bench --bin overhead -- --rates 50 --duration 1 --warmup 0 --no-search \
    --postgres "$PG_URL" --replicas 2 >/dev/null
