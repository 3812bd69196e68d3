// Residual add + RMSNorm, forward only: s = T(x + res), y = T(s * r) * w with
// r = 1 / sqrt(mean(s^2) + eps), exactly `(x + res)` in T followed by rms_norm.cu's forward
// (Hugging Face rounding). One block per row; each thread keeps its first ADD_RMS_CACHE
// vectors of s in registers between the statistics pass and the output pass, so a row up to
// blockDim * ADD_RMS_CACHE vectors (32768 bf16 / 16384 f32 at 1024 threads) moves x, res
// and w in and s, y out once; wider rows and rows that are not 16-byte aligned re-read their
// s (written by the same thread). The backward is rms_norm.cu's (on s) plus the identity of
// the add, composed on the host.
#include "common.cuh"

constexpr int ADD_RMS_CACHE = 4;

template <typename T>
__device__ void add_rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ res,
                                 const T* __restrict__ w, T* __restrict__ sum, T* __restrict__ y,
                                 int n, float eps) {
    constexpr int V = Vec<T>::N;
    const size_t offset = static_cast<size_t>(blockIdx.x) * n;
    const T* xr = x + offset;
    const T* rr = res + offset;
    T* sr = sum + offset;
    T* yr = y + offset;
    const bool vector = aligned16(xr) && aligned16(rr) && aligned16(sr) && aligned16(yr) &&
                        aligned16(w);
    const int body = vector ? n / V : 0;
    // s = T(x + res) of one 16-byte vector, written out, and its sum of squares
    auto add = [&](int c, float& ss) {
        const uint4 a = reinterpret_cast<const uint4*>(xr)[c];
        const uint4 b = reinterpret_cast<const uint4*>(rr)[c];
        uint4 s;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const T v = from_float<T>(to_float(reinterpret_cast<const T*>(&a)[k]) +
                                      to_float(reinterpret_cast<const T*>(&b)[k]));
            reinterpret_cast<T*>(&s)[k] = v;
            const float f = to_float(v);
            ss += f * f;
        }
        reinterpret_cast<uint4*>(sr)[c] = s;
        return s;
    };

    // 1. s and the sum of squares.
    float ss = 0.f;
    uint4 cache[ADD_RMS_CACHE];
#pragma unroll
    for (int k = 0; k < ADD_RMS_CACHE; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < body) cache[k] = add(c, ss);
    }
    for (int c = threadIdx.x + ADD_RMS_CACHE * blockDim.x; c < body; c += blockDim.x) add(c, ss);
    for (int j = body * V + threadIdx.x; j < n; j += blockDim.x) {
        const T v = from_float<T>(to_float(xr[j]) + to_float(rr[j]));
        sr[j] = v;
        const float f = to_float(v);
        ss += f * f;
    }
    const float r = 1.f / sqrtf(block_sum(ss) / static_cast<float>(n) + eps);

    // 2. y = T(s * r) * w.
    auto norm = [&](int c, const uint4& s) {
        const uint4 weight = reinterpret_cast<const uint4*>(w)[c];
        uint4 out;
#pragma unroll
        for (int k = 0; k < V; ++k)
            reinterpret_cast<T*>(&out)[k] =
                from_float<T>(round_to<T>(to_float(reinterpret_cast<const T*>(&s)[k]) * r) *
                              to_float(reinterpret_cast<const T*>(&weight)[k]));
        reinterpret_cast<uint4*>(yr)[c] = out;
    };
#pragma unroll
    for (int k = 0; k < ADD_RMS_CACHE; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < body) norm(c, cache[k]);
    }
    for (int c = threadIdx.x + ADD_RMS_CACHE * blockDim.x; c < body; c += blockDim.x)
        norm(c, reinterpret_cast<const uint4*>(sr)[c]);
    for (int j = body * V + threadIdx.x; j < n; j += blockDim.x)
        yr[j] = from_float<T>(round_to<T>(to_float(sr[j]) * r) * to_float(w[j]));
}

#define ADD_RMS_NORM(T, NAME)                                                                   \
    extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_fwd_##NAME(                 \
        const T* x, const T* res, const T* w, T* sum, T* y, int n, float eps) {                \
        add_rms_norm_fwd<T>(x, res, w, sum, y, n, eps);                                         \
    }

ADD_RMS_NORM(float, f32)
ADD_RMS_NORM(__nv_bfloat16, bf16)
ADD_RMS_NORM(__half, f16)
