#!/usr/bin/env bash
# On an H100/H200 machine with the CUDA 13 libraries: the transformers parity test on the
# GPU (f32 and bf16) and the first decode-speed measurements. Expects the binaries of
# scripts/build-cuda.sh in .gpu/ and the demo model in models/. Results go to $OUT (or
# ./gpu-results).
#
#   scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

export OXTUNE_FIXTURES=$PWD/tests/fixtures RUST_BACKTRACE=1
echo "== parity on cuda, float32"
OXTUNE_TEST_DEVICE=cuda .gpu/parity --test-threads 1 2>&1 | tee "$out/parity-f32.txt"
echo "== parity on cuda, bfloat16"
OXTUNE_TEST_DEVICE=cuda OXTUNE_TEST_DTYPE=bfloat16 .gpu/parity --test-threads 1 2>&1 | tee "$out/parity-bf16.txt"

bench() {
    local name=$1; shift
    echo "== bench infer: $name"
    timeout 300 .gpu/oxtune bench infer --device cuda "$@" --output_json "$out/bench-$name.json" 2>&1 | tee -a "$out/bench.txt"
}
if [ -f models/SmolLM2-135M-Instruct/config.json ]; then
    echo "== demo model answers on cuda"
    for dtype in bfloat16 float32; do
        echo "What is the capital of France?" | .gpu/oxtune infer --model models/SmolLM2-135M-Instruct --device cuda \
            --torch_dtype $dtype --max_new_tokens 40 2>/dev/null | tee -a "$out/demo-answer.txt"
    done
    bench smollm2-135m --model models/SmolLM2-135M-Instruct --prompt_tokens 512 --max_new_tokens 256 --batch_sizes 1,8,32
fi
bench qwen3-0.6b --config tools/bench/configs/qwen3-0.6b.json --prompt_tokens 512 --max_new_tokens 256 --batch_sizes 1,8,32
bench qwen3-8b --config tools/bench/configs/qwen3-8b.json --prompt_tokens 512 --max_new_tokens 128 --repeats 2 --batch_sizes 1,8,32

train() {
    local name=$1; shift
    echo "== bench train: $name"
    timeout 240 .gpu/oxtune bench train --device cuda "$@" --output_json "$out/train-$name.json" 2>&1 | tee -a "$out/train.txt"
}
train qwen3-0.6b-lora-b1 --config tools/bench/configs/qwen3-0.6b.json --train_type lora --lora_rank 64 \
    --per_device_train_batch_size 1 --max_length 2048 --max_steps 8
train qwen3-0.6b-lora-b1-ckpt --config tools/bench/configs/qwen3-0.6b.json --train_type lora --lora_rank 64 \
    --per_device_train_batch_size 1 --max_length 2048 --max_steps 6 --gradient_checkpointing true
train qwen3-0.6b-lora-b4 --config tools/bench/configs/qwen3-0.6b.json --train_type lora --lora_rank 64 \
    --per_device_train_batch_size 4 --max_length 2048 --max_steps 4
train qwen3-0.6b-full-b1 --config tools/bench/configs/qwen3-0.6b.json --train_type full \
    --per_device_train_batch_size 1 --max_length 2048 --max_steps 4
