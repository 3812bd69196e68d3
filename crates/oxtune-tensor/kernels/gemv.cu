// Linear layers for the few rows of a decode step: out = x W^T (+ bias), bandwidth-bound.
//
// At batch 1..8 a linear layer reads its whole weight to produce a handful of outputs, so
// its time is the weight's bytes over memory bandwidth. cuBLAS runs these as GEMMs padded
// to a tile (about 450 GB/s for a 1024 x 2048 bf16 weight on an H200); here every weight
// element is read once, with 16-byte loads that bypass L1, and multiplied by all rows.
//
// Shapes: x (rows, k), rows <= GEMV_MAX_ROWS; weights w_i (n_i, k) row-major, each row
// 16-byte aligned (k a multiple of 8; the launcher checks); out (rows, n) with n = n_0 +
// .. + n_3: the outputs of up to four weights concatenated (q|k|v in one launch). Output
// column j belongs to the weight whose range [end_{i-1}, end_i) holds it.
//
// Launch: GEMV_WARPS warps per block, one warp per two output columns (linear_rows: grid
// ceil(n / (2 GEMV_WARPS))) or one (swiglu_linear_rows, which streams gate and up rows
// together: grid ceil(n / GEMV_WARPS)). A warp computes its columns for every row: its 32 lanes stride over the
// weight row's 16-byte chunks, GEMV_BATCH chunks in flight per lane, dot each with the same
// chunk of every x row (x is tiny and stays in L1/L2), and reduce by shuffles. f32
// accumulation, one rounding to T.
//
// linear_rows:        out[m, j] = T(x[m] . w[j] + bias[j])
// swiglu_linear_rows: out[m, j] = T(silu(g) * u), g = T(x[m] . gate[j]), u = T(x[m] . up[j])
//                     (g and u rounded to T first, as the composition of two linear layers
//                     and the SwiGLU kernel rounds them).
#include "common.cuh"

constexpr int GEMV_MAX_ROWS = 8;
constexpr int GEMV_WARPS = 8;

// A 16-byte chunk of the weight: streamed once, not kept in L1. Not volatile, so that the
// loads of a batch are all issued before the first is used.
__device__ __forceinline__ uint4 load_weight(const uint4* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float* out) {
    constexpr int V = Vec<T>::N;
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int u = 0; u < V; ++u) out[u] = to_float(v[u]);
}

// Weight chunks a lane loads before using any: with one warp per output row, the loads in
// flight per lane are what keeps a long row (k = 12288) from being latency-bound.
constexpr int GEMV_BATCH = 4;

// acc[r][m] += x[m] . w[r] over chunks c of the rows (NW weight rows at once).
template <typename T, int NW>
__device__ __forceinline__ void dot_chunk(const uint4 (&raw)[NW], const T* __restrict__ x,
                                          int rows, int k, int c,
                                          float (&acc)[NW][GEMV_MAX_ROWS]) {
    constexpr int V = Vec<T>::N;
    float wf[NW][V];
#pragma unroll
    for (int r = 0; r < NW; ++r) unpack<T>(raw[r], wf[r]);
#pragma unroll
    for (int m = 0; m < GEMV_MAX_ROWS; ++m) {
        if (m < rows) {
            float xf[V];
            unpack<T>(__ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * k) + c), xf);
#pragma unroll
            for (int r = 0; r < NW; ++r) {
#pragma unroll
                for (int u = 0; u < V; ++u) acc[r][m] = fmaf(wf[r][u], xf[u], acc[r][m]);
            }
        }
    }
}

// acc[r][m] = x[m] . w[r] for one warp's NW weight rows, reduced over the warp.
template <typename T, int NW>
__device__ __forceinline__ void dot_rows(const T* const (&w)[NW], const T* __restrict__ x,
                                         int rows, int k, float (&acc)[NW][GEMV_MAX_ROWS]) {
    constexpr int V = Vec<T>::N;
    const int lane = threadIdx.x & 31;
    const int chunks = k / V;
    int c = lane;
    for (; c + 32 * (GEMV_BATCH - 1) < chunks; c += 32 * GEMV_BATCH) {
        uint4 raw[GEMV_BATCH][NW];
#pragma unroll
        for (int b = 0; b < GEMV_BATCH; ++b) {
#pragma unroll
            for (int r = 0; r < NW; ++r)
                raw[b][r] = load_weight(reinterpret_cast<const uint4*>(w[r]) + c + 32 * b);
        }
#pragma unroll
        for (int b = 0; b < GEMV_BATCH; ++b) dot_chunk<T, NW>(raw[b], x, rows, k, c + 32 * b, acc);
    }
    for (; c < chunks; c += 32) {
        uint4 raw[NW];
#pragma unroll
        for (int r = 0; r < NW; ++r) raw[r] = load_weight(reinterpret_cast<const uint4*>(w[r]) + c);
        dot_chunk<T, NW>(raw, x, rows, k, c, acc);
    }
#pragma unroll
    for (int r = 0; r < NW; ++r) {
#pragma unroll
        for (int m = 0; m < GEMV_MAX_ROWS; ++m) {
            if (m < rows) acc[r][m] = warp_sum(acc[r][m]);
        }
    }
}

// Where output column j lives: its weight's row pointer, bias pointer, row index, weight
// index and the weight's end column.
template <typename T>
struct Column {
    const T* w;
    const T* b;
    int row;
    int weight;
    int end;
};

template <typename T>
__device__ __forceinline__ Column<T> locate(int j, const T* w0, const T* w1, const T* w2,
                                            const T* w3, const T* b0, const T* b1, const T* b2,
                                            const T* b3, int end0, int end1, int end2, int n) {
    if (j >= end2) return {w3, b3, j - end2, 3, n};
    if (j >= end1) return {w2, b2, j - end1, 2, end2};
    if (j >= end0) return {w1, b1, j - end0, 1, end1};
    return {w0, b0, j, 0, end0};
}

// Writes column j of every row from its f32 dot products plus its bias.
template <typename T>
__device__ __forceinline__ void write_column(const Column<T>& c, const float (&acc)[GEMV_MAX_ROWS],
                                             int has_bias, int j, int n, int rows,
                                             T* __restrict__ out) {
    const float bias = (has_bias >> c.weight) & 1 ? to_float(c.b[c.row]) : 0.f;
#pragma unroll
    for (int m = 0; m < GEMV_MAX_ROWS; ++m) {
        if (m < rows) out[static_cast<size_t>(m) * n + j] = from_float<T>(acc[m] + bias);
    }
}

// has_bias: bit i set when weight i has a bias (b_i is then its (n_i,) vector).
// A warp takes two adjacent output columns: when they are rows of one weight (the usual
// case) both rows stream together, which keeps twice the loads in flight (a single row per
// warp streamed large weights at half cuBLAS's rate); otherwise one after the other.
template <typename T>
__device__ void linear_rows(const T* __restrict__ x, const T* w0, const T* w1, const T* w2,
                            const T* w3, const T* b0, const T* b1, const T* b2, const T* b3,
                            int end0, int end1, int end2, int n, int has_bias, int rows, int k,
                            T* __restrict__ out) {
    const int j = 2 * (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5));
    if (j >= n) return;
    const bool lead = (threadIdx.x & 31) == 0;
    const Column<T> first = locate(j, w0, w1, w2, w3, b0, b1, b2, b3, end0, end1, end2, n);
    if (j + 1 < first.end) {
        const T* const rows_w[2] = {first.w + static_cast<size_t>(first.row) * k,
                                    first.w + static_cast<size_t>(first.row + 1) * k};
        float acc[2][GEMV_MAX_ROWS] = {};
        dot_rows<T, 2>(rows_w, x, rows, k, acc);
        if (lead) {
            write_column(first, acc[0], has_bias, j, n, rows, out);
            const Column<T> second = {first.w, first.b, first.row + 1, first.weight, first.end};
            write_column(second, acc[1], has_bias, j + 1, n, rows, out);
        }
        return;
    }
    for (int col = j; col < j + 2 && col < n; ++col) {
        const Column<T> c = locate(col, w0, w1, w2, w3, b0, b1, b2, b3, end0, end1, end2, n);
        const T* const rows_w[1] = {c.w + static_cast<size_t>(c.row) * k};
        float acc[1][GEMV_MAX_ROWS] = {};
        dot_rows<T, 1>(rows_w, x, rows, k, acc);
        if (lead) write_column(c, acc[0], has_bias, col, n, rows, out);
    }
}

template <typename T>
__device__ void swiglu_linear_rows(const T* __restrict__ x, const T* gate, const T* up, int n,
                                   int rows, int k, T* __restrict__ out) {
    const int j = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (j >= n) return;
    const T* const rows_w[2] = {gate + static_cast<size_t>(j) * k, up + static_cast<size_t>(j) * k};
    float acc[2][GEMV_MAX_ROWS] = {};
    dot_rows<T, 2>(rows_w, x, rows, k, acc);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int m = 0; m < GEMV_MAX_ROWS; ++m) {
            if (m < rows) {
                const float g = round_to<T>(acc[0][m]);
                const float u = round_to<T>(acc[1][m]);
                out[static_cast<size_t>(m) * n + j] = from_float<T>(g / (1.f + expf(-g)) * u);
            }
        }
    }
}

#define GEMV_KERNELS(T, SUFFIX)                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) linear_rows_##SUFFIX(        \
        const T* x, const T* w0, const T* w1, const T* w2, const T* w3, const T* b0,          \
        const T* b1, const T* b2, const T* b3, int end0, int end1, int end2, int n,           \
        int has_bias, int rows, int k, T* out) {                                               \
        linear_rows<T>(x, w0, w1, w2, w3, b0, b1, b2, b3, end0, end1, end2, n, has_bias, rows, \
                       k, out);                                                                \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) swiglu_linear_rows_##SUFFIX( \
        const T* x, const T* gate, const T* up, int n, int rows, int k, T* out) {             \
        swiglu_linear_rows<T>(x, gate, up, n, rows, k, out);                                   \
    }

GEMV_KERNELS(float, f32)
GEMV_KERNELS(__nv_bfloat16, bf16)
GEMV_KERNELS(__half, f16)
