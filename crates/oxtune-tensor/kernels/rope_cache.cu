// A serving step's attention inputs after the q/k/v projections, in one launch: per-head
// RMSNorm of q and k (Qwen3's q_norm / k_norm, optional), RoPE of q and k, and k and v
// written to their slots of the paged KV cache pools. Replaces six launches (two norms, two
// rotations, two scatters) and the copies between them. Inference only: no backward.
//
// Shapes (t rows of the step, h query heads, kv key/value heads, d head_dim, half = d / 2):
//   q (t, h * d), k (t, kv * d), v (t, kv * d): each row contiguous, rows q_stride /
//     k_stride / v_stride elements apart (narrows of one fused (t, (h + 2 kv) d) projection,
//     or whole tensors);
//   q_norm, k_norm (d,), or null for no norm; cos, sin (t, half), rows *_stride apart;
//   slots (t,) u32; k_pool, v_pool (num_slots, kv * d) contiguous; q_out (t, h, d) contiguous.
//
// Numerics are the composition's (rms_norm.cu, then rope.cu), rounding where it rounds:
//   n = T(T(x * r) * w), r = 1 / sqrt(mean(x^2) + eps) in f32 over the head's d elements;
//   y[i] = T(a c - b s), y[i + half] = T(b c + a s), a = n[i], b = n[i + half] (x without norm).
// v is copied bit for bit. A slot >= num_slots (u32::MAX included) is skipped: that row's k and
// v are not written (its q is); a kernel cannot report an error, and it must never write
// outside the pools.
//
// Launch: 128-thread blocks of 4 warps; warp w of block b takes item b * 4 + w of the
// t * (h + 2 kv) (row, head) items: heads [0, h) are q's, [h, h + kv) k's, the rest v's.
// Lane l holds the pairs (i, i + half) for i = l, l + 32, ... (d <= 256: up to 4 pairs), so a
// warp's loads and stores are coalesced; the norm's sum of squares is one warp reduction.
// Every branch is uniform over a warp (its item), as the shuffles need.
#include "common.cuh"

constexpr int RC_WARPS = 4;
// Pairs a lane holds: half <= 128 over 32 lanes.
constexpr int RC_MAX_PAIRS = 4;

template <typename T>
__device__ void rope_cache(const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const T* __restrict__ q_norm,
                           const T* __restrict__ k_norm, const T* __restrict__ cos_table,
                           const T* __restrict__ sin_table, const unsigned int* __restrict__ slots,
                           T* __restrict__ k_pool, T* __restrict__ v_pool, T* __restrict__ q_out,
                           unsigned long long q_stride, unsigned long long k_stride,
                           unsigned long long v_stride, unsigned long long cos_stride,
                           unsigned long long sin_stride, int t, int h, int kv, int d, float eps,
                           unsigned long long num_slots) {
    typedef unsigned long long u64;
    const int lane = threadIdx.x & 31;
    const int heads = h + 2 * kv;
    const u64 item = static_cast<u64>(blockIdx.x) * RC_WARPS + (threadIdx.x >> 5);
    if (item >= static_cast<u64>(t) * heads) return;
    const u64 row = item / heads;
    const int head = static_cast<int>(item % heads);
    const int half = d / 2;
    const u64 slot = slots[row];
    const bool cached = slot < num_slots;
    const u64 pool_row = slot * static_cast<u64>(kv) * d;

    if (head >= h + kv) {  // v: copied into its slot
        if (!cached) return;
        const int j = head - h - kv;
        const T* src = v + row * v_stride + static_cast<u64>(j) * d;
        T* dst = v_pool + pool_row + static_cast<u64>(j) * d;
        for (int i = lane; i < d; i += 32) dst[i] = src[i];
        return;
    }
    const bool is_q = head < h;
    const int j = is_q ? head : head - h;
    const T* x = is_q ? q + row * q_stride + static_cast<u64>(j) * d
                      : k + row * k_stride + static_cast<u64>(j) * d;
    const T* w = is_q ? q_norm : k_norm;
    T* out;
    if (is_q) {
        out = q_out + (row * h + j) * d;
    } else {
        if (!cached) return;
        out = k_pool + pool_row + static_cast<u64>(j) * d;
    }

    float a[RC_MAX_PAIRS], b[RC_MAX_PAIRS];
#pragma unroll
    for (int p = 0; p < RC_MAX_PAIRS; ++p) {
        const int i = lane + 32 * p;
        a[p] = i < half ? to_float(x[i]) : 0.f;
        b[p] = i < half ? to_float(x[i + half]) : 0.f;
    }
    if (w != nullptr) {
        float ss = 0.f;
#pragma unroll
        for (int p = 0; p < RC_MAX_PAIRS; ++p) ss += a[p] * a[p] + b[p] * b[p];
        const float r = 1.f / sqrtf(warp_sum(ss) / static_cast<float>(d) + eps);
#pragma unroll
        for (int p = 0; p < RC_MAX_PAIRS; ++p) {
            const int i = lane + 32 * p;
            if (i < half) {
                a[p] = round_to<T>(round_to<T>(a[p] * r) * to_float(w[i]));
                b[p] = round_to<T>(round_to<T>(b[p] * r) * to_float(w[i + half]));
            }
        }
    }
    const T* c = cos_table + row * cos_stride;
    const T* s = sin_table + row * sin_stride;
#pragma unroll
    for (int p = 0; p < RC_MAX_PAIRS; ++p) {
        const int i = lane + 32 * p;
        if (i < half) {
            const float cv = to_float(c[i]), sv = to_float(s[i]);
            out[i] = from_float<T>(a[p] * cv - b[p] * sv);
            out[i + half] = from_float<T>(b[p] * cv + a[p] * sv);
        }
    }
}

#define ROPE_CACHE(T, NAME)                                                                       \
    extern "C" __global__ void __launch_bounds__(RC_WARPS * 32) rope_cache_##NAME(                \
        const T* q, const T* k, const T* v, const T* q_norm, const T* k_norm,                     \
        const T* cos_table, const T* sin_table, const unsigned int* slots, T* k_pool, T* v_pool,  \
        T* q_out, unsigned long long q_stride, unsigned long long k_stride,                       \
        unsigned long long v_stride, unsigned long long cos_stride,                               \
        unsigned long long sin_stride, int t, int h, int kv, int d, float eps,                    \
        unsigned long long num_slots) {                                                           \
        rope_cache<T>(q, k, v, q_norm, k_norm, cos_table, sin_table, slots, k_pool, v_pool,       \
                      q_out, q_stride, k_stride, v_stride, cos_stride, sin_stride, t, h, kv, d,   \
                      eps, num_slots);                                                            \
    }

ROPE_CACHE(float, f32)
ROPE_CACHE(__nv_bfloat16, bf16)
ROPE_CACHE(__half, f16)
