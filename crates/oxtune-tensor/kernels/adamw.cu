// Multi-tensor AdamW: one launch updates up to ADAMW_MAX_TENSORS parameters of one dtype.
//
// The optimizer keeps its fp32 state in one flat buffer, exp_avg | exp_avg_sq | masters
// (src/optim.rs); each parameter has an offset into the moments and, when its weight is
// bf16/f16, one into the masters. The model weights and the f32 gradients stay in their own
// allocations: the launch receives their pointers in its argument struct (apex's
// multi_tensor_apply, with every tensor of the launch in one __grid_constant__ struct of at
// most 4 KiB instead of a device array), so no table is uploaded and nothing syncs.
//
// Work: the launch's tensors, laid end to end, are cut into chunks of ADAMW_CHUNK elements;
// blocks take chunks grid-stride, find the chunk's first tensor by binary search over the
// tensors' first elements, and walk on across tensor ends. Per element, in f32, as
// torch.optim.AdamW (and src/optim.rs on the CPU, operation for operation, with the same
// f32 constants and no fused multiply-adds, so both round alike):
//   g  = grad * scale                          (scale: the clip factor, 1 when not clipping)
//   p  = master or weight;  p *= 1 - lr * wd   (decaying parameters only)
//   m  = b1 * m + (1 - b1) * g
//   v  = b2 * v + (1 - b2) * g^2
//   p -= (m / (sqrt(v) * (1 / sqrt(1 - b2^t)) + eps)) * (lr / (1 - b1^t))
//   master = p; weight = T(p)
#include "common.cuh"

#define ADAMW_MAX_TENSORS 64
#define ADAMW_CHUNK 4096

// One parameter of a launch (7 x 8 bytes; src/cuda/adamw.rs mirrors it).
struct AdamWTensor {
    const float* grad;        // len f32 gradient elements
    void* weight;             // len elements of T: the model's weight, updated in place
    unsigned long long len;
    unsigned long long state;  // offset of its moments in exp_avg and exp_avg_sq
    long long master;          // offset of its master in masters, -1 when T is float
    unsigned long long first;  // elements of the launch's earlier tensors
    unsigned long long decay;  // 1 when weight decay applies
};

struct AdamWArgs {
    AdamWTensor tensors[ADAMW_MAX_TENSORS];
    float* exp_avg;
    float* exp_avg_sq;
    float* masters;
    const float* scale_ptr;  // a device scalar multiplying the gradients, or null
    unsigned long long total;  // sum of the tensors' len
    unsigned int count;        // tensors used
    float scale;               // a host factor multiplying the gradients
    float beta1, one_minus_beta1, beta2, one_minus_beta2;
    float inverse_bias_correction2_sqrt, eps, step_size, decay_factor;
};
static_assert(sizeof(AdamWTensor) == 56, "src/cuda/adamw.rs mirrors this layout");
static_assert(sizeof(AdamWArgs) == 64 * 56 + 5 * 8 + 10 * 4 + 0, "src/cuda/adamw.rs mirrors this layout");
static_assert(sizeof(AdamWArgs) <= 4096, "kernel arguments fit the classic 4 KiB");

template <typename T>
__device__ __forceinline__ void adamw_element(const AdamWArgs& a, const AdamWTensor& t,
                                              unsigned long long j, float scale) {
    T* weight = static_cast<T*>(t.weight);
    const float g = __fmul_rn(t.grad[j], scale);
    float p = t.master >= 0 ? a.masters[t.master + j] : to_float(weight[j]);
    if (t.decay) p = __fmul_rn(p, a.decay_factor);
    const unsigned long long s = t.state + j;
    const float m = __fadd_rn(__fmul_rn(a.exp_avg[s], a.beta1), __fmul_rn(g, a.one_minus_beta1));
    const float v = __fadd_rn(__fmul_rn(a.exp_avg_sq[s], a.beta2),
                              __fmul_rn(__fmul_rn(g, g), a.one_minus_beta2));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), a.inverse_bias_correction2_sqrt), a.eps);
    p = __fsub_rn(p, __fmul_rn(__fdiv_rn(m, denom), a.step_size));
    a.exp_avg[s] = m;
    a.exp_avg_sq[s] = v;
    if (t.master >= 0) a.masters[t.master + j] = p;
    weight[j] = from_float<T>(p);
}

// The last tensor of `a` whose first element is <= i (empty tensors are skipped over).
template <typename Args>
__device__ __forceinline__ unsigned int find_tensor(const Args& a, unsigned long long i) {
    unsigned int lo = 0, hi = a.count - 1;
    while (lo < hi) {
        const unsigned int mid = (lo + hi + 1) >> 1;
        if (a.tensors[mid].first <= i) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

template <typename T>
__device__ void adamw(const AdamWArgs& a) {
    if (a.count == 0) return;
    const float scale = a.scale_ptr ? __fmul_rn(a.scale, *a.scale_ptr) : a.scale;
    const unsigned long long chunks = (a.total + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
    for (unsigned long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        const unsigned long long start = c * ADAMW_CHUNK;
        const unsigned long long end = min(start + ADAMW_CHUNK, a.total);
        unsigned int k = find_tensor(a, start);
        for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            while (i >= a.tensors[k].first + a.tensors[k].len) ++k;
            const AdamWTensor& t = a.tensors[k];
            adamw_element<T>(a, t, i - t.first, scale);
        }
    }
}

#define ADAMW(T, NAME)                                                                 \
    extern "C" __global__ void adamw_##NAME(const __grid_constant__ AdamWArgs args) { \
        adamw<T>(args);                                                                \
    }

ADAMW(float, f32)
ADAMW(__nv_bfloat16, bf16)
ADAMW(__half, f16)

// The global gradient norm's sum of squares: up to SUM_SQUARES_MAX_TENSORS f32 tensors per
// launch, chunked as above; each thread sums x^2 in f64, each block writes its sum to
// partials[blockIdx.x] (the caller sums the partials of all launches). Deterministic for
// given sizes.
#define SUM_SQUARES_MAX_TENSORS 128

struct SumSquaresTensor {
    const float* data;
    unsigned long long len;
    unsigned long long first;
};

struct SumSquaresArgs {
    SumSquaresTensor tensors[SUM_SQUARES_MAX_TENSORS];
    double* partials;          // gridDim.x sums
    unsigned long long total;  // sum of the tensors' len
    unsigned int count;
    unsigned int padding;
};
static_assert(sizeof(SumSquaresArgs) == 128 * 24 + 3 * 8, "src/cuda/adamw.rs mirrors this layout");

__device__ __forceinline__ double warp_sum_f64(double x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffff, x, offset);
    return x;
}

extern "C" __global__ void sum_squares_f32(const __grid_constant__ SumSquaresArgs a) {
    double sum = 0.0;
    if (a.count > 0) {
        const unsigned long long chunks = (a.total + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
        for (unsigned long long c = blockIdx.x; c < chunks; c += gridDim.x) {
            const unsigned long long start = c * ADAMW_CHUNK;
            const unsigned long long end = min(start + ADAMW_CHUNK, a.total);
            unsigned int k = find_tensor(a, start);
            for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
                while (i >= a.tensors[k].first + a.tensors[k].len) ++k;
                const double x = a.tensors[k].data[i - a.tensors[k].first];
                sum += x * x;
            }
        }
    }
    __shared__ double scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    sum = warp_sum_f64(sum);
    if (lane == 0) scratch[warp] = sum;
    __syncthreads();
    if (warp == 0) {
        sum = warp_sum_f64(lane < warps ? scratch[lane] : 0.0);
        if (lane == 0) a.partials[blockIdx.x] = sum;
    }
}

// Gradient accumulation: dst[offset + j] (+)= f32(src[j]) for up to ACCUMULATE_MAX_TENSORS
// gradients of one dtype per launch into the optimizer's flat f32 gradient buffer (assign
// on a step's first micro-batch), chunked as above. f32 adds, as candle's `a + b`.
#define ACCUMULATE_MAX_TENSORS 120

struct AccumulateTensor {
    const void* src;           // len elements of T
    unsigned long long len;
    unsigned long long first;  // elements of the launch's earlier tensors
    unsigned long long offset; // where it goes in dst
};

struct AccumulateArgs {
    AccumulateTensor tensors[ACCUMULATE_MAX_TENSORS];
    float* dst;
    unsigned long long total;
    unsigned int count;
    unsigned int assign;  // 1: dst = src, 0: dst += src
};
static_assert(sizeof(AccumulateArgs) == 120 * 32 + 3 * 8, "src/cuda/adamw.rs mirrors this layout");
static_assert(sizeof(AccumulateArgs) <= 4096, "kernel arguments fit the classic 4 KiB");

template <typename T>
__device__ void accumulate(const AccumulateArgs& a) {
    if (a.count == 0) return;
    const unsigned long long chunks = (a.total + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
    for (unsigned long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        const unsigned long long start = c * ADAMW_CHUNK;
        const unsigned long long end = min(start + ADAMW_CHUNK, a.total);
        unsigned int k = find_tensor(a, start);
        for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            while (i >= a.tensors[k].first + a.tensors[k].len) ++k;
            const AccumulateTensor& t = a.tensors[k];
            const unsigned long long j = i - t.first;
            const float g = to_float(static_cast<const T*>(t.src)[j]);
            float* d = a.dst + t.offset + j;
            *d = a.assign ? g : __fadd_rn(*d, g);
        }
    }
}

#define ACCUMULATE(T, NAME)                                                                  \
    extern "C" __global__ void accumulate_##NAME(const __grid_constant__ AccumulateArgs args) { \
        accumulate<T>(args);                                                                 \
    }

ACCUMULATE(float, f32)
ACCUMULATE(__nv_bfloat16, bf16)
ACCUMULATE(__half, f16)
