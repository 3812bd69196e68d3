// SwiGLU, y = silu(gate) * up, and its backward, over flat contiguous tensors.
//
// Grid-stride loops over 16-byte vectors (scalar when a pointer is unaligned, and for the
// tail). Forward rounds once, silu(g) * u computed in f32. Backward writes dgate and dup into
// one (2, n) buffer:
//   dgate = dy * u * s * (1 + g * (1 - s)),   dup = dy * g * s,   s = sigmoid(g).
// Nothing is saved for backward beyond the inputs.
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y,
                           unsigned long long n) {
    constexpr int V = Vec<T>::N;
    const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
    const unsigned long long first = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    unsigned long long body = 0;
    if (aligned16(gate) && aligned16(up) && aligned16(y)) {
        body = n / V;
        for (unsigned long long c = first; c < body; c += stride) {
            const uint4 rg = reinterpret_cast<const uint4*>(gate)[c];
            const uint4 ru = reinterpret_cast<const uint4*>(up)[c];
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
    for (unsigned long long j = body + first; j < n; j += stride) {
        const float g = to_float(gate[j]);
        y[j] = from_float<T>(g * sigmoid(g) * to_float(up[j]));
    }
}

__device__ __forceinline__ void swiglu_grads(float g, float u, float dy, float& dg, float& du) {
    const float s = sigmoid(g);
    dg = dy * u * s * (1.f + g * (1.f - s));
    du = dy * g * s;
}

// d: (2, n); d[0..n) = dgate, d[n..2n) = dup.
template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ gate, const T* __restrict__ up,
                           const T* __restrict__ dy, T* __restrict__ d, unsigned long long n) {
    constexpr int V = Vec<T>::N;
    T* dgate = d;
    T* dup = d + n;
    const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
    const unsigned long long first = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    unsigned long long body = 0;
    if (aligned16(gate) && aligned16(up) && aligned16(dy) && aligned16(dgate) && aligned16(dup)) {
        body = n / V;
        for (unsigned long long c = first; c < body; c += stride) {
            const uint4 rg = reinterpret_cast<const uint4*>(gate)[c];
            const uint4 ru = reinterpret_cast<const uint4*>(up)[c];
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
            reinterpret_cast<uint4*>(dgate)[c] = og;
            reinterpret_cast<uint4*>(dup)[c] = ou;
        }
        body *= V;
    }
    for (unsigned long long j = body + first; j < n; j += stride) {
        float dg, du;
        swiglu_grads(to_float(gate[j]), to_float(up[j]), to_float(dy[j]), dg, du);
        dgate[j] = from_float<T>(dg);
        dup[j] = from_float<T>(du);
    }
}

#define SWIGLU(T, NAME)                                                                        \
    extern "C" __global__ void swiglu_fwd_##NAME(const T* gate, const T* up, T* y,             \
                                                 unsigned long long n) {                       \
        swiglu_fwd<T>(gate, up, y, n);                                                         \
    }                                                                                          \
    extern "C" __global__ void swiglu_bwd_##NAME(const T* gate, const T* up, const T* dy, T* d, \
                                                 unsigned long long n) {                       \
        swiglu_bwd<T>(gate, up, dy, d, n);                                                     \
    }

SWIGLU(float, f32)
SWIGLU(__nv_bfloat16, bf16)
SWIGLU(__half, f16)
