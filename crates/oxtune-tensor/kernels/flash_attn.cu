// FlashAttention-2 forward and backward for training (t_q == t_k, no KV cache), bf16 and
// f16, head_dim 64 or 128, on tensor cores through inline-PTX mma.sync m16n8k16 (f32
// accumulators) with ldmatrix fragment loads and cp.async tile copies.
//
// Shapes: q, o, dO, dQ (b, h, t, D); k, v, dK, dV (b, kv_h, t, D); query head hh reads kv
// head hh / (h / kv_h) (grouped-query attention, nothing repeated in memory); lse, delta
// (b, h, t) f32, contiguous; segments (b, t) u32 or null. Query i sees key j when j < t,
// j <= i if causal, i - j < window if window > 0, and segments[i] == segments[j] if given.
// Layouts: every tensor of (b, heads, t, D) is addressed through its own element strides
// (batch, head, token) (`Strides`, all of them in one `Layouts` argument) with D contiguous,
// so one kernel reads and writes (b, h, t, D) (heads first: token stride D) and (b, t, h, D)
// (positions first: token stride h * D, or more for a head-narrow of a packed q|k|v
// projection) alike. The host (src/cuda/flash.rs) passes strides and start offsets that are
// multiples of 8 elements, so every row is 16-byte aligned for cp.async and ldmatrix; the
// kernels check it again and fall back to element loads and stores otherwise. Offsets are
// 64-bit (b * t * h * D passes 2^31 at large shapes).
//
// Fragments of mma.m16n8k16 (PTX ISA), lane = 4 * g + c (g = lane / 4, c = lane % 4), each
// 32-bit register holding two consecutive-column elements (the lower column in the low half):
//   A (16 x 16, row major) a0: (g, 2c..2c+1)  a1: (g+8, 2c..)  a2: (g, 2c+8..)  a3: (g+8, 2c+8..)
//   B (16 x 8, k x n)      b0: (k 2c..2c+1, n g)                b1: (k 2c+8..2c+9, n g)
//   C (16 x 8, f32)        c0, c1: (g, 2c), (g, 2c+1)           c2, c3: (g+8, 2c), (g+8, 2c+1)
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i
// and register i of lane l holds row l/4, columns 2(l%4)..+1 of matrix i (.trans: column l/4,
// rows 2(l%4)..+1, i.e. the transposed matrix). So:
//   A from a row-major [row][k] tile: lane l points at row (l & 15), column 8 * (l >> 4).
//   B from a [n][k] tile (K for Q K^T): n = (l & 7) + 8 * (l >> 4), k = 8 * ((l >> 3) & 1);
//     registers 0, 1 are (b0, b1) of n-tile 0, registers 2, 3 those of n-tile 1.
//   B from a [k][n] tile (V for P V), .trans: k = (l & 7) + 8 * ((l >> 3) & 1), n = 8 * (l >> 4);
//     registers 0, 1 are (b0, b1) of n-tile 0, registers 2, 3 those of n-tile 1.
//   A from a [k][row] tile (dS^T for dS K), .trans: k = (l & 7) + 8 * (l >> 4),
//     row = 8 * ((l >> 3) & 1); registers 0..3 are a0..a3.
// An accumulator over keys (n-tiles 2kk, 2kk+1 of S) is the A operand of k-step kk of P V:
// a0 = (S[2kk].c0, c1), a1 = (S[2kk].c2, c3), a2 = (S[2kk+1].c0, c1), a3 = (S[2kk+1].c2, c3),
// rounded to the dtype (the FA2 register trick: P never goes through shared memory).
// Tiles in shared memory have rows of D + 8 elements: a 16-byte aligned row stride that is 4
// banks off a multiple of 128 bytes, so the 8 rows of an ldmatrix matrix hit distinct banks.
//
// Grids put the heads along x and the tiles along y, heaviest tiles first (the last query
// tiles in the forward, the first key tiles in the backward, when causal), so the blocks
// launch heaviest first over all heads and the uneven causal triangle packs onto the SMs.
//
// Forward (flash_fwd): one block of 4 warps per (64 queries, b * h); each warp owns 16 query
// rows and keeps its Q fragments and its O accumulator (16 x D, f32) in registers while it
// walks the key tiles of 64: S = Q K^T in registers, the online softmax on the accumulators
// (each row's max and sum over the 4 lanes of a quad by two shuffles; running max m in the
// log2 domain, log2(e) folded into the scale; each lane keeps a partial row sum, summed over
// the quad at the end), P rounded to the dtype, O = O * exp(m_old - m_new) + P V. K and V have
// one buffer each, filled by cp.async as in FA2: V of this tile loads during Q K^T, K of the
// next tile during the softmax and P V. Key tiles above the causal diagonal, before the
// sliding window, or whose segment range cannot meet the query tile's are skipped whole;
// the mask is evaluated only on tiles where it can hide something (the diagonal, the tail,
// the window's edge, tiles spanning more than one segment: in a batch of unpacked rows, whose
// segments are all one, never), in the backward as well. Writes O / l in the dtype (staged through the Q tile for
// 16-byte stores) and lse = m + log(l) (natural log, of the scaled scores; +inf for a row
// that sees nothing, whose O is 0).
//
// Backward: flash_bwd_delta computes delta_i = sum_d dO_i * O_i (one warp per row). Then
// flash_bwd runs one block of 4 warps per (64 keys, b * kv_h); each warp owns 16 keys and
// keeps their dK and dV accumulators (f32) in registers over every query head of the group
// and every query tile that can see them (so dK/dV of a kv head are summed over its query
// heads with no atomics and no reduction pass). Q and dO tiles are double-buffered with
// cp.async (the next visible tile loads while this one computes). Per 16 queries: S^T = K Q^T
// and dP^T = V dO^T in registers, P^T = exp2(S^T * scale * log2(e) - lse * log2(e)),
// dS^T = P^T * (dP^T - delta), both turned into A fragments in registers for dV += P^T dO and
// dK += dS^T Q (scaled at the end); dS^T also goes to shared memory, from which each warp
// computes dQ (its 16 queries) += dS K * scale, accumulated with f32x2 atomicAdd into a
// zeroed (b, h, t, D) f32 buffer.
#include "common.cuh"

namespace flash {

constexpr int BR = 64;        // queries per tile
constexpr int BC = 64;        // keys per tile
constexpr int THREADS = 128;  // 4 warps of 16 rows
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Element strides of one (b, heads, t, D) tensor; D has stride 1. The token stride is an
// int (the host checks it fits), so a row's offset is one 32 x 32 -> 64-bit multiply.
struct Strides {
    long long batch, head;
    int token, unused;
    // the offset of row 0 of (batch b, head hh)
    __device__ __forceinline__ long long at(int b, int hh) const {
        return b * batch + hh * head;
    }
    // the offset of row `row` from row 0 of its (batch, head)
    __device__ __forceinline__ long long row(int row) const {
        return static_cast<long long>(row) * token;
    }
    // whether every row of a tensor starting at p is 16-byte aligned (8 elements of 2 bytes)
    __device__ __forceinline__ bool rows_aligned(const void* p) const {
        return aligned16(p) && ((batch | head | token) & 7) == 0;
    }
};

// The strides of every tensor of the module, one argument for the three kernels (each reads
// its own): src/cuda/flash.rs `Layouts`, the same 192 bytes. dq is the f32 accumulator of the
// backward (strides in f32 elements).
struct Layouts {
    Strides q, k, v, o, dout, dq, dk, dv;
};
static_assert(sizeof(Layouts) == 192, "the host's Layouts");

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
// padded by 8 elements (16 bytes) against bank conflicts.
template <typename T, int D> struct FwdSmem {
    static constexpr int LDT = D + 8;  // Q, K, V tiles (T)
    static constexpr int Q = 0;
    static constexpr int K = Q + BR * LDT * 2;
    static constexpr int V = K + BC * LDT * 2;
    static constexpr int BYTES = V + BC * LDT * 2;
};

template <typename T, int D> struct BwdSmem {
    static constexpr int LDT = D + 8;   // K, V, Q, dO tiles (T)
    static constexpr int LDP = BR + 8;  // dS^T (T), keys x queries
    static constexpr int TILE = BR * LDT * 2;
    static constexpr int K = 0;
    static constexpr int V = K + BC * LDT * 2;
    static constexpr int Q = V + BC * LDT * 2;  // two buffers
    static constexpr int DO = Q + 2 * TILE;     // two buffers
    static constexpr int DS = DO + 2 * TILE;
    static constexpr int BYTES = DS + BC * LDP * 2;
};

// ---- PTX wrappers ----

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zeros when !valid (nothing is read then).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// c += a b (m16n8k16, f32 accumulators)
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1);
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// p[0] += x, p[1] += y as one relaxed 8-byte atomic reduction (sm_90; p 8-byte aligned)
__device__ __forceinline__ void red_add2(float* p, float x, float y) {
    asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y)
                 : "memory");
}

// two f32 as a pair of T in one register, lo in the low half
template <typename T> __device__ __forceinline__ uint32_t pack(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// rows [row0, row0 + ROWS) of a (t, D) matrix with rows `stride` elements apart into a tile
// with rows of D + 8 elements; rows at or past t are zeros. cp.async when `vector` (every row
// of the source is 16-byte aligned), plain loads and stores otherwise. The caller commits the
// group.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int row0, int t,
                                          int stride, bool vector) {
    constexpr int LD = D + 8;
    constexpr int V = 8;  // elements of a 16-byte vector
    constexpr int PER_ROW = D / V;
    static_assert((ROWS * PER_ROW) % THREADS == 0, "whole vectors per thread");
#pragma unroll
    for (int i = 0; i < ROWS * PER_ROW / THREADS; ++i) {
        const int c = static_cast<int>(threadIdx.x) + i * THREADS;
        const int r = c / PER_ROW, col = (c % PER_ROW) * V;
        const int row = row0 + r;
        const bool in = row < t;
        const T* from = src + static_cast<long long>(in ? row : 0) * stride + col;
        if (vector) {
            cp_async16(dst + r * LD + col, from, in);
        } else {
            uint4 value = make_uint4(0, 0, 0, 0);
            if (in) {
                T* e = reinterpret_cast<T*>(&value);
#pragma unroll
                for (int u = 0; u < V; ++u) e[u] = from[u];
            }
            *reinterpret_cast<uint4*>(dst + r * LD + col) = value;
        }
    }
}

// (min, max) of seg[0..count) over the warp, read from global memory, returned to every lane
// (every lane of the warp must call it).
__device__ __forceinline__ void warp_min_max(const uint32_t* seg, int count, uint32_t& lo,
                                             uint32_t& hi) {
    const int lane = threadIdx.x & 31;
    lo = 0xffffffffu;
    hi = 0;
    for (int j = lane; j < count; j += 32) {
        const uint32_t s = __ldg(seg + j);
        lo = min(lo, s);
        hi = max(hi, s);
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
                        const uint32_t* __restrict__ segments, const Layouts& layouts, int h,
                        int kv_h, int t, float scale, int causal, int window) {
    using L = FwdSmem<T, D>;
    constexpr int LD = L::LDT;
    extern __shared__ __align__(128) unsigned char smem[];
    T* qs = reinterpret_cast<T*>(smem + L::Q);
    T* ks = reinterpret_cast<T*>(smem + L::K);
    T* vs = reinterpret_cast<T*>(smem + L::V);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    // the last query tiles first: under a causal mask they see the most keys, so the longest
    // blocks start early and short ones fill the tail
    // heads along x, query tiles along y from the last (the heaviest when causal)
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BR;
    const int bh = blockIdx.x, b = bh / h, hh = bh % h;
    const int kvh = hh / (h / kv_h);
    const Mask mask{t, causal, window, segments ? segments + static_cast<size_t>(b) * t : nullptr};
    const float scale2 = scale * LOG2E;
    const T* qg = q + layouts.q.at(b, hh);
    const T* kg = k + layouts.k.at(b, kvh);
    const T* vg = v + layouts.v.at(b, kvh);
    const int q_ld = layouts.q.token, k_ld = layouts.k.token, v_ld = layouts.v.token;
    const bool vector = layouts.q.rows_aligned(q) && layouts.k.rows_aligned(k) &&
                        layouts.v.rows_aligned(v);

    load_tile<T, D, BR>(qs, qg, q0, t, q_ld, vector);
    cp_async_commit();

    // the query tile's segment range (every warp computes it)
    uint32_t q_lo = 0, q_hi = 0;
    if (mask.segments) warp_min_max(mask.segments + q0, min(BR, t - q0), q_lo, q_hi);
    // whether key tile kt can be skipped for its segments (the same answer in every thread)
    auto segments_apart = [&](int kt) {
        if (!mask.segments) return false;
        uint32_t k_lo, k_hi;
        warp_min_max(mask.segments + kt * BC, min(BC, t - kt * BC), k_lo, k_hi);
        return k_hi < q_lo || k_lo > q_hi;
    };
    // whether key tile kt and the query tile lie in one segment, so that the segments hide
    // nothing there (a batch of unpacked rows: every tile); uniform over the block
    auto one_segment = [&](int kt) {
        if (!mask.segments) return true;
        if (q_lo != q_hi) return false;
        uint32_t k_lo, k_hi;
        warp_min_max(mask.segments + kt * BC, min(BC, t - kt * BC), k_lo, k_hi);
        return k_lo == q_lo && k_hi == q_lo;
    };

    const int last_query = min(q0 + BR, t) - 1;
    int kt_end = (t + BC - 1) / BC;
    if (causal) kt_end = min(kt_end, last_query / BC + 1);
    int kt = window > 0 ? max(0, q0 - window + 1) / BC : 0;
    while (kt < kt_end && segments_apart(kt)) ++kt;
    if (kt < kt_end) load_tile<T, D, BC>(ks, kg, kt * BC, t, k_ld, vector);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // the warp's 16 rows of Q as A fragments, one per 16 columns
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
        ldmatrix_x4(qf[kk], qs + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);

    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

    // this thread's rows: g and g + 8 of the warp's 16
    const int row0 = q0 + warp * 16 + g, row1 = row0 + 8;
    const uint32_t seg_q0 = (mask.segments && row0 < t) ? mask.segments[row0] : 0u;
    const uint32_t seg_q1 = (mask.segments && row1 < t) ? mask.segments[row1] : 0u;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

    // B fragments of K (n = key, k = column) and V (.trans: k = key, n = column): this lane's
    // row and column offsets inside a 16 x 16 block
    const int kb_row = (lane & 7) + ((lane >> 4) << 3), kb_col = ((lane >> 3) & 1) * 8;
    const int vb_row = (lane & 7) + (((lane >> 3) & 1) << 3), vb_col = (lane >> 4) * 8;

    while (kt < kt_end) {
        const int k0 = kt * BC;
        load_tile<T, D, BC>(vs, vg, k0, t, v_ld, vector);
        cp_async_commit();

        // S = Q K^T, 16 x BC: n-tile j holds keys k0 + 8j ..
        float s[BC / 8][4];
#pragma unroll
        for (int j = 0; j < BC / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
        for (int np = 0; np < BC / 16; ++np) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t kb[4];
                ldmatrix_x4(kb, ks + (np * 16 + kb_row) * LD + kk * 16 + kb_col);
                mma<T>(s[2 * np], qf[kk], kb[0], kb[1]);
                mma<T>(s[2 * np + 1], qf[kk], kb[2], kb[3]);
            }
        }
        cp_async_wait<0>();  // V of this tile
        __syncthreads();     // ... seen by every thread; every warp is done reading K

        int next = kt + 1;
        while (next < kt_end && segments_apart(next)) ++next;
        if (next < kt_end) load_tile<T, D, BC>(ks, kg, next * BC, t, k_ld, vector);
        cp_async_commit();

        // scores in the log2 domain; the mask only where it can hide something
        const bool masked = (causal && k0 + BC - 1 > q0) || k0 + BC > t ||
                            (window > 0 && q0 + BR - 1 - k0 >= window) || !one_segment(kt);
#pragma unroll
        for (int j = 0; j < BC / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] *= scale2;
        if (masked) {
#pragma unroll
            for (int j = 0; j < BC / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = k0 + j * 8 + 2 * c + e;
                    const uint32_t seg_k =
                        (mask.segments && key < t) ? __ldg(mask.segments + key) : 0u;
                    if (!mask.visible(row0, key, seg_q0, seg_k)) s[j][e] = -INFINITY;
                    if (!mask.visible(row1, key, seg_q1, seg_k)) s[j][e + 2] = -INFINITY;
                }
            }
        }

        // online softmax of rows g and g + 8 over the quad
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < BC / 8; ++j) {
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
#pragma unroll
        for (int offset = 1; offset <= 2; offset <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, offset));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, offset));
        }
        const float new0 = fmaxf(m0, mx0), new1 = fmaxf(m1, mx1);
        // a row that has seen nothing yet keeps m = -inf; subtract 0 then (its scores are
        // -inf, so its P is 0, and alpha = exp2(-inf) = 0)
        const float use0 = new0 == -INFINITY ? 0.f : new0;
        const float use1 = new1 == -INFINITY ? 0.f : new1;
        const float alpha0 = exp2f(m0 - use0), alpha1 = exp2f(m1 - use1);
        m0 = new0;
        m1 = new1;
        l0 *= alpha0;
        l1 *= alpha1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            acc[n][0] *= alpha0;
            acc[n][1] *= alpha0;
            acc[n][2] *= alpha1;
            acc[n][3] *= alpha1;
        }
#pragma unroll
        for (int j = 0; j < BC / 8; ++j) {
            s[j][0] = exp2f(s[j][0] - use0);
            s[j][1] = exp2f(s[j][1] - use0);
            s[j][2] = exp2f(s[j][2] - use1);
            s[j][3] = exp2f(s[j][3] - use1);
            l0 += s[j][0] + s[j][1];
            l1 += s[j][2] + s[j][3];
        }

        // O += P V, P from the S accumulators, 16 keys per k-step
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            uint32_t pa[4];
            pa[0] = pack<T>(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack<T>(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, vs + (kk * 16 + vb_row) * LD + np * 16 + vb_col);
                mma<T>(acc[2 * np], pa, vb[0], vb[1]);
                mma<T>(acc[2 * np + 1], pa, vb[2], vb[3]);
            }
        }
        cp_async_wait<0>();  // K of the next tile
        __syncthreads();     // ... seen by every thread; every warp is done reading V
        kt = next;
    }

    // O / l and lse; a row that saw no key has l = 0: O = 0, lse = +inf
#pragma unroll
    for (int offset = 1; offset <= 2; offset <<= 1) {
        l0 += __shfl_xor_sync(0xffffffff, l0, offset);
        l1 += __shfl_xor_sync(0xffffffff, l1, offset);
    }
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    if (c == 0) {
        if (row0 < t) lse[static_cast<size_t>(bh) * t + row0] = l0 > 0.f ? (m0 + log2f(l0)) * LN2 : INFINITY;
        if (row1 < t) lse[static_cast<size_t>(bh) * t + row1] = l1 > 0.f ? (m1 + log2f(l1)) * LN2 : INFINITY;
    }
    // the warp's own 16 rows of the Q tile (read only by this warp, before the loop) stage O
    T* stage = qs + warp * 16 * LD;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<uint32_t*>(stage + g * LD + n * 8 + 2 * c) =
            pack<T>(acc[n][0] * inv0, acc[n][1] * inv0);
        *reinterpret_cast<uint32_t*>(stage + (g + 8) * LD + n * 8 + 2 * c) =
            pack<T>(acc[n][2] * inv1, acc[n][3] * inv1);
    }
    __syncwarp();
    constexpr int PER_ROW = D / 8;
    T* og = o + layouts.o.at(b, hh);
    const bool o_vector = layouts.o.rows_aligned(o);
#pragma unroll
    for (int u = 0; u < 16 * PER_ROW / 32; ++u) {
        const int i = lane + u * 32;
        const int r = i / PER_ROW, col = (i % PER_ROW) * 8;
        const int row = q0 + warp * 16 + r;
        if (row >= t) continue;
        const uint4 value = *reinterpret_cast<const uint4*>(stage + r * LD + col);
        T* to = og + layouts.o.row(row) + col;
        if (o_vector) {
            *reinterpret_cast<uint4*>(to) = value;
        } else {
            const T* e = reinterpret_cast<const T*>(&value);
#pragma unroll
            for (int u = 0; u < 8; ++u) to[u] = e[u];
        }
    }
}

template <typename T, int D>
__device__ void backward(const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const T* __restrict__ dout,
                         const float* __restrict__ lse, const float* __restrict__ delta,
                         const uint32_t* __restrict__ segments, float* __restrict__ dq,
                         T* __restrict__ dk, T* __restrict__ dv, const Layouts& layouts, int h,
                         int kv_h, int t, float scale, int causal, int window) {
    using L = BwdSmem<T, D>;
    constexpr int LD = L::LDT;
    constexpr int LDP = L::LDP;
    extern __shared__ __align__(128) unsigned char smem[];
    T* ks = reinterpret_cast<T*>(smem + L::K);
    T* vs = reinterpret_cast<T*>(smem + L::V);
    T* dss = reinterpret_cast<T*>(smem + L::DS);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    // heads along x, key tiles along y from the first (the heaviest when causal)
    const int k0 = blockIdx.y * BC;
    const int bkv = blockIdx.x, b = bkv / kv_h, kvh = bkv % kv_h;
    const int group = h / kv_h;
    const Mask mask{t, causal, window, segments ? segments + static_cast<size_t>(b) * t : nullptr};
    const float scale2 = scale * LOG2E;
    const bool vector = layouts.q.rows_aligned(q) && layouts.k.rows_aligned(k) &&
                        layouts.v.rows_aligned(v) && layouts.dout.rows_aligned(dout);

    load_tile<T, D, BC>(ks, k + layouts.k.at(b, kvh), k0, t, layouts.k.token, vector);
    load_tile<T, D, BC>(vs, v + layouts.v.at(b, kvh), k0, t, layouts.v.token, vector);
    cp_async_commit();

    const int key_count = min(BC, t - k0);
    uint32_t k_lo = 0, k_hi = 0;
    if (mask.segments) warp_min_max(mask.segments + k0, key_count, k_lo, k_hi);
    // this thread's keys: rows g and g + 8 of the warp's 16
    const int key0 = k0 + warp * 16 + g, key1 = key0 + 8;
    const uint32_t seg_k0 = (mask.segments && key0 < t) ? mask.segments[key0] : 0u;
    const uint32_t seg_k1 = (mask.segments && key1 < t) ? mask.segments[key1] : 0u;

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            dk_acc[n][e] = 0.f;
            dv_acc[n][e] = 0.f;
        }

    const int last_key = k0 + key_count - 1;
    const int qt_begin = causal ? k0 / BR : 0;
    int qt_end = (t + BR - 1) / BR;
    if (window > 0) qt_end = min(qt_end, (last_key + window - 1) / BR + 1);
    const int tiles = max(qt_end - qt_begin, 0);
    const int items = group * tiles;  // item i: query head g0 + i / tiles, tile qt_begin + i % tiles
    // whether item i's query tile can meet the key tile's segments (the same in every thread)
    auto meets = [&](int i) {
        if (!mask.segments) return true;
        const int q0 = (qt_begin + i % tiles) * BR;
        uint32_t q_lo, q_hi;
        warp_min_max(mask.segments + q0, min(BR, t - q0), q_lo, q_hi);
        return !(k_hi < q_lo || k_lo > q_hi);
    };
    // whether item i's query tile and the key tile lie in one segment, so that the segments
    // hide nothing there (a batch of unpacked rows: every tile); uniform over the block
    auto one_segment = [&](int i) {
        if (!mask.segments) return true;
        if (k_lo != k_hi) return false;
        const int q0 = (qt_begin + i % tiles) * BR;
        uint32_t q_lo, q_hi;
        warp_min_max(mask.segments + q0, min(BR, t - q0), q_lo, q_hi);
        return q_lo == k_lo && q_hi == k_lo;
    };
    auto issue = [&](int i, int buf) {
        const int q0 = (qt_begin + i % tiles) * BR;
        const int hq = kvh * group + i / tiles;  // the item's query head
        load_tile<T, D, BR>(reinterpret_cast<T*>(smem + L::Q + buf * L::TILE),
                            q + layouts.q.at(b, hq), q0, t, layouts.q.token, vector);
        load_tile<T, D, BR>(reinterpret_cast<T*>(smem + L::DO + buf * L::TILE),
                            dout + layouts.dout.at(b, hq), q0, t, layouts.dout.token, vector);
    };

    int item = 0;
    while (item < items && !meets(item)) ++item;
    if (item < items) issue(item, 0);
    cp_async_commit();

    // ldmatrix offsets: A from [row][k] tiles, B from [n][k] tiles, B (.trans) from [k][n]
    // tiles, A (.trans) from the [k][row] dS^T tile
    const int a_row = lane & 15, a_col = (lane >> 4) * 8;
    const int b_row = (lane & 7) + ((lane >> 4) << 3), b_col = ((lane >> 3) & 1) * 8;
    const int bt_row = (lane & 7) + (((lane >> 3) & 1) << 3), bt_col = (lane >> 4) * 8;
    const int at_row = (lane & 7) + ((lane >> 4) << 3), at_col = ((lane >> 3) & 1) * 8;

    int buf = 0;
    while (item < items) {
        int next = item + 1;
        while (next < items && !meets(next)) ++next;
        if (next < items) issue(next, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();  // K, V and this item's Q, dO
        __syncthreads();

        const T* qs = reinterpret_cast<const T*>(smem + L::Q + buf * L::TILE);
        const T* dos = reinterpret_cast<const T*>(smem + L::DO + buf * L::TILE);
        const int q0 = (qt_begin + item % tiles) * BR;
        const int hq = kvh * group + item / tiles;
        const int bh = b * h + hq;
        float* dq_head = dq + layouts.dq.at(b, hq);
        const float* lse_row = lse + static_cast<size_t>(bh) * t;
        const float* delta_row = delta + static_cast<size_t>(bh) * t;
        const bool masked = (causal && k0 + BC - 1 > q0) || q0 + BR > t || k0 + BC > t ||
                            (window > 0 && q0 + BR - 1 - k0 >= window) || !one_segment(item);

        // the warp's 16 keys against the tile's queries, 16 at a time
#pragma unroll 1
        for (int qc = 0; qc < BR / 16; ++qc) {
            float s[2][4], dp[2][4];
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[j][e] = 0.f;
                    dp[j][e] = 0.f;
                }
#pragma unroll 2  // not 8: hoisting every step's loads spills at d 128
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t a[4], bq[4];
                ldmatrix_x4(a, ks + (warp * 16 + a_row) * LD + kk * 16 + a_col);
                ldmatrix_x4(bq, qs + (qc * 16 + b_row) * LD + kk * 16 + b_col);
                mma<T>(s[0], a, bq[0], bq[1]);
                mma<T>(s[1], a, bq[2], bq[3]);
                ldmatrix_x4(a, vs + (warp * 16 + a_row) * LD + kk * 16 + a_col);
                ldmatrix_x4(bq, dos + (qc * 16 + b_row) * LD + kk * 16 + b_col);
                mma<T>(dp[0], a, bq[0], bq[1]);
                mma<T>(dp[1], a, bq[2], bq[3]);
            }
            // element (j, e): key key0 (e < 2) or key1, query q0 + qc * 16 + 8j + 2c + (e & 1)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int query = q0 + qc * 16 + j * 8 + 2 * c + e;
                    const bool in = query < t;
                    const float lse2 = in ? __ldg(lse_row + query) * LOG2E : INFINITY;
                    const float dl = in ? __ldg(delta_row + query) : 0.f;
                    const uint32_t seg_q =
                        (mask.segments && in) ? __ldg(mask.segments + query) : 0u;
                    // lse = +inf (a row that sees nothing): p = exp2(-inf) = 0
                    float p0 = exp2f(s[j][e] * scale2 - lse2);
                    float p1 = exp2f(s[j][e + 2] * scale2 - lse2);
                    if (masked) {
                        if (!mask.visible(query, key0, seg_q, seg_k0)) p0 = 0.f;
                        if (!mask.visible(query, key1, seg_q, seg_k1)) p1 = 0.f;
                    }
                    s[j][e] = p0;
                    s[j][e + 2] = p1;
                    dp[j][e] = p0 * (dp[j][e] - dl);
                    dp[j][e + 2] = p1 * (dp[j][e + 2] - dl);
                }
            }
            uint32_t pa[4], da[4];
            pa[0] = pack<T>(s[0][0], s[0][1]);
            pa[1] = pack<T>(s[0][2], s[0][3]);
            pa[2] = pack<T>(s[1][0], s[1][1]);
            pa[3] = pack<T>(s[1][2], s[1][3]);
            da[0] = pack<T>(dp[0][0], dp[0][1]);
            da[1] = pack<T>(dp[0][2], dp[0][3]);
            da[2] = pack<T>(dp[1][0], dp[1][1]);
            da[3] = pack<T>(dp[1][2], dp[1][3]);
            // dS^T rows key0, key1 (tile rows warp * 16 + g, + 8), columns qc * 16 + 8j + 2c
            T* ds_row0 = dss + (warp * 16 + g) * LDP + qc * 16 + 2 * c;
            T* ds_row1 = ds_row0 + 8 * LDP;
            *reinterpret_cast<uint32_t*>(ds_row0) = da[0];
            *reinterpret_cast<uint32_t*>(ds_row1) = da[1];
            *reinterpret_cast<uint32_t*>(ds_row0 + 8) = da[2];
            *reinterpret_cast<uint32_t*>(ds_row1 + 8) = da[3];
            // dV += P^T dO, dK += dS^T Q over these 16 queries
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
                uint32_t bt[4];
                ldmatrix_x4_trans(bt, dos + (qc * 16 + bt_row) * LD + np * 16 + bt_col);
                mma<T>(dv_acc[2 * np], pa, bt[0], bt[1]);
                mma<T>(dv_acc[2 * np + 1], pa, bt[2], bt[3]);
                ldmatrix_x4_trans(bt, qs + (qc * 16 + bt_row) * LD + np * 16 + bt_col);
                mma<T>(dk_acc[2 * np], da, bt[0], bt[1]);
                mma<T>(dk_acc[2 * np + 1], da, bt[2], bt[3]);
            }
        }
        __syncthreads();  // every warp's dS^T rows are written

        // dQ (queries q0 + 16 * warp ..) += dS K * scale: A = dS from the dS^T tile (.trans),
        // B = K (.trans, k = key)
        uint32_t dsa[BC / 16][4];
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk)
            ldmatrix_x4_trans(dsa[kk], dss + (kk * 16 + at_row) * LDP + warp * 16 + at_col);
        const int qrow0 = q0 + warp * 16 + g, qrow1 = qrow0 + 8;
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
            float dq_acc[2][4];
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) dq_acc[j][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) {
                uint32_t bt[4];
                ldmatrix_x4_trans(bt, ks + (kk * 16 + bt_row) * LD + np * 16 + bt_col);
                mma<T>(dq_acc[0], dsa[kk], bt[0], bt[1]);
                mma<T>(dq_acc[1], dsa[kk], bt[2], bt[3]);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int col = np * 16 + j * 8 + 2 * c;
                if (qrow0 < t)
                    red_add2(dq_head + layouts.dq.row(qrow0) + col, dq_acc[j][0] * scale,
                             dq_acc[j][1] * scale);
                if (qrow1 < t)
                    red_add2(dq_head + layouts.dq.row(qrow1) + col, dq_acc[j][2] * scale,
                             dq_acc[j][3] * scale);
            }
        }
        __syncthreads();  // dS^T and this buffer are rewritten by the next items
        item = next;
        buf ^= 1;
    }
    cp_async_wait<0>();

    // every (key, column) of the tile is written, zeros where no query sees the key (pairs of
    // elements: the host allocates dk and dv, 4-byte aligned with even strides)
    T* dk0 = dk + layouts.dk.at(b, kvh) + layouts.dk.row(key0);
    T* dk1 = dk + layouts.dk.at(b, kvh) + layouts.dk.row(key1);
    T* dv0 = dv + layouts.dv.at(b, kvh) + layouts.dv.row(key0);
    T* dv1 = dv + layouts.dv.at(b, kvh) + layouts.dv.row(key1);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const int col = n * 8 + 2 * c;
        if (key0 < t) {
            *reinterpret_cast<uint32_t*>(dk0 + col) = pack<T>(dk_acc[n][0] * scale, dk_acc[n][1] * scale);
            *reinterpret_cast<uint32_t*>(dv0 + col) = pack<T>(dv_acc[n][0], dv_acc[n][1]);
        }
        if (key1 < t) {
            *reinterpret_cast<uint32_t*>(dk1 + col) = pack<T>(dk_acc[n][2] * scale, dk_acc[n][3] * scale);
            *reinterpret_cast<uint32_t*>(dv1 + col) = pack<T>(dv_acc[n][2], dv_acc[n][3]);
        }
    }
}
// delta[row] = sum_d dO[row, d] * O[row, d] in f32, one warp per row of d elements; row
// (b * h + hh) * t + i of delta (b, h, t) reads O and dO at (b, hh, i) through their strides.
template <typename T>
__device__ void backward_delta(const T* __restrict__ out, const T* __restrict__ dout,
                               float* __restrict__ delta, const Layouts& layouts, int h, int t,
                               int rows, int d) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const int bh = row / t, i = row % t, b = bh / h, hh = bh % h;
    const T* o = out + layouts.o.at(b, hh) + layouts.o.row(i);
    const T* g = dout + layouts.dout.at(b, hh) + layouts.dout.row(i);
    float sum = 0.f;
    for (int j = lane; j < d; j += 32) sum += to_float(o[j]) * to_float(g[j]);
    sum = warp_sum(sum);
    if (lane == 0) delta[row] = sum;
}

}  // namespace flash

#define FLASH(T, NAME, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(flash::THREADS) flash_fwd_d##D##_##NAME(        \
        const T* q, const T* k, const T* v, T* o, float* lse, const uint32_t* segments,          \
        const __grid_constant__ flash::Layouts layouts, int h, int kv_h, int t, float scale,     \
        int causal, int window) {                                                                 \
        flash::forward<T, D>(q, k, v, o, lse, segments, layouts, h, kv_h, t, scale, causal,      \
                             window);                                                             \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(flash::THREADS) flash_bwd_d##D##_##NAME(        \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, \
        const uint32_t* segments, float* dq, T* dk, T* dv,                                       \
        const __grid_constant__ flash::Layouts layouts, int h, int kv_h, int t, float scale,     \
        int causal, int window) {                                                                 \
        flash::backward<T, D>(q, k, v, dout, lse, delta, segments, dq, dk, dv, layouts, h, kv_h, \
                              t, scale, causal, window);                                          \
    }

#define FLASH_DELTA(T, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        flash_bwd_delta_##NAME(const T* out, const T* dout, float* delta,                        \
                               const __grid_constant__ flash::Layouts layouts, int h, int t,    \
                               int rows, int d) {                                                \
        flash::backward_delta<T>(out, dout, delta, layouts, h, t, rows, d);                      \
    }

FLASH(__nv_bfloat16, bf16, 64)
FLASH(__nv_bfloat16, bf16, 128)
FLASH(__half, f16, 64)
FLASH(__half, f16, 128)
FLASH_DELTA(__nv_bfloat16, bf16)
FLASH_DELTA(__half, f16)
