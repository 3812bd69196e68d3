// Shared helpers for oxtune's fused kernels: dtype conversion, 128-bit vectorised row
// loops and block reductions.
//
// Every kernel reads and writes its tensor dtype T (float, __nv_bfloat16 or __half) and
// computes in f32. A "row" is the contiguous last dimension of a tensor; row kernels run
// one block per row. Vector loads move 16 bytes (4 f32 or 8 bf16/f16) when every pointer a
// loop touches is 16-byte aligned; a row whose start is not (odd width) takes the scalar
// path, so any width is correct and widths that are multiples of 8 are fast.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half(x);
}

// Rounds through T and back: the value a tensor of dtype T would hold.
template <typename T> __device__ __forceinline__ float round_to(float x) {
    return to_float(from_float<T>(x));
}

// Elements of T in one 16-byte vector.
template <typename T> struct Vec {
    static constexpr int N = 16 / sizeof(T);
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

template <typename T, int K>
__device__ __forceinline__ bool all_aligned(const T* const (&ptrs)[K]) {
    bool ok = true;
#pragma unroll
    for (int k = 0; k < K; ++k) ok = ok && aligned16(ptrs[k]);
    return ok;
}

// Calls f(j, v) for every j in [0, n) of the block's row, where v[k] = in[k][j] as f32.
// The block's threads split the row; each thread sees its elements in increasing order.
template <typename T, int K, typename F>
__device__ __forceinline__ void row_visit(const T* const (&in)[K], int n, F f) {
    constexpr int V = Vec<T>::N;
    int body = 0;
    if (all_aligned(in)) {
        body = n / V;
        for (int c = threadIdx.x; c < body; c += blockDim.x) {
            uint4 raw[K];
#pragma unroll
            for (int k = 0; k < K; ++k) raw[k] = reinterpret_cast<const uint4*>(in[k])[c];
#pragma unroll
            for (int u = 0; u < V; ++u) {
                float v[K];
#pragma unroll
                for (int k = 0; k < K; ++k) v[k] = to_float(reinterpret_cast<const T*>(&raw[k])[u]);
                f(c * V + u, v);
            }
        }
        body *= V;
    }
    for (int j = body + threadIdx.x; j < n; j += blockDim.x) {
        float v[K];
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = to_float(in[k][j]);
        f(j, v);
    }
}

// out[j] = f(j, v) for every j in [0, n), v as in row_visit.
template <typename T, int K, typename F>
__device__ __forceinline__ void row_map(T* out, const T* const (&in)[K], int n, F f) {
    constexpr int V = Vec<T>::N;
    int body = 0;
    if (all_aligned(in) && aligned16(out)) {
        body = n / V;
        for (int c = threadIdx.x; c < body; c += blockDim.x) {
            uint4 raw[K];
#pragma unroll
            for (int k = 0; k < K; ++k) raw[k] = reinterpret_cast<const uint4*>(in[k])[c];
            uint4 result;
            T* r = reinterpret_cast<T*>(&result);
#pragma unroll
            for (int u = 0; u < V; ++u) {
                float v[K];
#pragma unroll
                for (int k = 0; k < K; ++k) v[k] = to_float(reinterpret_cast<const T*>(&raw[k])[u]);
                r[u] = from_float<T>(f(c * V + u, v));
            }
            reinterpret_cast<uint4*>(out)[c] = result;
        }
        body *= V;
    }
    for (int j = body + threadIdx.x; j < n; j += blockDim.x) {
        float v[K];
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = to_float(in[k][j]);
        out[j] = from_float<T>(f(j, v));
    }
}

// out[j] = value for j in [from, n): the masked tail of a causal softmax row.
template <typename T>
__device__ __forceinline__ void row_fill(T* out, int from, int n, float value) {
    const T v = from_float<T>(value);
    for (int j = from + threadIdx.x; j < n; j += blockDim.x) out[j] = v;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffff, x, offset);
    return x;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32
// (at most 1024). Safe to call repeatedly: it synchronises before reusing its scratch.
__device__ __forceinline__ float block_sum(float x) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_sum(x);
    __syncthreads();  // a previous call may still be reading scratch
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(x);
}

// A narrow row (n <= WARP_ROW_MAX) held in registers by the 32 lanes of one warp, for
// kernels that run a warp per row and several rows per block. Each lane holds its elements
// in slots, in the order row_visit gives thread `lane` of a 32-thread block (row_threads in
// launch.rs gives every row of n <= 256 one warp), so per-lane sums taken in slot order and
// combined by warp_sum equal row_visit + block_sum on that block bit for bit. The two
// layouts are row_visit's two paths:
//   chunked (its vector path, taken when the row is 16-byte aligned): slot i * V + u is
//     element u of 16-byte chunk lane + 32 i when that chunk is whole; the last slot is the
//     tail element (n / V) * V + lane when lane < n % V;
//   strided (its scalar path): slot s is element lane + 32 s when < n.
// Slots off the row hold 0 (adding +0 or a product of zeros leaves a sum unchanged).
// Loads and stores are 16-byte vectors in the chunked layout where the pointer is aligned,
// else element by element at the same slots, so any layout can be read from any row.
constexpr int WARP_ROW_MAX = 256;

template <typename T> struct WarpRow {
    static constexpr int V = Vec<T>::N;
    static constexpr int CHUNKS = WARP_ROW_MAX / (32 * V);  // 1 (bf16, f16) or 2 (f32)
    static constexpr int SLOTS = CHUNKS * V + 1;            // 9: the whole chunks, the tail
    float v[SLOTS];

    // The element slot s holds in a layout, or -1 when the slot is off the row.
    static __device__ __forceinline__ int column(int s, int n, int lane, bool chunked) {
        if (!chunked) return lane + 32 * s < n ? lane + 32 * s : -1;
        if (s < CHUNKS * V) {
            const int c = lane + 32 * (s / V);
            return c < n / V ? c * V + s % V : -1;
        }
        return lane < n % V ? n / V * V + lane : -1;
    }

    __device__ __forceinline__ void load(const T* row, int n, int lane, bool chunked) {
        if (chunked && aligned16(row)) {
#pragma unroll
            for (int i = 0; i < CHUNKS; ++i) {
                const int c = lane + 32 * i;
                uint4 raw = make_uint4(0, 0, 0, 0);  // all-zero bits are +0 in every T
                if (c < n / V) raw = reinterpret_cast<const uint4*>(row)[c];
#pragma unroll
                for (int u = 0; u < V; ++u)
                    v[i * V + u] = to_float(reinterpret_cast<const T*>(&raw)[u]);
            }
            v[SLOTS - 1] = lane < n % V ? to_float(row[n / V * V + lane]) : 0.f;
        } else {
#pragma unroll
            for (int s = 0; s < SLOTS; ++s) {
                const int j = column(s, n, lane, chunked);
                v[s] = j >= 0 ? to_float(row[j]) : 0.f;
            }
        }
    }

    // row[element of slot s] = T(v[s]) for the slots on the row.
    __device__ __forceinline__ void store(T* row, int n, int lane, bool chunked) const {
        if (chunked && aligned16(row)) {
#pragma unroll
            for (int i = 0; i < CHUNKS; ++i) {
                const int c = lane + 32 * i;
                if (c >= n / V) continue;
                uint4 raw;
                T* r = reinterpret_cast<T*>(&raw);
#pragma unroll
                for (int u = 0; u < V; ++u) r[u] = from_float<T>(v[i * V + u]);
                reinterpret_cast<uint4*>(row)[c] = raw;
            }
            if (lane < n % V) row[n / V * V + lane] = from_float<T>(v[SLOTS - 1]);
        } else {
#pragma unroll
            for (int s = 0; s < SLOTS; ++s) {
                const int j = column(s, n, lane, chunked);
                if (j >= 0) row[j] = from_float<T>(v[s]);
            }
        }
    }

    // This lane's sum of squares, in slot order (row_visit's `ss += v * v`).
    __device__ __forceinline__ float sum_squares() const {
        float ss = 0.f;
#pragma unroll
        for (int s = 0; s < SLOTS; ++s) ss += v[s] * v[s];
        return ss;
    }
};

// Online softmax statistics: the running maximum m and the sum s of exp(x - m).
struct MaxSum {
    float m, s;
};

__device__ __forceinline__ MaxSum max_sum_merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, 0.f};
    const float sa = a.m == -INFINITY ? 0.f : a.s * expf(a.m - m);
    const float sb = b.m == -INFINITY ? 0.f : b.s * expf(b.m - m);
    return {m, sa + sb};
}

__device__ __forceinline__ MaxSum warp_max_sum(MaxSum x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        MaxSum other = {__shfl_xor_sync(0xffffffff, x.m, offset),
                        __shfl_xor_sync(0xffffffff, x.s, offset)};
        x = max_sum_merge(x, other);
    }
    return x;
}

// (max, sum of exp) over the block, returned to every thread; same rules as block_sum.
__device__ __forceinline__ MaxSum block_max_sum(MaxSum x) {
    __shared__ float scratch_m[32], scratch_s[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_max_sum(x);
    __syncthreads();
    if (lane == 0) {
        scratch_m[warp] = x.m;
        scratch_s[warp] = x.s;
    }
    __syncthreads();
    x = lane < warps ? MaxSum{scratch_m[lane], scratch_s[lane]} : MaxSum{-INFINITY, 0.f};
    return warp_max_sum(x);
}
