#!/usr/bin/env bash
# The browser test of the `oxtune deploy` chat page: headless Chromium, driven by Selenium,
# against the real binary serving the demo model (tests/browser/test_chat_page.py).
#
#   scripts/browser-test.sh              # extra arguments go to pytest, e.g. -k stop -x
#
# On a fresh Debian machine it installs what is missing, quietly and only once:
#   chromium, chromium-driver     apt-get (as root, or through sudo when it exists)
#   selenium, pytest              a venv in ~/.cache/oxtune-browser-venv (pins in
#                                 tests/browser/requirements.txt)
#   the demo model                scripts/fetch-demo-model.sh (kept when already there)
# then builds the debug binary (cargo build -p oxtune) and runs pytest.
#
# Environment:
#   OXTUNE_BROWSER_VENV   the venv (default: ~/.cache/oxtune-browser-venv)
#   PYTHON                the Python that creates the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${OXTUNE_BROWSER_VENV:-$HOME/.cache/oxtune-browser-venv}"
PYTHON="${PYTHON:-python3}"
REQUIREMENTS="tests/browser/requirements.txt"

# 1. Chromium and its driver, from Debian.
if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null; then
        as_root=(sudo)
    else
        echo "error: chromium and chromedriver are missing and this user cannot install them" >&2
        echo "hint: as root, run: apt-get install -y chromium chromium-driver" >&2
        exit 1
    fi
    echo "installing chromium and chromium-driver (apt-get)" >&2
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# 2. selenium and pytest in a venv; reinstalled only when the requirements change.
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if ! cmp -s "$REQUIREMENTS" "$VENV/.oxtune-requirements.txt"; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
    cp "$REQUIREMENTS" "$VENV/.oxtune-requirements.txt"
fi

# 3. The binary and the demo model.
cargo build --quiet -p oxtune
target_dir="${CARGO_TARGET_DIR:-target}"
export OXTUNE_BIN
OXTUNE_BIN="$(cd "$target_dir" && pwd)/debug/oxtune"
scripts/fetch-demo-model.sh >/dev/null

# 4. The test.
exec "$VENV/bin/python" -m pytest tests/browser -q "$@"
