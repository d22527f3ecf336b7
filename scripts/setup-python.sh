#!/usr/bin/env bash
# Creates .venv with the Python packages the tests use (the official OpenAI SDK, pytest).
# Idempotent: a venv that already has them is left as is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TOLLGATE_VENV:-$ROOT/.venv}"
REQ="$ROOT/tests/python/requirements.txt"
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
STAMP="$VENV/.requirements.sha256"
if [[ -f "$STAMP" ]] && sha256sum --check --status "$STAMP" 2>/dev/null; then
    exit 0
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
sha256sum "$REQ" > "$STAMP"
echo "python test environment ready: $VENV"
