// Paged attention for serving: n query rows, each attending over its own keys and values
// read straight from the paged pools of the KV cache (vLLM's layout), with grouped-query
// heads and without materialising the gathered, repeated context.
//
// Shapes (letters as in the models: h query heads, kv_h key/value heads, d head_dim):
//   q (n, h, d); k_pool, v_pool (slots, kv_h * d); out (n, h, d): all dtype T.
//   slots (total,) u32: slot tables (one per sequence, position order) concatenated.
//   rows (n, 2) u32: row i reads table slots[rows[i][0] ..] and sees its first rows[i][1]
//   positions (its own position + 1), or only the last `window` of them when window > 0.
// Query head j uses kv head j / (h / kv_h). Scores are scale * q . k, in f32.
//
// Launch: grid (n, kv_h * head_groups, splits), 128 threads. A block takes one query row, one
// kv head and GROUP (1, 2, 4 or 8) of the h / kv_h query heads that share it (head_groups
// blocks cover them all: one when h / kv_h <= 8), so every key and value of the context is
// read from memory once per kv head. The row's visible keys are cut into partitions of
// `partition_size` (<= 256) keys; block `split` takes partitions split, split + splits, ...
// (flash-decoding: at batch 1 the splits fill the GPU). Per partition:
//   1. the partition's slots -> shared memory (one coalesced read);
//   2. scores: a key group of LK lanes holds one key's d elements (16 bytes a lane when
//      aligned; LK = d / 8 for bf16, so 16 lanes at d = 128) and dots it with the GROUP
//      queries held in registers, reduced by shuffles -> shared logits; 4 keys per key
//      group are loaded before any is used, to keep loads in flight;
//   3. online softmax: per head the partition's max, the running max and sum, and the
//      logits replaced by exp(logit - max);
//   4. values: each key group accumulates p * v over its keys into registers.
// The key groups' accumulators are then summed in shared memory in a fixed order (the result
// does not depend on scheduling), and the block writes the output (splits == 1) or its
// partial: the unnormalised f32 accumulator, the max and the sum, which
// paged_attention_reduce merges (one block per (row, head)).
// A row that sees no keys gets zeros. Indices read from device memory are checked: a table
// entry past `total_slots` or a slot past `pool_slots` is never dereferenced, it turns its
// row's output into NaN instead (a kernel cannot report an error).
#include "common.cuh"

constexpr int PA_THREADS = 128;
constexpr int PA_WARPS = PA_THREADS / 32;
// Keys a partition may hold (its logits and slots live in shared memory).
constexpr int PA_MAX_PARTITION = 256;
// Elements of d a lane holds: d <= 256 over at most 32 lanes.
constexpr int PA_MAX_ELEMS = 8;
// Keys a key group loads before using any of them.
constexpr int PA_UNROLL = 4;
// key groups * d <= 1024 for every d <= 256 (a key group's lanes hold 8 elements at most).
constexpr int PA_ACC_WIDTH = 1024;
// Most splits the reduce kernel merges (its weights live in shared memory).
constexpr int PA_MAX_SPLITS = 1024;
// A slot outside the pool (or read past the tables), never dereferenced.
constexpr uint32_t PA_BAD_SLOT = 0xffffffffu;

// CH elements of T at p, as f32: one 16-byte load when CH * sizeof(T) == 16.
template <typename T, int CH>
__device__ __forceinline__ void load_chunk(const T* p, float* out) {
    if constexpr (CH == 1) {
        out[0] = to_float(p[0]);
    } else {
        static_assert(CH * sizeof(T) == 16, "a chunk is one 16-byte vector");
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int u = 0; u < CH; ++u) out[u] = to_float(v[u]);
    }
}

struct PagedShared {
    uint32_t* slots;  // [PA_MAX_PARTITION]
    float* logits;    // [GROUP][PA_MAX_PARTITION]
    float* stats;     // running max [GROUP], running sum [GROUP], rescale [GROUP]
    float* acc;       // [key groups][GROUP][d]
};

// One block's work (see the header). CH: elements per lane chunk, a 16-byte vector or 1.
template <typename T, int GROUP, int CH>
__device__ __forceinline__ void paged_attention_block(
    const T* __restrict__ q, const T* __restrict__ k_pool, const T* __restrict__ v_pool,
    const uint32_t* __restrict__ slots, const uint32_t* __restrict__ rows, T* __restrict__ out,
    float* __restrict__ partial_acc, float* __restrict__ partial_stats, int heads, int kv_heads,
    int d, int window, int partition_size, float scale, uint32_t total_slots,
    uint32_t pool_slots, PagedShared sh) {
    constexpr int CPL = PA_MAX_ELEMS / CH;  // chunks a lane may hold
    const int row = blockIdx.x;
    const int head_groups = gridDim.y / kv_heads;
    const int kv_head = blockIdx.y / head_groups;
    const int first = (blockIdx.y % head_groups) * GROUP;  // among the kv head's query heads
    const int per_kv = heads / kv_heads;
    const int split = blockIdx.z, splits = gridDim.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t kv_width = static_cast<size_t>(kv_heads) * d;

    // Lanes per key: the chunks of d, rounded up to a power of two, at most a warp.
    const int chunks = d / CH;
    int lanes_per_key = 1;
    while (lanes_per_key < chunks && lanes_per_key < 32) lanes_per_key <<= 1;
    const int keys_per_warp = 32 / lanes_per_key;
    const int key_groups = PA_WARPS * keys_per_warp;
    const int key_group = warp * keys_per_warp + lane / lanes_per_key;
    const int sub = lane % lanes_per_key;

    // This lane's chunks of the GROUP queries, pre-scaled.
    float qr[GROUP][PA_MAX_ELEMS];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        const bool head_ok = first + g < per_kv;
        const T* qp = q + (static_cast<size_t>(row) * heads + kv_head * per_kv + first + g) * d;
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            const int chunk = sub + c * lanes_per_key;
            if (head_ok && chunk < chunks) {
                load_chunk<T, CH>(qp + chunk * CH, &qr[g][c * CH]);
#pragma unroll
                for (int e = 0; e < CH; ++e) qr[g][c * CH + e] *= scale;
            } else {
#pragma unroll
                for (int e = 0; e < CH; ++e) qr[g][c * CH + e] = 0.f;
            }
        }
    }
    float acc[GROUP][PA_MAX_ELEMS];
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
        for (int e = 0; e < PA_MAX_ELEMS; ++e) acc[g][e] = 0.f;
    if (threadIdx.x < GROUP) {
        sh.stats[threadIdx.x] = -INFINITY;
        sh.stats[GROUP + threadIdx.x] = 0.f;
    }

    const uint32_t table = rows[2 * row];
    const int len = static_cast<int>(rows[2 * row + 1]);
    const int lo = (window > 0 && len > window) ? len - window : 0;
    const int partitions = (len - lo + partition_size - 1) / partition_size;
    const int step = key_groups * PA_UNROLL;

    // Loads key or value j of the partition (zeros past its end, NaN for a bad slot) into
    // this lane's chunks.
    auto load_row = [&](const T* pool, int j, int count, float* dst) {
        if (j < count && sh.slots[j] == PA_BAD_SLOT) {
#pragma unroll
            for (int e = 0; e < PA_MAX_ELEMS; ++e) dst[e] = NAN;
        } else if (j < count) {
            const T* p = pool + static_cast<size_t>(sh.slots[j]) * kv_width +
                         static_cast<size_t>(kv_head) * d;
#pragma unroll
            for (int c = 0; c < CPL; ++c) {
                const int chunk = sub + c * lanes_per_key;
                if (chunk < chunks) {
                    load_chunk<T, CH>(p + chunk * CH, dst + c * CH);
                } else {
#pragma unroll
                    for (int e = 0; e < CH; ++e) dst[c * CH + e] = 0.f;
                }
            }
        } else {
#pragma unroll
            for (int e = 0; e < PA_MAX_ELEMS; ++e) dst[e] = 0.f;
        }
    };

    for (int part = split; part < partitions; part += splits) {
        const int begin = lo + part * partition_size;
        const int count = min(partition_size, len - begin);
        for (int j = threadIdx.x; j < count; j += PA_THREADS) {
            const unsigned long long at = static_cast<unsigned long long>(table) + begin + j;
            const uint32_t slot = at < total_slots ? slots[at] : PA_BAD_SLOT;
            sh.slots[j] = slot < pool_slots ? slot : PA_BAD_SLOT;
        }
        __syncthreads();

        // 2. scores -> logits (every lane of a warp runs the shuffles: the loop is uniform)
        for (int base = 0; base < count; base += step) {
            float kf[PA_UNROLL][PA_MAX_ELEMS];
#pragma unroll
            for (int u = 0; u < PA_UNROLL; ++u)
                load_row(k_pool, base + u * key_groups + key_group, count, kf[u]);
#pragma unroll
            for (int u = 0; u < PA_UNROLL; ++u) {
                const int j = base + u * key_groups + key_group;
#pragma unroll
                for (int g = 0; g < GROUP; ++g) {
                    float dot = 0.f;
#pragma unroll
                    for (int e = 0; e < PA_MAX_ELEMS; ++e) dot = fmaf(qr[g][e], kf[u][e], dot);
                    for (int offset = lanes_per_key >> 1; offset > 0; offset >>= 1)
                        dot += __shfl_xor_sync(0xffffffff, dot, offset);
                    if (sub == 0 && j < count) sh.logits[g * PA_MAX_PARTITION + j] = dot;
                }
            }
        }
        __syncthreads();

        // 3. online softmax, one warp per head
        for (int g = warp; g < GROUP; g += PA_WARPS) {
            float* logits = sh.logits + g * PA_MAX_PARTITION;
            float m = -INFINITY;
            for (int j = lane; j < count; j += 32) m = fmaxf(m, logits[j]);
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1)
                m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, offset));
            const float old_max = sh.stats[g];
            const float new_max = fmaxf(old_max, m);
            float sum = 0.f;
            for (int j = lane; j < count; j += 32) {
                const float p = expf(logits[j] - new_max);
                logits[j] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float rescale = old_max == -INFINITY ? 0.f : expf(old_max - new_max);
                sh.stats[2 * GROUP + g] = rescale;
                sh.stats[GROUP + g] = sh.stats[GROUP + g] * rescale + sum;
                sh.stats[g] = new_max;
            }
        }
        __syncthreads();

        // 4. values
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            const float rescale = sh.stats[2 * GROUP + g];
#pragma unroll
            for (int e = 0; e < PA_MAX_ELEMS; ++e) acc[g][e] *= rescale;
        }
        for (int base = 0; base < count; base += step) {
            float vf[PA_UNROLL][PA_MAX_ELEMS];
#pragma unroll
            for (int u = 0; u < PA_UNROLL; ++u)
                load_row(v_pool, base + u * key_groups + key_group, count, vf[u]);
#pragma unroll
            for (int u = 0; u < PA_UNROLL; ++u) {
                const int j = base + u * key_groups + key_group;
                if (j < count) {
#pragma unroll
                    for (int g = 0; g < GROUP; ++g) {
                        const float p = sh.logits[g * PA_MAX_PARTITION + j];
#pragma unroll
                        for (int e = 0; e < PA_MAX_ELEMS; ++e) acc[g][e] = fmaf(p, vf[u][e], acc[g][e]);
                    }
                }
            }
        }
        __syncthreads();  // the next partition overwrites the slots and logits
    }

    // The key groups' accumulators, summed in a fixed order.
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            const int chunk = sub + c * lanes_per_key;
            if (chunk < chunks) {
#pragma unroll
                for (int e = 0; e < CH; ++e)
                    sh.acc[(key_group * GROUP + g) * d + chunk * CH + e] = acc[g][c * CH + e];
            }
        }
    __syncthreads();
    for (int index = threadIdx.x; index < GROUP * d; index += PA_THREADS) {
        const int g = index / d, dim = index % d;
        if (first + g >= per_kv) continue;
        float total = 0.f;
        for (int k = 0; k < key_groups; ++k) total += sh.acc[(k * GROUP + g) * d + dim];
        const size_t row_head = static_cast<size_t>(row) * heads + kv_head * per_kv + first + g;
        const float sum = sh.stats[GROUP + g];
        if (splits == 1) {
            // sum is 0 only when the row sees no keys; NaN (a bad slot) propagates
            out[row_head * d + dim] = from_float<T>(sum == 0.f ? 0.f : total / sum);
        } else {
            const size_t at = row_head * splits + split;
            partial_acc[at * d + dim] = total;
            if (dim == 0) {
                // a NaN sum (bad slot) with a NaN max, so that the reduce cannot drop it as
                // an empty split (max -inf) when every key of the split was bad
                partial_stats[2 * at] = isnan(sum) ? NAN : sh.stats[g];
                partial_stats[2 * at + 1] = sum;
            }
        }
    }
}

template <typename T, int GROUP>
__device__ __forceinline__ void paged_attention(
    const T* q, const T* k_pool, const T* v_pool, const uint32_t* slots, const uint32_t* rows,
    T* out, float* partial_acc, float* partial_stats, int heads, int kv_heads, int d,
    int window, int partition_size, float scale, uint32_t total_slots, uint32_t pool_slots) {
    __shared__ uint32_t slots_s[PA_MAX_PARTITION];
    __shared__ float logits_s[GROUP * PA_MAX_PARTITION];
    __shared__ float stats_s[3 * GROUP];
    __shared__ float acc_s[GROUP * PA_ACC_WIDTH];
    const PagedShared sh{slots_s, logits_s, stats_s, acc_s};
    constexpr int V = Vec<T>::N;
    if (d % V == 0 && aligned16(q) && aligned16(k_pool) && aligned16(v_pool)) {
        paged_attention_block<T, GROUP, V>(q, k_pool, v_pool, slots, rows, out, partial_acc,
                                           partial_stats, heads, kv_heads, d, window,
                                           partition_size, scale, total_slots, pool_slots, sh);
    } else {
        paged_attention_block<T, GROUP, 1>(q, k_pool, v_pool, slots, rows, out, partial_acc,
                                           partial_stats, heads, kv_heads, d, window,
                                           partition_size, scale, total_slots, pool_slots, sh);
    }
}

// Merges the splits' partials of one (row, head) per block: out = sum_s acc_s * exp(m_s - M)
// / sum_s l_s * exp(m_s - M), M the largest m_s.
template <typename T>
__device__ __forceinline__ void paged_attention_reduce(const float* partial_acc,
                                                       const float* partial_stats, T* out, int d,
                                                       int splits) {
    __shared__ float weights[PA_MAX_SPLITS];
    const size_t row_head = blockIdx.x;
    const float* stats = partial_stats + row_head * splits * 2;
    MaxSum x = {-INFINITY, 0.f};
    for (int s = threadIdx.x; s < splits; s += blockDim.x)
        x = max_sum_merge(x, MaxSum{stats[2 * s], stats[2 * s + 1]});
    x = block_max_sum(x);
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
        const float m = stats[2 * s];
        weights[s] = (m == -INFINITY || x.s == 0.f) ? 0.f : expf(m - x.m) / x.s;
    }
    __syncthreads();
    const float* acc = partial_acc + row_head * splits * d;
    for (int dim = threadIdx.x; dim < d; dim += blockDim.x) {
        float total = 0.f;
        for (int s = 0; s < splits; ++s) total = fmaf(acc[static_cast<size_t>(s) * d + dim], weights[s], total);
        out[row_head * d + dim] = from_float<T>(total);
    }
}

#define PAGED_ATTENTION_GROUP(T, NAME, GROUP)                                                   \
    extern "C" __global__ void __launch_bounds__(PA_THREADS) paged_attention_g##GROUP##_##NAME( \
        const T* q, const T* k_pool, const T* v_pool, const uint32_t* slots,                    \
        const uint32_t* rows, T* out, float* partial_acc, float* partial_stats, int heads,      \
        int kv_heads, int d, int window, int partition_size, float scale,                       \
        unsigned int total_slots, unsigned int pool_slots) {                                    \
        paged_attention<T, GROUP>(q, k_pool, v_pool, slots, rows, out, partial_acc,             \
                                  partial_stats, heads, kv_heads, d, window, partition_size,    \
                                  scale, total_slots, pool_slots);                              \
    }

#define PAGED_ATTENTION(T, NAME)                                                                \
    PAGED_ATTENTION_GROUP(T, NAME, 1)                                                           \
    PAGED_ATTENTION_GROUP(T, NAME, 2)                                                           \
    PAGED_ATTENTION_GROUP(T, NAME, 4)                                                           \
    PAGED_ATTENTION_GROUP(T, NAME, 8)                                                           \
    extern "C" __global__ void paged_attention_reduce_##NAME(                                   \
        const float* partial_acc, const float* partial_stats, T* out, int d, int splits) {      \
        paged_attention_reduce<T>(partial_acc, partial_stats, out, d, splits);                  \
    }

PAGED_ATTENTION(float, f32)
PAGED_ATTENTION(__nv_bfloat16, bf16)
PAGED_ATTENTION(__half, f16)
