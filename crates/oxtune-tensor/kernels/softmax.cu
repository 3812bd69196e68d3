// Softmax over the last dimension, optionally scaled and causally masked, and its backward.
//
// One block per row. Forward: pass 1 keeps an online (max, sum of exp) per thread and merges
// them across the block; pass 2 writes exp(scale * x - max) / sum. Causal masking is computed
// from the row index: rows are (.., t_q) queries and query i sees keys j <= i + past, so the
// masked tail of each row is never read and is written as zeros. Backward:
// dx = scale * y * (dy - sum(dy * y)), reading only the visible prefix.
#include "common.cuh"

// Visible keys of a row: all of them, or the causal prefix.
__device__ __forceinline__ int visible_keys(int n, int causal, int t_q, int past) {
    if (!causal) return n;
    const int query = static_cast<int>(blockIdx.x % static_cast<unsigned>(t_q));
    return min(n, query + past + 1);  // past <= n, checked on the host
}

template <typename T>
__device__ void softmax_fwd(const T* __restrict__ x, T* __restrict__ y, int n, float scale,
                            int causal, int t_q, int past) {
    const size_t row = blockIdx.x;
    const T* xr = x + row * n;
    T* yr = y + row * n;
    const int limit = visible_keys(n, causal, t_q, past);
    const T* in[1] = {xr};

    MaxSum acc = {-INFINITY, 0.f};
    row_visit(in, limit, [&](int, const float (&v)[1]) {
        const float z = v[0] * scale;
        if (z > acc.m) {
            acc.s = acc.s * expf(acc.m - z) + 1.f;
            acc.m = z;
        } else if (z != -INFINITY) {
            acc.s += expf(z - acc.m);
        }
    });
    acc = block_max_sum(acc);
    const float m = acc.m, inv = 1.f / acc.s;
    row_map(yr, in, limit, [&](int, const float (&v)[1]) { return expf(v[0] * scale - m) * inv; });
    row_fill(yr, limit, n, 0.f);
}

template <typename T>
__device__ void softmax_bwd(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                            int n, float scale, int causal, int t_q, int past) {
    const size_t row = blockIdx.x;
    const int limit = visible_keys(n, causal, t_q, past);
    const T* in[2] = {y + row * n, dy + row * n};
    float dot = 0.f;
    row_visit(in, limit, [&](int, const float (&v)[2]) { dot += v[0] * v[1]; });
    dot = block_sum(dot);
    T* out = dx + row * n;
    row_map(out, in, limit, [&](int, const float (&v)[2]) { return scale * v[0] * (v[1] - dot); });
    row_fill(out, limit, n, 0.f);
}

#define SOFTMAX(T, NAME)                                                                       \
    extern "C" __global__ void __launch_bounds__(1024)                                         \
        softmax_fwd_##NAME(const T* x, T* y, int n, float scale, int causal, int t_q, int past) { \
        softmax_fwd<T>(x, y, n, scale, causal, t_q, past);                                     \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(1024) softmax_bwd_##NAME(                     \
        const T* y, const T* dy, T* dx, int n, float scale, int causal, int t_q, int past) {    \
        softmax_bwd<T>(y, dy, dx, n, scale, causal, t_q, past);                                \
    }

SOFTMAX(float, f32)
SOFTMAX(__nv_bfloat16, bf16)
SOFTMAX(__half, f16)
