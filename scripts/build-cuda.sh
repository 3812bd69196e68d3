#!/usr/bin/env bash
# Build `oxtune` with the `cuda` feature on a machine without a GPU or CUDA toolkit, for
# an H100/H200 (sm_90). The result, .gpu/oxtune, links only libc/libm/libgcc_s and loads
# libcuda, cuBLAS and friends at run time (dlopen), so it runs wherever a CUDA 13 driver and
# the CUDA 13 libraries are present (set LD_LIBRARY_PATH to them).
#
#   scripts/build-cuda.sh            # release builds: .gpu/oxtune and the GPU test binaries
#   scripts/build-cuda.sh clippy -p oxtune-tensor --tests -- -D warnings
#                                    # any cargo command, with the same patch and features
#
# Builds run in a copy of the sources (target/cuda-workspace, or $OXTUNE_CUDA_WORKSPACE so that
# several checks can run side by side) and share target/cuda.
#
# Steps: (1) nvcc from PyPI pinned to CUDA 13.0 (the driver can only JIT PTX from a toolkit no
# newer than itself), (2) a copy of candle-core 0.11.1 switched from cudarc's link-time
# `dynamic-linking` to run-time `dynamic-loading` and given scripts/candle-backprop.patch,
# applied with `[patch.crates-io]` on the command line (candle's source is never committed),
# (3) `cargo build --release --features cuda`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

cuda_venv=${OXTUNE_CUDA_VENV:-$HOME/.cache/oxtune-cuda}
if [ ! -x "$cuda_venv/bin/nvcc-installed" ]; then
    python3 -m venv "$cuda_venv"
    "$cuda_venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
    touch "$cuda_venv/bin/nvcc-installed"
    chmod +x "$cuda_venv/bin/nvcc-installed"
fi
CUDA_ROOT=$("$cuda_venv/bin/python" -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13"))')
ln -sf libcudart.so.13 "$CUDA_ROOT/lib/libcudart.so"   # candle-kernels links -lcudart
ln -sfn lib "$CUDA_ROOT/lib64"
export CUDA_ROOT CUDA_HOME=$CUDA_ROOT PATH=$CUDA_ROOT/bin:$PATH
export CUDA_COMPUTE_CAP=90
export RUSTFLAGS="-L native=$CUDA_ROOT/lib"

# candle-core with cudarc's dynamic-loading instead of dynamic-linking, and with
# scripts/candle-backprop.patch: the backward pass stores a gradient's first contribution
# instead of adding it to zeros. The copy is made again whenever the patch changes.
patched=$root/target/patched/candle-core
stamp=$(sha256sum < scripts/candle-backprop.patch | cut -d' ' -f1)
if [ "$(cat "$patched/.oxtune-stamp" 2>/dev/null)" != "$stamp" ]; then
    cargo fetch --quiet
    registry_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-0.11.1 | head -n 1)
    rm -rf "$patched"
    mkdir -p "$(dirname "$patched")"
    cp -r "$registry_src" "$patched"
    sed -i 's/"dynamic-linking",/"dynamic-loading",/' "$patched/Cargo.toml"
    patch --quiet -p1 -d "$patched" < scripts/candle-backprop.patch
    echo "$stamp" > "$patched/.oxtune-stamp"
fi

# Build from a copy of the sources so the patch never touches the checkout's Cargo.lock.
workspace=${OXTUNE_CUDA_WORKSPACE:-$root/target/cuda-workspace}
rm -rf "$workspace"
mkdir -p "$workspace"
cp -r Cargo.toml Cargo.lock crates "$workspace/"
cargo_cuda() {
    local command=$1
    shift
    (cd "$workspace" && cargo "$command" --release --features cuda --target-dir "$root/target/cuda" \
        --config "patch.crates-io.candle-core.path=\"$patched\"" "$@")
}
if [ "$#" -gt 0 ]; then
    cargo_cuda "$@"
    exit
fi
cargo_cuda build -p oxtune
mkdir -p .gpu
cp target/cuda/release/oxtune .gpu/oxtune
# Test binaries, run on the GPU: `test_binary PACKAGE TEST NAME` builds the integration test
# TEST of PACKAGE and copies it to .gpu/NAME.
test_binary() {
    local executable
    executable=$(cargo_cuda test -p "$1" --test "$2" --no-run --message-format=json \
        | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
    cp "$executable" ".gpu/$3"
}
# The transformers parity test, with OXTUNE_TEST_DEVICE=cuda (see its docs).
test_binary oxtune-models parity parity
# Every op on the GPU against the CPU at real checkpoint shapes, and each fused kernel.
test_binary oxtune-tensor cuda_ops cuda-ops
# The fused q/k norm + RoPE + paged KV cache write against its composition, and its timing.
test_binary oxtune-tensor cuda_rope_cache cuda-rope-cache
test_binary oxtune-tensor cuda_gemv cuda-gemv
# The fused LoRA linear op against its composition, and its timing.
test_binary oxtune-tensor cuda_lora cuda-lora
# The embedding lookup's deterministic backward against an f64 sum, and its timing.
test_binary oxtune-tensor cuda_embedding cuda-embedding
# Training through the fused attention and decode replayed from CUDA graphs, on small models.
test_binary oxtune-models gpu_model gpu-model
test_binary oxtune-train gpu_optimizer gpu-optimizer
echo "built .gpu/oxtune, .gpu/parity, .gpu/cuda-ops, .gpu/cuda-rope-cache, .gpu/cuda-gemv, .gpu/cuda-lora, .gpu/cuda-embedding, .gpu/gpu-model and .gpu/gpu-optimizer"
