#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the console's browser test: Debian's `chromium` and
# `chromium-driver` packages, installed with apt-get when absent (as scripts/postgres.sh
# installs PostgreSQL). Prints the driver's path. Needs root to install.
set -euo pipefail
say() { echo "chromium.sh: $*" >&2; }
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    say "installing chromium and chromium-driver"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        chromium chromium-driver >&2; then
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            chromium chromium-driver >&2
    fi
fi
command -v chromedriver
