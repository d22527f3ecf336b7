#!/usr/bin/env bash
# Fetches llama.cpp's tokenizer test vocabularies (models/ggml-vocab-NAME.gguf with their
# .gguf.inp/.gguf.out test vectors) from the llama-cpp-python 0.3.36 source distribution on PyPI,
# which vendors llama.cpp. The sdist (77 MB) is downloaded once into the cache, its SHA-256
# checked, and only the vocabulary files are extracted, into
# ${XDG_CACHE_HOME:-~/.cache}/tollgate/llama-vocabs/ (override: TOLLGATE_VOCAB_DIR). Prints that
# directory. Its chat templates (models/templates/*.jinja, the families' published templates) go
# to .../tollgate/llama-templates/ (override: TOLLGATE_TEMPLATE_DIR). Does nothing when the files
# are already there.
set -euo pipefail

VERSION="0.3.36"
SDIST="llama_cpp_python-$VERSION.tar.gz"
SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/tollgate"
DEST="${TOLLGATE_VOCAB_DIR:-$CACHE/llama-vocabs}"
TEMPLATES="${TOLLGATE_TEMPLATE_DIR:-$CACHE/llama-templates}"
STAMP="$DEST/.from-$SDIST"

if [[ -f "$STAMP" && -f "$TEMPLATES/.from-$SDIST" ]]; then
    echo "$DEST"
    exit 0
fi

mkdir -p "$CACHE" "$DEST" "$TEMPLATES"
check() { echo "$SHA256  $1" | sha256sum --check --status; }
if [[ ! -f "$CACHE/$SDIST" ]] || ! check "$CACHE/$SDIST"; then
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    PIP="${PIP:-python3 -m pip}"
    echo "downloading llama-cpp-python==$VERSION (sdist) from PyPI ..." >&2
    # --no-binary for this package only: its build dependencies come as wheels (pip prepares
    # the sdist's metadata; nothing is compiled).
    $PIP download --quiet --no-deps --disable-pip-version-check \
        --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$TMP" >&2
    if ! check "$TMP/$SDIST"; then
        echo "SHA-256 mismatch for $SDIST (expected $SHA256)" >&2
        exit 1
    fi
    mv "$TMP/$SDIST" "$CACHE/$SDIST"
fi
tar -xzf "$CACHE/$SDIST" -C "$DEST" --strip-components=4 --wildcards \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-*"
tar -xzf "$CACHE/$SDIST" -C "$TEMPLATES" --strip-components=5 --wildcards \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/models/templates/*.jinja"
touch "$STAMP" "$TEMPLATES/.from-$SDIST"
echo "$DEST"
