// FlashAttention-2 forward and backward for training (t_q == t_k, no KV cache), bf16 and
// f16, head_dim 64 or 128, on tensor cores through nvcuda::wmma (m16n16k16, f32 accumulators).
//
// Shapes: q, o, dO (b, h, t, D); k, v, dK, dV (b, kv_h, t, D), all contiguous; query head hh
// reads kv head hh / (h / kv_h) (grouped-query attention, nothing repeated in memory);
// lse, delta (b, h, t) f32; segments (b, t) u32 or null. Query i sees key j when j < t,
// j <= i if causal, i - j < window if window > 0, and segments[i] == segments[j] if given.
//
// Forward (flash_fwd): one block of 4 warps per (64 queries, b * h); each warp owns 16 query
// rows and keeps its Q fragments and its O accumulator (16 x D, f32) in registers while it
// walks the key tiles of 64: S = Q K^T (staged in shared memory as f32 for the row-wise
// online softmax: running max m and sum l in f32, exp2 with log2(e) folded into the scale),
// P rounded to the dtype, O = O * exp(m_old - m_new) + P V. Key tiles above the causal
// diagonal, before the sliding window, or whose segment range cannot meet the query tile's
// are skipped whole. Writes O / l in the dtype and lse = m + log(l) (natural log, of the
// scaled scores; +inf for a row that sees nothing, whose O is 0).
//
// Backward: flash_bwd_delta computes delta_i = sum_d dO_i * O_i (one warp per row). Then
// flash_bwd runs one block of 4 warps per (64 keys, b * kv_h); each warp owns 16 keys and
// keeps their dK and dV accumulators (f32) in registers over every query head of the group
// and every query tile that can see them (so dK/dV of a kv head are summed over its query
// heads with no atomics and no reduction pass): P^T = exp(K Q^T * scale - lse) recomputed,
// dV += P^T dO, dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK += dS^T Q * scale, and
// dQ += dS K * scale accumulated with f32 atomicAdd into a zeroed (b, h, t, D) f32 buffer.
//
// wmma's fragment-to-element mapping is opaque, so each warp loads a 16x16 table holding
// r * 16 + c through load_matrix_sync into an accumulator fragment: element i of any
// accumulator fragment then sits at (row, col) = (idx.x[i] / 16, idx.x[i] % 16). This is how
// the elementwise steps (rescaling O, masking, P and dS) find their row and column.
#include "common.cuh"
#include <mma.h>

using namespace nvcuda;

namespace flash {

constexpr int BR = 64;        // queries per tile
constexpr int BC = 64;        // keys per tile
constexpr int THREADS = 128;  // 4 warps of 16 rows
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

template <typename T> using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragAT = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;
template <typename T> using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

struct Mask {
    int t, causal, window;
    const uint32_t* segments;  // this batch row's, or null
    __device__ __forceinline__ bool visible(int query, int key, uint32_t seg_q,
                                            uint32_t seg_k) const {
        return key < t && query < t && (!causal || key <= query) &&
               (window <= 0 || query - key < window) && (segments == nullptr || seg_q == seg_k);
    }
};

// Shared-memory layout (bytes), the same formula as the host's (src/cuda/flash.rs). Rows are
// padded by 8 elements (16 bytes) against bank conflicts; every wmma pointer stays 32-byte
// aligned (row strides are multiples of 32 bytes times 16 rows).
template <typename T, int D> struct FwdSmem {
    static constexpr int LDT = D + 8;   // Q, K, V tiles (T)
    static constexpr int LDS = BC + 4;  // S (f32)
    static constexpr int LDP = BC + 8;  // P (T)
    static constexpr int Q = 0;
    static constexpr int K = Q + BR * LDT * 2;
    static constexpr int V = K + BC * LDT * 2;
    static constexpr int S = V + BC * LDT * 2;
    static constexpr int P = S + BR * LDS * 4;
    static constexpr int ROW = P + BR * LDP * 2;  // BR f32: per-row factor
    static constexpr int SEG = ROW + BR * 4;      // BC u32: the key tile's segments
    static constexpr int IDX = SEG + BC * 4;      // 256 f32: the index table
    static constexpr int BYTES = IDX + 256 * 4;
};

template <typename T, int D> struct BwdSmem {
    static constexpr int LDT = D + 8;   // K, V, Q, dO tiles (T)
    static constexpr int LDP = BR + 8;  // P^T, dS^T (T), keys x queries
    static constexpr int K = 0;
    static constexpr int V = K + BC * LDT * 2;
    static constexpr int Q = V + BC * LDT * 2;
    static constexpr int DO = Q + BR * LDT * 2;
    static constexpr int P = DO + BR * LDT * 2;
    static constexpr int DS = P + BC * LDP * 2;
    static constexpr int LSE = DS + BC * LDP * 2;  // BR f32, times log2(e)
    static constexpr int DELTA = LSE + BR * 4;     // BR f32
    static constexpr int SEGQ = DELTA + BR * 4;    // BR u32
    static constexpr int SEGK = SEGQ + BR * 4;     // BC u32
    static constexpr int IDX = SEGK + BC * 4;      // 256 f32
    static constexpr int BYTES = IDX + 256 * 4;
};

// rows [row0, row0 + ROWS) of a (t, D) matrix into a tile with rows of `ld` elements; rows at
// or past t are zeros.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, int row0, int t) {
    constexpr int V = 8;  // elements of a 16-byte vector
    constexpr int PER_ROW = D / V;
    const bool vector = aligned16(src);
    for (int c = threadIdx.x; c < ROWS * PER_ROW; c += THREADS) {
        const int r = c / PER_ROW, col = (c % PER_ROW) * V;
        const int row = row0 + r;
        uint4 value = make_uint4(0, 0, 0, 0);
        if (row < t) {
            const T* from = src + static_cast<size_t>(row) * D + col;
            if (vector) {
                value = *reinterpret_cast<const uint4*>(from);
            } else {
                T* e = reinterpret_cast<T*>(&value);
#pragma unroll
                for (int u = 0; u < V; ++u) e[u] = from[u];
            }
        }
        *reinterpret_cast<uint4*>(dst + r * ld + col) = value;
    }
}

// The index table (r * 16 + c as f32), loaded into an accumulator fragment by each warp.
__device__ __forceinline__ void fill_index_table(float* table) {
    for (int i = threadIdx.x; i < 256; i += THREADS) table[i] = static_cast<float>(i);
}

__device__ __forceinline__ int row_of(const FragC& idx, int i) {
    return static_cast<int>(idx.x[i]) >> 4;
}
__device__ __forceinline__ int col_of(const FragC& idx, int i) {
    return static_cast<int>(idx.x[i]) & 15;
}

// (min, max) of seg[0..count) over the warp, returned to every lane (count <= 64).
__device__ __forceinline__ void warp_min_max(const uint32_t* seg, int count, uint32_t& lo,
                                             uint32_t& hi) {
    const int lane = threadIdx.x & 31;
    lo = 0xffffffffu;
    hi = 0;
    for (int j = lane; j < count; j += 32) {
        lo = min(lo, seg[j]);
        hi = max(hi, seg[j]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        lo = min(lo, __shfl_xor_sync(0xffffffff, lo, offset));
        hi = max(hi, __shfl_xor_sync(0xffffffff, hi, offset));
    }
}

template <typename T, int D>
__device__ void forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        T* __restrict__ o, float* __restrict__ lse,
                        const uint32_t* __restrict__ segments, int h, int kv_h, int t,
                        float scale, int causal, int window) {
    using L = FwdSmem<T, D>;
    extern __shared__ __align__(128) unsigned char smem[];
    T* qs = reinterpret_cast<T*>(smem + L::Q);
    T* ks = reinterpret_cast<T*>(smem + L::K);
    T* vs = reinterpret_cast<T*>(smem + L::V);
    float* ss = reinterpret_cast<float*>(smem + L::S);
    T* ps = reinterpret_cast<T*>(smem + L::P);
    float* row_factor = reinterpret_cast<float*>(smem + L::ROW);
    uint32_t* segk = reinterpret_cast<uint32_t*>(smem + L::SEG);
    float* table = reinterpret_cast<float*>(smem + L::IDX);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // the last query tiles first: under a causal mask they see the most keys, so the longest
    // blocks start early and short ones fill the tail
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int bh = blockIdx.y, b = bh / h, hh = bh % h;
    const int kvh = hh / (h / kv_h);
    const size_t q_base = static_cast<size_t>(bh) * t * D;
    const size_t kv_base = static_cast<size_t>(b * kv_h + kvh) * t * D;
    const Mask mask{t, causal, window, segments ? segments + static_cast<size_t>(b) * t : nullptr};
    const float scale2 = scale * LOG2E;

    load_tile<T, D, BR>(qs, L::LDT, q + q_base, q0, t);
    fill_index_table(table);
    __syncthreads();

    FragA<T> qf[D / 16];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
        wmma::load_matrix_sync(qf[kk], qs + warp * 16 * L::LDT + kk * 16, L::LDT);
    FragC idx;
    wmma::load_matrix_sync(idx, table, 16, wmma::mem_row_major);
    FragC acc[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(acc[n], 0.f);

    // this lane's half (32 keys) of row r of the warp's 16 rows
    const int r = lane >> 1, half = lane & 1;
    const int query = q0 + warp * 16 + r;
    const uint32_t seg_q = (mask.segments && query < t) ? mask.segments[query] : 0u;
    float m = -INFINITY, l = 0.f;

    // the query tile's segment range (every warp computes it)
    uint32_t q_lo = 0, q_hi = 0;
    if (mask.segments) {
        const int count = min(BR, t - q0);
        uint32_t lo = 0xffffffffu, hi = 0;
        for (int j = lane; j < count; j += 32) {
            lo = min(lo, mask.segments[q0 + j]);
            hi = max(hi, mask.segments[q0 + j]);
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            lo = min(lo, __shfl_xor_sync(0xffffffff, lo, offset));
            hi = max(hi, __shfl_xor_sync(0xffffffff, hi, offset));
        }
        q_lo = lo;
        q_hi = hi;
    }

    const int last_query = min(q0 + BR, t) - 1;
    int kt_end = (t + BC - 1) / BC;
    if (causal) kt_end = min(kt_end, last_query / BC + 1);
    const int kt_begin = window > 0 ? max(0, q0 - window + 1) / BC : 0;

    for (int kt = kt_begin; kt < kt_end; ++kt) {
        const int k0 = kt * BC;
        __syncthreads();  // the previous tile's K, V and segments are no longer read
        if (mask.segments) {
            const int count = min(BC, t - k0);
            for (int j = threadIdx.x; j < count; j += THREADS) segk[j] = mask.segments[k0 + j];
            __syncthreads();
            uint32_t k_lo, k_hi;
            warp_min_max(segk, count, k_lo, k_hi);
            if (k_hi < q_lo || k_lo > q_hi) continue;  // the same for every thread
        }
        load_tile<T, D, BC>(ks, L::LDT, k + kv_base, k0, t);
        load_tile<T, D, BC>(vs, L::LDT, v + kv_base, k0, t);
        __syncthreads();

        // S = Q K^T for the warp's 16 rows, staged as f32
#pragma unroll
        for (int j = 0; j < BC / 16; ++j) {
            FragC s;
            wmma::fill_fragment(s, 0.f);
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                FragBT<T> kf;
                wmma::load_matrix_sync(kf, ks + j * 16 * L::LDT + kk * 16, L::LDT);
                wmma::mma_sync(s, qf[kk], kf, s);
            }
            wmma::store_matrix_sync(ss + warp * 16 * L::LDS + j * 16, s, L::LDS,
                                    wmma::mem_row_major);
        }
        __syncwarp();

        // online softmax of row r, this lane's 32 keys
        const float* srow = ss + (warp * 16 + r) * L::LDS + half * 32;
        T* prow = ps + (warp * 16 + r) * L::LDP + half * 32;
        const int key0 = k0 + half * 32;
        float tile_max = -INFINITY;
#pragma unroll 8
        for (int c = 0; c < 32; ++c) {
            const int key = key0 + c;
            const uint32_t seg_k = mask.segments ? segk[key - k0] : 0u;
            if (mask.visible(query, key, seg_q, seg_k)) tile_max = fmaxf(tile_max, srow[c] * scale2);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
        const float m_new = fmaxf(m, tile_max);
        const float alpha = m == -INFINITY ? 0.f : exp2f(m - m_new);
        float sum = 0.f;
#pragma unroll 8
        for (int c = 0; c < 32; ++c) {
            const int key = key0 + c;
            const uint32_t seg_k = mask.segments ? segk[key - k0] : 0u;
            float p = 0.f;
            if (mask.visible(query, key, seg_q, seg_k)) p = exp2f(srow[c] * scale2 - m_new);
            sum += p;
            prow[c] = from_float<T>(p);
        }
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        l = l * alpha + sum;
        m = m_new;
        if (half == 0) row_factor[warp * 16 + r] = alpha;
        __syncwarp();

        // O = O * alpha + P V
#pragma unroll
        for (int n = 0; n < D / 16; ++n) {
#pragma unroll
            for (int i = 0; i < acc[n].num_elements; ++i)
                acc[n].x[i] *= row_factor[warp * 16 + row_of(idx, i)];
        }
        FragA<T> pf[BC / 16];
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk)
            wmma::load_matrix_sync(pf[kk], ps + warp * 16 * L::LDP + kk * 16, L::LDP);
#pragma unroll
        for (int n = 0; n < D / 16; ++n) {
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) {
                FragB<T> vf;
                wmma::load_matrix_sync(vf, vs + kk * 16 * L::LDT + n * 16, L::LDT);
                wmma::mma_sync(acc[n], pf[kk], vf, acc[n]);
            }
        }
        __syncwarp();  // row_factor and P are rewritten by the next tile
    }

    // O / l and lse; a row that saw no key has l = 0: O = 0, lse = +inf (its P is 0)
    if (half == 0) {
        row_factor[warp * 16 + r] = l > 0.f ? 1.f / l : 0.f;
        if (query < t) lse[static_cast<size_t>(bh) * t + query] = l > 0.f ? (m + log2f(l)) * LN2 : INFINITY;
    }
    __syncwarp();
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
#pragma unroll
        for (int i = 0; i < acc[n].num_elements; ++i) {
            const int row = row_of(idx, i), col = col_of(idx, i);
            const int qrow = q0 + warp * 16 + row;
            if (qrow < t)
                o[q_base + static_cast<size_t>(qrow) * D + n * 16 + col] =
                    from_float<T>(acc[n].x[i] * row_factor[warp * 16 + row]);
        }
    }
}

template <typename T, int D>
__device__ void backward(const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const T* __restrict__ dout,
                         const float* __restrict__ lse, const float* __restrict__ delta,
                         const uint32_t* __restrict__ segments, float* __restrict__ dq,
                         T* __restrict__ dk, T* __restrict__ dv, int h, int kv_h, int t,
                         float scale, int causal, int window) {
    using L = BwdSmem<T, D>;
    extern __shared__ __align__(128) unsigned char smem[];
    T* ks = reinterpret_cast<T*>(smem + L::K);
    T* vs = reinterpret_cast<T*>(smem + L::V);
    T* qs = reinterpret_cast<T*>(smem + L::Q);
    T* dos = reinterpret_cast<T*>(smem + L::DO);
    T* ps = reinterpret_cast<T*>(smem + L::P);
    T* dss = reinterpret_cast<T*>(smem + L::DS);
    float* lse_s = reinterpret_cast<float*>(smem + L::LSE);
    float* delta_s = reinterpret_cast<float*>(smem + L::DELTA);
    uint32_t* segq = reinterpret_cast<uint32_t*>(smem + L::SEGQ);
    uint32_t* segk = reinterpret_cast<uint32_t*>(smem + L::SEGK);
    float* table = reinterpret_cast<float*>(smem + L::IDX);

    const int warp = threadIdx.x >> 5;
    const int k0 = blockIdx.x * BC;
    const int bkv = blockIdx.y, b = bkv / kv_h, kvh = bkv % kv_h;
    const int group = h / kv_h;
    const size_t kv_base = static_cast<size_t>(bkv) * t * D;
    const Mask mask{t, causal, window, segments ? segments + static_cast<size_t>(b) * t : nullptr};
    const float scale2 = scale * LOG2E;

    load_tile<T, D, BC>(ks, L::LDT, k + kv_base, k0, t);
    load_tile<T, D, BC>(vs, L::LDT, v + kv_base, k0, t);
    fill_index_table(table);
    const int key_count = min(BC, t - k0);
    if (mask.segments) {
        for (int j = threadIdx.x; j < BC; j += THREADS)
            segk[j] = j < key_count ? mask.segments[k0 + j] : 0u;
    }
    __syncthreads();
    FragC idx;
    wmma::load_matrix_sync(idx, table, 16, wmma::mem_row_major);
    uint32_t k_lo = 0, k_hi = 0;
    if (mask.segments) warp_min_max(segk, key_count, k_lo, k_hi);

    FragC dk_acc[D / 16], dv_acc[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
        wmma::fill_fragment(dk_acc[n], 0.f);
        wmma::fill_fragment(dv_acc[n], 0.f);
    }

    const int last_key = k0 + key_count - 1;
    const int qt_begin = causal ? k0 / BR : 0;
    int qt_end = (t + BR - 1) / BR;
    if (window > 0) qt_end = min(qt_end, (last_key + window - 1) / BR + 1);
    const int key_w = k0 + warp * 16;  // the warp's first key

    for (int g = 0; g < group; ++g) {
        const int bh = b * h + kvh * group + g;
        const size_t q_base = static_cast<size_t>(bh) * t * D;
        for (int qt = qt_begin; qt < qt_end; ++qt) {
            const int q0 = qt * BR;
            const int query_count = min(BR, t - q0);
            __syncthreads();  // the previous tile's Q, dO, P, dS, lse and delta are no longer read
            for (int j = threadIdx.x; j < BR; j += THREADS) {
                const bool in = j < query_count;
                lse_s[j] = in ? lse[static_cast<size_t>(bh) * t + q0 + j] * LOG2E : INFINITY;
                delta_s[j] = in ? delta[static_cast<size_t>(bh) * t + q0 + j] : 0.f;
                if (mask.segments) segq[j] = in ? mask.segments[q0 + j] : 0u;
            }
            if (mask.segments) {
                __syncthreads();
                uint32_t q_lo, q_hi;
                warp_min_max(segq, query_count, q_lo, q_hi);
                if (k_hi < q_lo || k_lo > q_hi) continue;  // the same for every thread
            }
            load_tile<T, D, BR>(qs, L::LDT, q + q_base, q0, t);
            load_tile<T, D, BR>(dos, L::LDT, dout + q_base, q0, t);
            __syncthreads();

            // P^T and dS^T for the warp's 16 keys, 16 queries at a time
#pragma unroll
            for (int j = 0; j < BR / 16; ++j) {
                FragC s, dp;
                wmma::fill_fragment(s, 0.f);
                wmma::fill_fragment(dp, 0.f);
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    FragA<T> kf, vf;
                    FragBT<T> qf, dof;
                    wmma::load_matrix_sync(kf, ks + warp * 16 * L::LDT + kk * 16, L::LDT);
                    wmma::load_matrix_sync(qf, qs + j * 16 * L::LDT + kk * 16, L::LDT);
                    wmma::mma_sync(s, kf, qf, s);
                    wmma::load_matrix_sync(vf, vs + warp * 16 * L::LDT + kk * 16, L::LDT);
                    wmma::load_matrix_sync(dof, dos + j * 16 * L::LDT + kk * 16, L::LDT);
                    wmma::mma_sync(dp, vf, dof, dp);
                }
#pragma unroll
                for (int i = 0; i < s.num_elements; ++i) {
                    const int row = row_of(idx, i), col = col_of(idx, i);
                    const int key = key_w + row, qc = j * 16 + col, query = q0 + qc;
                    const uint32_t seg_k = mask.segments ? segk[warp * 16 + row] : 0u;
                    const uint32_t seg_q = mask.segments ? segq[qc] : 0u;
                    float p = 0.f;
                    if (mask.visible(query, key, seg_q, seg_k))
                        p = exp2f(s.x[i] * scale2 - lse_s[qc]);
                    const float ds = p * (dp.x[i] - delta_s[qc]);
                    ps[(warp * 16 + row) * L::LDP + qc] = from_float<T>(p);
                    dss[(warp * 16 + row) * L::LDP + qc] = from_float<T>(ds);
                }
            }
            __syncwarp();

            // dV += P^T dO, dK += dS^T Q (scaled at the end)
#pragma unroll
            for (int kk = 0; kk < BR / 16; ++kk) {
                FragA<T> pf, dsf;
                wmma::load_matrix_sync(pf, ps + warp * 16 * L::LDP + kk * 16, L::LDP);
                wmma::load_matrix_sync(dsf, dss + warp * 16 * L::LDP + kk * 16, L::LDP);
#pragma unroll
                for (int n = 0; n < D / 16; ++n) {
                    FragB<T> dof, qf;
                    wmma::load_matrix_sync(dof, dos + kk * 16 * L::LDT + n * 16, L::LDT);
                    wmma::mma_sync(dv_acc[n], pf, dof, dv_acc[n]);
                    wmma::load_matrix_sync(qf, qs + kk * 16 * L::LDT + n * 16, L::LDT);
                    wmma::mma_sync(dk_acc[n], dsf, qf, dk_acc[n]);
                }
            }
            __syncthreads();  // every warp's dS^T rows are written

            // dQ (queries of warp w) += dS K * scale, into the f32 buffer
            FragAT<T> dsf[BC / 16];
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk)
                wmma::load_matrix_sync(dsf[kk], dss + kk * 16 * L::LDP + warp * 16, L::LDP);
#pragma unroll
            for (int n = 0; n < D / 16; ++n) {
                FragC dq_acc;
                wmma::fill_fragment(dq_acc, 0.f);
#pragma unroll
                for (int kk = 0; kk < BC / 16; ++kk) {
                    FragB<T> kf;
                    wmma::load_matrix_sync(kf, ks + kk * 16 * L::LDT + n * 16, L::LDT);
                    wmma::mma_sync(dq_acc, dsf[kk], kf, dq_acc);
                }
#pragma unroll
                for (int i = 0; i < dq_acc.num_elements; ++i) {
                    const int row = row_of(idx, i), col = col_of(idx, i);
                    const int query = q0 + warp * 16 + row;
                    if (query < t)
                        atomicAdd(dq + q_base + static_cast<size_t>(query) * D + n * 16 + col,
                                  dq_acc.x[i] * scale);
                }
            }
        }
    }

    // every (key, column) of the tile is written, zeros where no query sees the key
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
#pragma unroll
        for (int i = 0; i < dk_acc[n].num_elements; ++i) {
            const int row = row_of(idx, i), col = col_of(idx, i);
            const int key = key_w + row;
            if (key < t) {
                const size_t at = kv_base + static_cast<size_t>(key) * D + n * 16 + col;
                dk[at] = from_float<T>(dk_acc[n].x[i] * scale);
                dv[at] = from_float<T>(dv_acc[n].x[i]);
            }
        }
    }
}

// delta[row] = sum_d dO[row, d] * O[row, d] in f32, one warp per row of d elements.
template <typename T>
__device__ void backward_delta(const T* __restrict__ out, const T* __restrict__ dout,
                               float* __restrict__ delta, int rows, int d) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const T* o = out + static_cast<size_t>(row) * d;
    const T* g = dout + static_cast<size_t>(row) * d;
    float sum = 0.f;
    for (int j = lane; j < d; j += 32) sum += to_float(o[j]) * to_float(g[j]);
    sum = warp_sum(sum);
    if (lane == 0) delta[row] = sum;
}

}  // namespace flash

#define FLASH(T, NAME, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(flash::THREADS) flash_fwd_d##D##_##NAME(        \
        const T* q, const T* k, const T* v, T* o, float* lse, const uint32_t* segments, int h,   \
        int kv_h, int t, float scale, int causal, int window) {                                  \
        flash::forward<T, D>(q, k, v, o, lse, segments, h, kv_h, t, scale, causal, window);      \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(flash::THREADS) flash_bwd_d##D##_##NAME(        \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, \
        const uint32_t* segments, float* dq, T* dk, T* dv, int h, int kv_h, int t, float scale,  \
        int causal, int window) {                                                                 \
        flash::backward<T, D>(q, k, v, dout, lse, delta, segments, dq, dk, dv, h, kv_h, t,       \
                              scale, causal, window);                                             \
    }

#define FLASH_DELTA(T, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        flash_bwd_delta_##NAME(const T* out, const T* dout, float* delta, int rows, int d) {     \
        flash::backward_delta<T>(out, dout, delta, rows, d);                                     \
    }

FLASH(__nv_bfloat16, bf16, 64)
FLASH(__nv_bfloat16, bf16, 128)
FLASH(__half, f16, 64)
FLASH(__half, f16, 128)
FLASH_DELTA(__nv_bfloat16, bf16)
FLASH_DELTA(__half, f16)
