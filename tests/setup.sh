#!/usr/bin/env bash
# What the tests need beyond the project's first install (README command 1): the test extra, and a Chromium for the
# browser tests (Debian's package, as root or through sudo). Where Chromium cannot be installed it says so in one line,
# and those two tests fail with the same advice: install Chromium yourself, or point CHROMIUM at one.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet -e ".[test]"

if [ -n "${CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "tests/setup.sh: no Chromium, and neither root nor sudo to install it: the browser tests will fail." \
            "Install Chromium (apt-get install chromium), or set CHROMIUM to a Chromium binary." >&2
        exit 0
    fi
    as_root=(sudo)
    [ -t 0 ] || as_root=(sudo -n)  # no terminal to ask for a password on
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/setup.sh: no Chromium, and no apt-get to install it with: the browser tests will fail. Install" \
        "Chromium, or set CHROMIUM to a Chromium binary." >&2
    exit 0
fi
echo "tests/setup.sh: installing Chromium (Debian's package) for the browser tests..."
if ! { "${as_root[@]}" apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
    echo "tests/setup.sh: Chromium could not be installed (above): the browser tests will fail. Install it" \
        "(apt-get install chromium), or set CHROMIUM to a Chromium binary." >&2
fi
