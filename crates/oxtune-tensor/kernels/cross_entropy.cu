// Cross-entropy over vocabulary rows without f32 logits: loss = sum over rows r whose target
// t_r is not ignore_index of lse_r - x[r, t_r], with lse_r = log(sum_j exp(x[r, j])), and its
// gradient dx[r, j] = g * (exp(x[r, j] - lse_r) - [j == t_r]) (0 on ignored rows).
//
// Forward, three launches, deterministic:
//   xent_partials  grid (rows, splits) x 256 threads: block (r, s) reads span = 256 * U
//                  vectors of row r (U per thread, all loads issued before any math) and
//                  writes its (max, sum of exp(x - max)) to partials[r, s]; ignored rows are
//                  never read;
//   xent_rows      one warp per row: merges the row's partials into lse_r, reads x[r, t_r]
//                  and writes lse_r and the row's loss (NaN for a target outside the row);
//   xent_total     one block: the sum of the row losses, in a fixed order.
// out (1 + rows) f32 holds the total at 0 and lse_r at 1 + r (0 for ignored rows): the
// backward reads lse from there instead of re-reading the logits.
//
// Backward, xent_bwd, grid (rows, splits) x 256 threads over the same spans: reads the row's
// logits once and writes dx in their dtype; the upstream gradient g is read from device
// memory (stats[0]), so nothing waits on the host. Ignored rows are written as zeros
// without reading the logits.
#include "common.cuh"

#define LOG2E 1.4426950408889634f

constexpr int XENT_THREADS = 256;
constexpr int XENT_UNROLL = 4;  // 16-byte vectors per thread per span

// A NaN logit makes its row's statistics (+inf, NaN), which every merge keeps NaN (a NaN
// max alone would be dropped by fmaxf), so the row's loss is NaN as in the reference.
constexpr MaxSum XENT_NAN = {INFINITY, NAN};

// Online (max, sum of exp) of one more value.
__device__ __forceinline__ void max_sum_push(MaxSum& acc, float z) {
    if (z != z) {
        acc = XENT_NAN;
    } else if (z > acc.m) {
        acc.s = acc.s * exp2f((acc.m - z) * LOG2E) + 1.f;
        acc.m = z;
    } else if (z != -INFINITY) {
        acc.s += exp2f((z - acc.m) * LOG2E);
    }
}

template <typename T>
__device__ void xent_partials(const T* __restrict__ x, const int64_t* __restrict__ targets,
                              float2* __restrict__ partials, int n, int span,
                              long long ignore_index) {
    constexpr int V = Vec<T>::N;
    const size_t row = blockIdx.x;
    const int split = blockIdx.y;
    float2* out = partials + row * gridDim.y + split;
    if (targets[row] == ignore_index) {
        if (threadIdx.x == 0) *out = make_float2(-INFINITY, 0.f);
        return;
    }
    const int begin = split * span;
    const int len = min(n - begin, span);
    const T* p = x + row * n + begin;
    MaxSum acc = {-INFINITY, 0.f};
    int tail = 0;
    if (aligned16(p)) {
        // span = blockDim.x * XENT_UNROLL * V, so each thread has at most XENT_UNROLL vectors
        const int body = len / V;
        uint4 raw[XENT_UNROLL];
#pragma unroll
        for (int u = 0; u < XENT_UNROLL; ++u) {
            const int c = threadIdx.x + u * blockDim.x;
            if (c < body) raw[u] = reinterpret_cast<const uint4*>(p)[c];
        }
        float local = -INFINITY;
        bool nan = false;
#pragma unroll
        for (int u = 0; u < XENT_UNROLL; ++u) {
            if (threadIdx.x + u * blockDim.x < body) {
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const float v = to_float(reinterpret_cast<const T*>(&raw[u])[k]);
                    local = fmaxf(local, v);
                    nan = nan || v != v;
                }
            }
        }
        if (nan) {
            acc = XENT_NAN;
        } else if (local != -INFINITY) {
            float s = 0.f;
#pragma unroll
            for (int u = 0; u < XENT_UNROLL; ++u) {
                if (threadIdx.x + u * blockDim.x < body) {
#pragma unroll
                    for (int k = 0; k < V; ++k)
                        s += exp2f((to_float(reinterpret_cast<const T*>(&raw[u])[k]) - local) *
                                   LOG2E);
                }
            }
            acc = {local, s};
        }
        tail = body * V;
    }
    for (int j = tail + threadIdx.x; j < len; j += blockDim.x) max_sum_push(acc, to_float(p[j]));
    acc = block_max_sum(acc);
    if (threadIdx.x == 0) *out = make_float2(acc.m, acc.s);
}

// One warp per row (8 rows per 256-thread block).
template <typename T>
__device__ void xent_rows(const T* __restrict__ x, const int64_t* __restrict__ targets,
                          const float2* __restrict__ partials, float* __restrict__ out,
                          float* __restrict__ row_loss, int rows, int n, int splits,
                          long long ignore_index) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const long long target = targets[row];
    if (target == ignore_index) {
        if (lane == 0) {
            out[1 + row] = 0.f;
            row_loss[row] = 0.f;
        }
        return;
    }
    MaxSum acc = {-INFINITY, 0.f};
    for (int s = lane; s < splits; s += 32) {
        const float2 part = partials[static_cast<size_t>(row) * splits + s];
        acc = max_sum_merge(acc, MaxSum{part.x, part.y});
    }
    acc = warp_max_sum(acc);
    if (lane == 0) {
        const float lse = acc.m + logf(acc.s);
        out[1 + row] = lse;
        row_loss[row] = (target < 0 || target >= n)
                            ? NAN
                            : lse - to_float(x[static_cast<size_t>(row) * n + target]);
    }
}

// out[0] = sum of row_loss, by one block in a fixed order.
__device__ void row_loss_total(const float* __restrict__ row_loss, float* __restrict__ out, int rows) {
    float s = 0.f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) s += row_loss[r];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = s;
}

// stats: (1 + rows) f32, the upstream gradient g at 0 and lse_r at 1 + r.
template <typename T>
__device__ void xent_bwd(const T* __restrict__ x, const int64_t* __restrict__ targets,
                         const float* __restrict__ stats, T* __restrict__ dx, int n, int span,
                         long long ignore_index) {
    constexpr int V = Vec<T>::N;
    const size_t row = blockIdx.x;
    const int begin = blockIdx.y * span;
    const int len = min(n - begin, span);
    const T* p = x + row * n + begin;
    T* q = dx + row * n + begin;
    const long long target = targets[row];
    const bool ignored = target == ignore_index;
    const float g = stats[0];
    const float lse = stats[1 + row];
    // the target's index within this span (outside [0, len) when it is elsewhere)
    const long long local_target = target - begin;
    // exp2((v - lse) * log2 e): v - lse is exact-ish where the probability is large, which
    // keeps p - 1 at a dominant target accurate
    auto grad = [&](int j, float v) {
        const float softmax = exp2f((v - lse) * LOG2E);
        return g * (j == local_target ? softmax - 1.f : softmax);
    };
    int tail = 0;
    if (aligned16(p) && aligned16(q)) {
        const int body = len / V;
        if (ignored) {
            const uint4 zero = make_uint4(0, 0, 0, 0);  // +0.0 in every float type
            for (int c = threadIdx.x; c < body; c += blockDim.x)
                reinterpret_cast<uint4*>(q)[c] = zero;
        } else {
            uint4 raw[XENT_UNROLL];
#pragma unroll
            for (int u = 0; u < XENT_UNROLL; ++u) {
                const int c = threadIdx.x + u * blockDim.x;
                if (c < body) raw[u] = reinterpret_cast<const uint4*>(p)[c];
            }
#pragma unroll
            for (int u = 0; u < XENT_UNROLL; ++u) {
                const int c = threadIdx.x + u * blockDim.x;
                if (c < body) {
                    uint4 result;
                    T* r = reinterpret_cast<T*>(&result);
#pragma unroll
                    for (int k = 0; k < V; ++k)
                        r[k] = from_float<T>(
                            grad(c * V + k, to_float(reinterpret_cast<const T*>(&raw[u])[k])));
                    reinterpret_cast<uint4*>(q)[c] = result;
                }
            }
        }
        tail = body * V;
    }
    for (int j = tail + threadIdx.x; j < len; j += blockDim.x)
        q[j] = ignored ? from_float<T>(0.f) : from_float<T>(grad(j, to_float(p[j])));
}

#define CROSS_ENTROPY(T, NAME)                                                                   \
    extern "C" __global__ void __launch_bounds__(XENT_THREADS) xent_partials_##NAME(              \
        const T* x, const int64_t* targets, float2* partials, int n, int span,                   \
        long long ignore_index) {                                                                \
        xent_partials<T>(x, targets, partials, n, span, ignore_index);                           \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) xent_rows_##NAME(                          \
        const T* x, const int64_t* targets, const float2* partials, float* out, float* row_loss, \
        int rows, int n, int splits, long long ignore_index) {                                   \
        xent_rows<T>(x, targets, partials, out, row_loss, rows, n, splits, ignore_index);        \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(XENT_THREADS) xent_bwd_##NAME(                   \
        const T* x, const int64_t* targets, const float* stats, T* dx, int n, int span,          \
        long long ignore_index) {                                                                \
        xent_bwd<T>(x, targets, stats, dx, n, span, ignore_index);                               \
    }

CROSS_ENTROPY(float, f32)
CROSS_ENTROPY(__nv_bfloat16, bf16)
CROSS_ENTROPY(__half, f16)

extern "C" __global__ void __launch_bounds__(1024)
    xent_total(const float* row_loss, float* out, int rows) {
    row_loss_total(row_loss, out, rows);
}
