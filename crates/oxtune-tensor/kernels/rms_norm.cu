// RMSNorm as Hugging Face computes it, y = T(x * r) * w with r = 1 / sqrt(mean(x^2) + eps)
// (statistics in f32, the normalised activations rounded to T before the weight), and its
// backward. One block per row; nothing is saved for backward, r is recomputed from x.
//
// x's rows may be strided: rows are numbered over (outer, middle, inner) dimensions in
// row-major order, row (a, b, c) starting at a * xs.outer + b * xs.middle + c * xs.inner
// (e.g. the heads of q in a packed (b, t, heads, d) projection); a contiguous x is
// (1, 1, rows) with xs.inner = n. y, dy and dx are contiguous (rows, n).
//
// dx = r * (dy * w) - r^3 * x * sum(dy * w * x) / n   (one block per row)
// dw = sum over rows of dy * T(x * r): each block of rms_norm_bwd_dw takes a chunk of rows,
// accumulates its columns in f32 in shared memory and writes one row of f32 partial sums;
// the host sums the partials (chunks, n) over the chunks.
#include "common.cuh"

__device__ __forceinline__ float inverse_rms(float sum_squares, int n, float eps) {
    return 1.f / sqrtf(sum_squares / static_cast<float>(n) + eps);
}

struct RowStrides {
    unsigned middle, inner;                               // sizes of the inner row dimensions
    long long outer_stride, middle_stride, inner_stride;  // in elements

    // The offset of x's row `row` (< 2^31: rows are a grid dimension) from its first.
    __device__ __forceinline__ long long offset(unsigned row) const {
        const unsigned c = row % inner, rest = row / inner;
        const unsigned b = rest % middle, a = rest / middle;
        return a * outer_stride + b * middle_stride + c * inner_stride;
    }
};

template <typename T>
__device__ void rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                             int n, float eps, RowStrides xs) {
    const size_t row = blockIdx.x;
    const T* x_row = x + xs.offset(blockIdx.x);
    const T* in[1] = {x_row};
    float ss = 0.f;
    row_visit(in, n, [&](int, const float (&v)[1]) { ss += v[0] * v[0]; });
    const float r = inverse_rms(block_sum(ss), n, eps);
    const T* in2[2] = {x_row, w};
    row_map(y + row * n, in2, n,
            [&](int, const float (&v)[2]) { return round_to<T>(v[0] * r) * v[1]; });
}

template <typename T>
__device__ void rms_norm_bwd_dx(const T* __restrict__ x, const T* __restrict__ w,
                                const T* __restrict__ dy, T* __restrict__ dx, int n, float eps,
                                RowStrides xs) {
    const size_t row = blockIdx.x;
    const T* in[3] = {x + xs.offset(blockIdx.x), w, dy + row * n};
    float ss = 0.f, dot = 0.f;
    row_visit(in, n, [&](int, const float (&v)[3]) {
        ss += v[0] * v[0];
        dot += v[0] * v[1] * v[2];
    });
    const float r = inverse_rms(block_sum(ss), n, eps);
    dot = block_sum(dot);
    const float c = r * r * r * dot / static_cast<float>(n);
    row_map(dx + row * n, in, n,
            [&](int, const float (&v)[3]) { return r * v[1] * v[2] - c * v[0]; });
}

// partials: (gridDim.x, n) f32; block b sums rows [b * rows_per_block, ...) of `rows`.
template <typename T>
__device__ void rms_norm_bwd_dw(const T* __restrict__ x, const T* __restrict__ dy,
                                float* __restrict__ partials, int rows, int rows_per_block, int n,
                                float eps, RowStrides xs) {
    extern __shared__ float acc[];  // n floats
    for (int j = threadIdx.x; j < n; j += blockDim.x) acc[j] = 0.f;
    const int first = blockIdx.x * rows_per_block;
    const int last = min(rows, first + rows_per_block);
    for (int row = first; row < last; ++row) {
        const T* x_row = x + xs.offset(static_cast<unsigned>(row));
        const T* in[1] = {x_row};
        float ss = 0.f;
        row_visit(in, n, [&](int, const float (&v)[1]) { ss += v[0] * v[0]; });
        // block_sum synchronises the block, so the acc updates of the previous row (possibly
        // by other threads, when the row's alignment differs) are complete and visible.
        const float r = inverse_rms(block_sum(ss), n, eps);
        const T* in2[2] = {x_row, dy + static_cast<size_t>(row) * n};
        row_visit(in2, n,
                  [&](int j, const float (&v)[2]) { acc[j] += v[1] * round_to<T>(v[0] * r); });
    }
    __syncthreads();
    float* out = partials + static_cast<size_t>(blockIdx.x) * n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) out[j] = acc[j];
}

// Every kernel ends with x's row strides: middle, inner, outer_stride, middle_stride,
// inner_stride (see RowStrides).
#define ROW_STRIDES unsigned middle, unsigned inner, long long so, long long sm, long long si
#define RMS_NORM(T, NAME)                                                                       \
    extern "C" __global__ void __launch_bounds__(1024)                                          \
        rms_norm_fwd_##NAME(const T* x, const T* w, T* y, int n, float eps, ROW_STRIDES) {      \
        rms_norm_fwd<T>(x, w, y, n, eps, RowStrides{middle, inner, so, sm, si});                \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(1024) rms_norm_bwd_dx_##NAME(                  \
        const T* x, const T* w, const T* dy, T* dx, int n, float eps, ROW_STRIDES) {            \
        rms_norm_bwd_dx<T>(x, w, dy, dx, n, eps, RowStrides{middle, inner, so, sm, si});        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(1024) rms_norm_bwd_dw_##NAME(                  \
        const T* x, const T* dy, float* partials, int rows, int rows_per_block, int n, float eps, \
        ROW_STRIDES) {                                                                          \
        rms_norm_bwd_dw<T>(x, dy, partials, rows, rows_per_block, n, eps,                       \
                           RowStrides{middle, inner, so, sm, si});                              \
    }

RMS_NORM(float, f32)
RMS_NORM(__nv_bfloat16, bf16)
RMS_NORM(__half, f16)
