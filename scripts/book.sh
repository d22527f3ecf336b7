#!/usr/bin/env bash
# Builds the book (docs/, mdBook) into docs/book/ and checks its links: every relative link in
# the built HTML and in README.md must reach an existing file and anchor, or this fails.
#
# mdBook is installed when missing, pinned, from crates.io with `cargo install --locked`, into
# the user's cache (~/.cache/tollgate/mdbook-VERSION/, not system-wide), built in the cargo
# target directory of the environment (.ci/run's is under ~/.cache too) or the cache's. A warm
# cache skips cargo entirely: the build and the check then take about a second.
#
# The link check is docs/check_links.py (standard library only) rather than mdbook-linkcheck:
# its latest release (0.7.7) is built on the mdbook 0.4 library (0.5 split and changed it) and
# on reqwest, an HTTP stack to compile for external links CI cannot reach anyway, and it does
# not read README.md. The checker reads the HTML mdBook wrote, so it sees exactly the anchors
# mdBook generated, and it reads README.md's links as GitHub resolves them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MDBOOK_VERSION=0.5.4
cache="${XDG_CACHE_HOME:-$HOME/.cache}/tollgate"
tools="$cache/mdbook-$MDBOOK_VERSION"
mdbook="$tools/bin/mdbook"
if [[ ! -x "$mdbook" ]]; then
    target="${CARGO_TARGET_DIR:-$cache/target}"
    [[ "$target" = /* ]] || target="$ROOT/$target"
    mkdir -p "$cache"
    # From the cache directory, so the workspace's own cargo settings do not apply.
    (cd "$cache" && CARGO_TARGET_DIR="$target" cargo install mdbook --locked \
        --version "$MDBOOK_VERSION" --no-default-features --features search --root "$tools")
fi
# mdBook only warns about some mistakes (an {{#include}} of a missing file): any warning fails.
log="$("$mdbook" build docs 2>&1)" || { printf '%s\n' "$log"; exit 1; }
printf '%s\n' "$log"
if grep -qE '(WARN|ERROR)' <<<"$log"; then
    echo "mdbook build warned: fix the book" >&2
    exit 1
fi
python3 docs/check_links.py docs/book README.md
