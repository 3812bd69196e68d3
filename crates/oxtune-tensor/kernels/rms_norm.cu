// RMSNorm as Hugging Face computes it, y = T(x * r) * w with r = 1 / sqrt(mean(x^2) + eps)
// (statistics in f32, the normalised activations rounded to T before the weight), and its
// backward. Nothing is saved for backward, r is recomputed from x.
//
// x's rows may be strided: rows are numbered over (outer, middle, inner) dimensions in
// row-major order, row (a, b, c) starting at a * xs.outer + b * xs.middle + c * xs.inner
// (e.g. the heads of q in a packed (b, t, heads, d) projection); a contiguous x is
// (1, 1, rows) with xs.inner = n. y, dy and dx are contiguous (rows, n).
//
// dx = r * (dy * w) - r^3 * x * sum(dy * w * x) / n
// dw = sum over rows of dy * T(x * r): each block of rms_norm_bwd_dw takes a chunk of rows
// and writes one row of f32 partial sums; the host sums the partials (chunks, n) over the
// chunks.
//
// Two layouts of the work, picked by the host on the width n:
// - n <= WARP_ROW_MAX (256; Qwen3's per-head q/k norms, n = 128): the *_warp kernels, one
//   warp per row held in registers (WarpRow), NORM_WARPS rows of a block at a time, warp
//   shuffles only. A block of the one-block-per-row kernels has a single warp at these
//   widths, and WarpRow sums in its order, so y and dx are bit for bit those of the
//   one-block kernels. rms_norm_bwd_dw_warp: each lane accumulates its columns (chunked
//   layout) in registers over the rows of its warp, the warps' sums are added in shared
//   memory in warp order.
// - wider rows: one block per row, block-reduced (row_visit, row_map, block_sum); dw
//   accumulates the block's rows one after another in shared memory.
#include "common.cuh"

__device__ __forceinline__ float inverse_rms(float sum_squares, int n, float eps) {
    return 1.f / sqrtf(sum_squares / static_cast<float>(n) + eps);
}

struct RowStrides {
    unsigned middle, inner;                               // sizes of the inner row dimensions
    long long outer_stride, middle_stride, inner_stride;  // in elements

    // The offset of x's row `row` (< 2^31: the host passes the row count as an i32) from
    // its first.
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

// ---------------------------------------------------------------------------------------
// Narrow rows: a warp per row.

// Rows a warp loads before it reduces them, and blocks an SM keeps resident (the launch
// bounds' minimum): one row a warp keeps only 256 B of x in flight at n = 128 bf16, and a
// streaming kernel needs about 30 KiB in flight per SM to approach HBM bandwidth. From
// ptxas -v (sm_90, no spills), per SM at n = 128 bf16:
//   fwd  3 rows, 64 registers, 4 blocks: 24 KiB of x (1 row: 40 registers, 6 blocks, 12 KiB)
//   dx   2 rows, 80 registers, 3 blocks: 24 KiB of x and dy (1 row: 64, 4 blocks, 16 KiB)
//   dw   2 rows, 80 registers, 3 blocks: 24 KiB of x and dy (1 row: 64, 4 blocks, 16 KiB)
constexpr int NORM_WARPS = 8;     // warps of a block (256 threads)
constexpr int NORM_FWD_ROWS = 3;  // rows a warp of rms_norm_fwd_warp holds at once
constexpr int NORM_DX_ROWS = 2;   // ... of rms_norm_bwd_dx_warp (x, w and dy)
constexpr int NORM_DW_ROWS = 2;   // ... of rms_norm_bwd_dw_warp (x and dy)
constexpr int NORM_FWD_BLOCKS = 4, NORM_DX_BLOCKS = 3, NORM_DW_BLOCKS = 3;  // per SM

// Blocks step over groups of NORM_WARPS * NORM_FWD_ROWS rows (any grid covers every row;
// the host launches one block a group): warp k of a group takes its rows k + i * NORM_WARPS
// (i < NORM_FWD_ROWS), so the block's warps read neighbouring rows at once.
template <typename T>
__device__ void rms_norm_fwd_warp(const T* __restrict__ x, const T* __restrict__ w,
                                  T* __restrict__ y, unsigned rows, int n, float eps,
                                  RowStrides xs) {
    const int lane = threadIdx.x & 31;
    for (unsigned first = blockIdx.x * (NORM_WARPS * NORM_FWD_ROWS) + (threadIdx.x >> 5);
         first < rows; first += gridDim.x * (NORM_WARPS * NORM_FWD_ROWS)) {
        WarpRow<T> xr[NORM_FWD_ROWS];
        bool chunked[NORM_FWD_ROWS];  // row_visit's vector path: x's row is 16-byte aligned
#pragma unroll
        for (int i = 0; i < NORM_FWD_ROWS; ++i) {
            const unsigned row = first + i * NORM_WARPS;
            if (row >= rows) break;
            const T* x_row = x + xs.offset(row);
            chunked[i] = aligned16(x_row);
            xr[i].load(x_row, n, lane, chunked[i]);
        }
#pragma unroll
        for (int i = 0; i < NORM_FWD_ROWS; ++i) {
            const unsigned row = first + i * NORM_WARPS;
            if (row >= rows) break;
            const float r = inverse_rms(warp_sum(xr[i].sum_squares()), n, eps);
            WarpRow<T> out;
            out.load(w, n, lane, chunked[i]);
#pragma unroll
            for (int s = 0; s < WarpRow<T>::SLOTS; ++s)
                out.v[s] = round_to<T>(xr[i].v[s] * r) * out.v[s];
            out.store(y + static_cast<size_t>(row) * n, n, lane, chunked[i]);
        }
    }
}

// As rms_norm_fwd_warp, in groups of NORM_WARPS * NORM_DX_ROWS rows.
template <typename T>
__device__ void rms_norm_bwd_dx_warp(const T* __restrict__ x, const T* __restrict__ w,
                                     const T* __restrict__ dy, T* __restrict__ dx, unsigned rows,
                                     int n, float eps, RowStrides xs) {
    const int lane = threadIdx.x & 31;
    for (unsigned first = blockIdx.x * (NORM_WARPS * NORM_DX_ROWS) + (threadIdx.x >> 5);
         first < rows; first += gridDim.x * (NORM_WARPS * NORM_DX_ROWS)) {
        WarpRow<T> xr[NORM_DX_ROWS], wr[NORM_DX_ROWS], dyr[NORM_DX_ROWS];
        bool chunked[NORM_DX_ROWS];  // row_visit's vector path: x's row, w and dy's row aligned
#pragma unroll
        for (int i = 0; i < NORM_DX_ROWS; ++i) {
            const unsigned row = first + i * NORM_WARPS;
            if (row >= rows) break;
            const T* x_row = x + xs.offset(row);
            const T* dy_row = dy + static_cast<size_t>(row) * n;
            chunked[i] = aligned16(x_row) && aligned16(w) && aligned16(dy_row);
            xr[i].load(x_row, n, lane, chunked[i]);
            wr[i].load(w, n, lane, chunked[i]);
            dyr[i].load(dy_row, n, lane, chunked[i]);
        }
#pragma unroll
        for (int i = 0; i < NORM_DX_ROWS; ++i) {
            const unsigned row = first + i * NORM_WARPS;
            if (row >= rows) break;
            float ss = 0.f, dot = 0.f;
#pragma unroll
            for (int s = 0; s < WarpRow<T>::SLOTS; ++s) {
                ss += xr[i].v[s] * xr[i].v[s];
                dot += xr[i].v[s] * wr[i].v[s] * dyr[i].v[s];
            }
            const float r = inverse_rms(warp_sum(ss), n, eps);
            dot = warp_sum(dot);
            const float c = r * r * r * dot / static_cast<float>(n);
            WarpRow<T> out;
#pragma unroll
            for (int s = 0; s < WarpRow<T>::SLOTS; ++s)
                out.v[s] = r * wr[i].v[s] * dyr[i].v[s] - c * xr[i].v[s];
            out.store(dx + static_cast<size_t>(row) * n, n, lane, chunked[i]);
        }
    }
}

// partials: (gridDim.x, n) f32; block b sums rows [b * rows_per_block, ...) of `rows`, its
// warp k the rows k, k + NORM_WARPS, ... of them, each lane its columns of the chunked
// layout (at most 9 a lane) in registers. The warps' sums are then added in warp order.
template <typename T>
__device__ void rms_norm_bwd_dw_warp(const T* __restrict__ x, const T* __restrict__ dy,
                                     float* __restrict__ partials, unsigned rows,
                                     unsigned rows_per_block, int n, float eps, RowStrides xs) {
    using Row = WarpRow<T>;
    __shared__ float sums[NORM_WARPS][WARP_ROW_MAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned first = blockIdx.x * rows_per_block;
    const unsigned last = min(rows, first + rows_per_block);
    float acc[Row::SLOTS];
#pragma unroll
    for (int s = 0; s < Row::SLOTS; ++s) acc[s] = 0.f;
    for (unsigned base = first + warp; base < last; base += NORM_WARPS * NORM_DW_ROWS) {
        Row xr[NORM_DW_ROWS], dyr[NORM_DW_ROWS];
        bool x_chunked[NORM_DW_ROWS];  // r as row_visit on x's row alone takes it
#pragma unroll
        for (int i = 0; i < NORM_DW_ROWS; ++i) {
            const unsigned row = base + i * NORM_WARPS;
            if (row >= last) break;
            const T* x_row = x + xs.offset(row);
            x_chunked[i] = aligned16(x_row);
            xr[i].load(x_row, n, lane, x_chunked[i]);
            dyr[i].load(dy + static_cast<size_t>(row) * n, n, lane, true);
        }
#pragma unroll
        for (int i = 0; i < NORM_DW_ROWS; ++i) {
            const unsigned row = base + i * NORM_WARPS;
            if (row >= last) break;
            const float r = inverse_rms(warp_sum(xr[i].sum_squares()), n, eps);
            // the accumulators' layout is the chunked one: an unaligned row (strided layout
            // for r) is read again at the chunked slots, element by element
            if (!x_chunked[i]) xr[i].load(x + xs.offset(row), n, lane, true);
#pragma unroll
            for (int s = 0; s < Row::SLOTS; ++s)
                acc[s] += dyr[i].v[s] * round_to<T>(xr[i].v[s] * r);
        }
    }
#pragma unroll
    for (int s = 0; s < Row::SLOTS; ++s) {
        const int j = Row::column(s, n, lane, true);
        if (j >= 0) sums[warp][j] = acc[s];
    }
    __syncthreads();
    float* out = partials + static_cast<size_t>(blockIdx.x) * n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float total = sums[0][j];
#pragma unroll
        for (int k = 1; k < NORM_WARPS; ++k) total += sums[k][j];
        out[j] = total;
    }
}

// Every kernel ends with x's row strides: middle, inner, outer_stride, middle_stride,
// inner_stride (see RowStrides). The *_warp kernels (n <= WARP_ROW_MAX) run blocks of
// NORM_WARPS * 32 threads and take the row count; any fwd or dx grid covers every row
// (ceil(rows / (NORM_WARPS * NORM_FWD_ROWS)) or ceil(rows / (NORM_WARPS * NORM_DX_ROWS))
// blocks give each block one group).
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
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(NORM_WARPS * 32, NORM_FWD_BLOCKS)              \
        rms_norm_fwd_warp_##NAME(const T* x, const T* w, T* y, int rows, int n, float eps,      \
                                 ROW_STRIDES) {                                                 \
        rms_norm_fwd_warp<T>(x, w, y, rows, n, eps, RowStrides{middle, inner, so, sm, si});     \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(NORM_WARPS * 32, NORM_DX_BLOCKS)               \
        rms_norm_bwd_dx_warp_##NAME(const T* x, const T* w, const T* dy, T* dx, int rows, int n, \
                                    float eps, ROW_STRIDES) {                                   \
        rms_norm_bwd_dx_warp<T>(x, w, dy, dx, rows, n, eps,                                     \
                                RowStrides{middle, inner, so, sm, si});                         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(NORM_WARPS * 32, NORM_DW_BLOCKS)               \
        rms_norm_bwd_dw_warp_##NAME(const T* x, const T* dy, float* partials, int rows,         \
                                    int rows_per_block, int n, float eps, ROW_STRIDES) {        \
        rms_norm_bwd_dw_warp<T>(x, dy, partials, rows, rows_per_block, n, eps,                  \
                                RowStrides{middle, inner, so, sm, si});                         \
    }

RMS_NORM(float, f32)
RMS_NORM(__nv_bfloat16, bf16)
RMS_NORM(__half, f16)
