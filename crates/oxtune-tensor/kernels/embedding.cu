// The backward of an embedding lookup y[r] = w[ids[r]]: dw[v] = sum of dy[r] over the rows r
// with ids[r] = v, accumulated in f32 in increasing row order (deterministic: no
// floating-point atomics), zero for the ids not present. The forward is candle's
// index_select (`src/cuda/embedding.rs`).
//
// Shapes: ids (n,) u32, dy (n, hidden), dw (vocab, hidden), both in T.
//
// Three launches after two memsets (pos to 0, dw to 0), all on the device (no host sync):
//   embedding_rank     grid (ceil(n / 256), ceil(n / RANK_TILE)) x 256 threads: pos[r] =
//                      the number of keys (ids[j], j) below (ids[r], r), i.e. r's place in the
//                      rows sorted by (id, row). Block (x, y) compares its 256 rows with the
//                      RANK_TILE ids of tile y (staged in shared memory) and adds its count
//                      with an integer atomicAdd: integer sums are exact, so pos is the same
//                      whatever order the blocks run in. The keys are distinct, so pos is a
//                      permutation. O(n^2) compares, all parallel: 67M at n = 8192.
//   embedding_scatter  order[pos[r]] = r: the rows sorted by (id, row).
//   embedding_bwd      one block per sorted position p; the block whose p starts a run of
//                      equal ids (p = 0 or the id before differs) owns that id: it finds the
//                      run's end (a block-wide count per chunk of positions: the run is a
//                      prefix of what follows p), then each thread sums its 16-byte column
//                      vector of dy over the run's rows in order (EMBEDDING_UNROLL rows' loads
//                      in flight) and writes dw[id]. Other blocks exit at once. Ids >= vocab
//                      are skipped (never written).
// Every element of dw is written by at most one thread, with a sum whose order depends only
// on (ids, dy): two runs give the same bits.
#include "common.cuh"

constexpr int RANK_THREADS = 256;
constexpr int RANK_TILE = 1024;
constexpr int EMBEDDING_UNROLL = 8;

extern "C" __global__ void __launch_bounds__(RANK_THREADS)
    embedding_rank(const uint32_t* __restrict__ ids, uint32_t* __restrict__ pos, int n) {
    __shared__ uint32_t tile[RANK_TILE];
    const int j0 = blockIdx.y * RANK_TILE;
    const int len = min(RANK_TILE, n - j0);
    for (int k = threadIdx.x; k < len; k += blockDim.x) tile[k] = ids[j0 + k];
    __syncthreads();
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    const uint32_t id = ids[r];
    // (ids[j], j) < (id, r): ids[j] <= id for j < r, ids[j] < id for j >= r (j = r is equal)
    const int split = min(max(r - j0, 0), len);
    uint32_t below = 0;
#pragma unroll 8
    for (int k = 0; k < split; ++k) below += tile[k] <= id ? 1u : 0u;
#pragma unroll 8
    for (int k = split; k < len; ++k) below += tile[k] < id ? 1u : 0u;
    if (below != 0) atomicAdd(pos + r, below);
}

extern "C" __global__ void __launch_bounds__(256)
    embedding_scatter(const uint32_t* __restrict__ pos, uint32_t* __restrict__ order, int n) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < n) order[pos[r]] = r;
}

// acc[u] += the V elements of T in raw, in order.
template <typename T>
__device__ __forceinline__ void add_vector(float (&acc)[Vec<T>::N], const uint4& raw) {
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int u = 0; u < Vec<T>::N; ++u) acc[u] += to_float(v[u]);
}

template <typename T>
__device__ __forceinline__ void embedding_bwd(const T* __restrict__ dy,
                                              const uint32_t* __restrict__ ids,
                                              const uint32_t* __restrict__ order,
                                              T* __restrict__ dw, int n, int hidden,
                                              uint32_t vocab) {
    const int p = blockIdx.x;
    const uint32_t id = ids[order[p]];
    if (id >= vocab || (p > 0 && ids[order[p - 1]] == id)) return;  // uniform over the block
    // The run [p, end) of positions holding id: a prefix of what follows p, so each chunk's
    // count of matches extends it until a chunk is not all matches.
    int end = p + 1;
    for (;;) {
        const int q = end + threadIdx.x;
        const int matches = __syncthreads_count(q < n && ids[order[q]] == id);
        end += matches;
        if (matches < static_cast<int>(blockDim.x)) break;
    }
    T* out = dw + static_cast<size_t>(id) * hidden;
    constexpr int V = Vec<T>::N;
    int tail = 0;
    if (hidden % V == 0 && aligned16(dy) && aligned16(dw)) {
        const int vectors = hidden / V;
        for (int c = threadIdx.x; c < vectors; c += blockDim.x) {
            float acc[V];
#pragma unroll
            for (int u = 0; u < V; ++u) acc[u] = 0.f;
            int q = p;
            for (; q + EMBEDDING_UNROLL <= end; q += EMBEDDING_UNROLL) {
                uint4 raw[EMBEDDING_UNROLL];
#pragma unroll
                for (int k = 0; k < EMBEDDING_UNROLL; ++k)
                    raw[k] = reinterpret_cast<const uint4*>(
                        dy + static_cast<size_t>(order[q + k]) * hidden)[c];
#pragma unroll
                for (int k = 0; k < EMBEDDING_UNROLL; ++k) add_vector<T>(acc, raw[k]);
            }
            for (; q < end; ++q)
                add_vector<T>(acc, reinterpret_cast<const uint4*>(
                                       dy + static_cast<size_t>(order[q]) * hidden)[c]);
            uint4 result;
            T* r = reinterpret_cast<T*>(&result);
#pragma unroll
            for (int u = 0; u < V; ++u) r[u] = from_float<T>(acc[u]);
            reinterpret_cast<uint4*>(out)[c] = result;
        }
        tail = hidden;
    }
    for (int j = tail + threadIdx.x; j < hidden; j += blockDim.x) {
        float acc = 0.f;
        for (int q = p; q < end; ++q) acc += to_float(dy[static_cast<size_t>(order[q]) * hidden + j]);
        out[j] = from_float<T>(acc);
    }
}

#define EMBEDDING_BWD(T, NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(256) embedding_bwd_##NAME(                    \
        const T* dy, const uint32_t* ids, const uint32_t* order, T* dw, int n, int hidden,     \
        unsigned int vocab) {                                                                  \
        embedding_bwd<T>(dy, ids, order, dw, n, hidden, vocab);                                \
    }

EMBEDDING_BWD(float, f32)
EMBEDDING_BWD(__nv_bfloat16, bf16)
EMBEDDING_BWD(__half, f16)
