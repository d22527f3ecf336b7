#!/usr/bin/env bash
# Sets up and starts `tollgate serve` on the default model: fetches the model when absent,
# builds the release binary, and serves models.toml on $TOLLGATE_LISTEN (127.0.0.1:8080).
# Clients authenticate with a key from TOLLGATE_API_KEYS (default: tollgate-dev-key).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/fetch-model.sh
cargo build --release --bin tollgate
export TOLLGATE_API_KEYS="${TOLLGATE_API_KEYS:-tollgate-dev-key}"
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/tollgate"
exec "$BIN" serve --config "${TOLLGATE_CONFIG:-models.toml}" --listen "${TOLLGATE_LISTEN:-127.0.0.1:8080}" "$@"
