// SwiGLU, y = silu(gate) * up, and its backward, over rows of gate and up.
//
// `rows` rows of `width` elements: row r of gate and of up starts r * stride elements after
// its first, y and dy are contiguous (rows, width). One flat row (rows 1, any width) is
// `ops::swiglu` of two contiguous tensors; rows of a packed (.., 2 * width) [gate | up] tensor
// (stride 2 * width, up = gate + width) are `ops::swiglu_packed`.
//
// Grid-stride loops over 16-byte vectors (scalar when a pointer or a row start is unaligned,
// and for the tail of a flat row). Forward rounds once, silu(g) * u computed in f32. Backward
// writes dgate and dup into one buffer d, rows with the inputs' stride, dup `up_offset` after
// dgate ((2, n) for a flat row, [dgate | dup] rows of 2 * width when packed):
//   dgate = dy * u * s * (1 + g * (1 - s)),   dup = dy * g * s,   s = sigmoid(g).
// Nothing is saved for backward beyond the inputs.
#include "common.cuh"

typedef unsigned long long u64;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// Vectors (or elements) of a row are numbered across rows, item k of `per_row` a row; the
// row of item k (0 for one row: no division on the flat path).
__device__ __forceinline__ u64 row_of(u64 k, u64 rows, u64 per_row) {
    return rows == 1 ? 0 : k / per_row;
}

template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y,
                           u64 rows, u64 width, u64 stride_rows) {
    constexpr int V = Vec<T>::N;
    const u64 n = rows * width;
    const u64 stride = static_cast<u64>(gridDim.x) * blockDim.x;
    const u64 first = static_cast<u64>(blockIdx.x) * blockDim.x + threadIdx.x;
    // several rows take vectors only when every row start is aligned like the first
    const bool rows_aligned = rows == 1 || (width % V == 0 && stride_rows % V == 0);
    u64 body = 0;
    if (rows_aligned && aligned16(gate) && aligned16(up) && aligned16(y)) {
        const u64 per_row = width / V;
        body = rows * per_row;
        for (u64 c = first; c < body; c += stride) {
            const u64 row = row_of(c, rows, per_row);
            const u64 in = row * stride_rows + (c - row * per_row) * V;
            const uint4 rg = *reinterpret_cast<const uint4*>(gate + in);
            const uint4 ru = *reinterpret_cast<const uint4*>(up + in);
            uint4 result;
#pragma unroll
            for (int u = 0; u < V; ++u) {
                const float g = to_float(reinterpret_cast<const T*>(&rg)[u]);
                const float v = to_float(reinterpret_cast<const T*>(&ru)[u]);
                reinterpret_cast<T*>(&result)[u] = from_float<T>(g * sigmoid(g) * v);
            }
            reinterpret_cast<uint4*>(y)[c] = result;
        }
        body *= V;
    }
    // the tail of a flat row, or every element of unaligned rows
    for (u64 j = body + first; j < n; j += stride) {
        const u64 row = row_of(j, rows, width);
        const u64 in = row * stride_rows + (j - row * width);
        const float g = to_float(gate[in]);
        y[j] = from_float<T>(g * sigmoid(g) * to_float(up[in]));
    }
}

__device__ __forceinline__ void swiglu_grads(float g, float u, float dy, float& dg, float& du) {
    const float s = sigmoid(g);
    dg = dy * u * s * (1.f + g * (1.f - s));
    du = dy * g * s;
}

// d: row r of dgate at d + r * stride_rows, of dup up_offset further.
template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ gate, const T* __restrict__ up,
                           const T* __restrict__ dy, T* __restrict__ d, u64 rows, u64 width,
                           u64 stride_rows, u64 up_offset) {
    constexpr int V = Vec<T>::N;
    T* dgate = d;
    T* dup = d + up_offset;
    const u64 n = rows * width;
    const u64 stride = static_cast<u64>(gridDim.x) * blockDim.x;
    const u64 first = static_cast<u64>(blockIdx.x) * blockDim.x + threadIdx.x;
    const bool rows_aligned = rows == 1 || (width % V == 0 && stride_rows % V == 0);
    u64 body = 0;
    if (rows_aligned && aligned16(gate) && aligned16(up) && aligned16(dy) && aligned16(dgate) &&
        aligned16(dup)) {
        const u64 per_row = width / V;
        body = rows * per_row;
        for (u64 c = first; c < body; c += stride) {
            const u64 row = row_of(c, rows, per_row);
            const u64 at = row * stride_rows + (c - row * per_row) * V;
            const uint4 rg = *reinterpret_cast<const uint4*>(gate + at);
            const uint4 ru = *reinterpret_cast<const uint4*>(up + at);
            const uint4 rd = reinterpret_cast<const uint4*>(dy)[c];
            uint4 og, ou;
#pragma unroll
            for (int u = 0; u < V; ++u) {
                float dg, du;
                swiglu_grads(to_float(reinterpret_cast<const T*>(&rg)[u]),
                             to_float(reinterpret_cast<const T*>(&ru)[u]),
                             to_float(reinterpret_cast<const T*>(&rd)[u]), dg, du);
                reinterpret_cast<T*>(&og)[u] = from_float<T>(dg);
                reinterpret_cast<T*>(&ou)[u] = from_float<T>(du);
            }
            *reinterpret_cast<uint4*>(dgate + at) = og;
            *reinterpret_cast<uint4*>(dup + at) = ou;
        }
        body *= V;
    }
    for (u64 j = body + first; j < n; j += stride) {
        const u64 row = row_of(j, rows, width);
        const u64 at = row * stride_rows + (j - row * width);
        float dg, du;
        swiglu_grads(to_float(gate[at]), to_float(up[at]), to_float(dy[j]), dg, du);
        dgate[at] = from_float<T>(dg);
        dup[at] = from_float<T>(du);
    }
}

#define SWIGLU(T, NAME)                                                                        \
    extern "C" __global__ void swiglu_fwd_##NAME(const T* gate, const T* up, T* y, u64 rows,   \
                                                 u64 width, u64 stride_rows) {                 \
        swiglu_fwd<T>(gate, up, y, rows, width, stride_rows);                                  \
    }                                                                                          \
    extern "C" __global__ void swiglu_bwd_##NAME(const T* gate, const T* up, const T* dy, T* d, \
                                                 u64 rows, u64 width, u64 stride_rows,         \
                                                 u64 up_offset) {                              \
        swiglu_bwd<T>(gate, up, dy, d, rows, width, stride_rows, up_offset);                   \
    }

SWIGLU(float, f32)
SWIGLU(__nv_bfloat16, bf16)
SWIGLU(__half, f16)
