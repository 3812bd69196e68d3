// Rotary position embedding, "rotate half" layout (Hugging Face Llama/Qwen/Mistral):
// x (b, h, t, d) with any strides over b, h and t (the d elements of a row contiguous), e.g. a
// (b, t, h, d) projection seen through transpose(1, 2); y (b, h, t, d) written with strides
// of its own (contiguous (b, h, t, d), or (b, t, h, d) memory order for a backward that
// returns the gradient in its input's order); cos, sin (t, d/2) shared by the batch or
// (b, t, d/2) per row.
// For i < d/2:  y[i] = x[i] cos[i] - x[i + d/2] sin[i],  y[i + d/2] = x[i + d/2] cos[i] + x[i] sin[i].
// The backward is the same rotation by -sin (sign = -1), applied to dy.
//
// One thread per 16-byte vector of the first half of a row (and the matching vector of the
// second half); scalar pairs when d/2 is not a multiple of the vector width or a row start is
// unaligned. Grid-stride.
#include "common.cuh"

struct RowStrides {
    long long b, h, t;  // elements between consecutive batch rows, heads and positions
};

template <typename T>
__device__ void rope(const T* __restrict__ x, const T* __restrict__ cos_table,
                     const T* __restrict__ sin_table, T* __restrict__ y, int h, int t, int d,
                     int per_batch, float sign, unsigned long long rows, RowStrides xs,
                     RowStrides ys) {
    constexpr int V = Vec<T>::N;
    const int half = d / 2;
    const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
    const unsigned long long first = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const bool strides_aligned = xs.b % V == 0 && xs.h % V == 0 && xs.t % V == 0 &&
                                 ys.b % V == 0 && ys.h % V == 0 && ys.t % V == 0;
    const bool vec = half % V == 0 && strides_aligned && aligned16(x) && aligned16(y) &&
                     aligned16(cos_table) && aligned16(sin_table);
    const int width = vec ? V : 1;  // elements per item
    const int items_per_row = half / width;
    const unsigned long long items = rows * items_per_row;
    for (unsigned long long item = first; item < items; item += stride) {
        const unsigned long long row = item / items_per_row;
        const int i0 = static_cast<int>(item % items_per_row) * width;
        const long long position = static_cast<long long>(row % t);
        const long long head = static_cast<long long>((row / t) % h);
        const long long batch = static_cast<long long>(row / (static_cast<unsigned long long>(h) * t));
        const long long table_row = per_batch ? batch * t + position : position;
        const T* x1 = x + batch * xs.b + head * xs.h + position * xs.t + i0;
        const T* x2 = x1 + half;
        T* y1 = y + batch * ys.b + head * ys.h + position * ys.t + i0;
        T* y2 = y1 + half;
        const T* c = cos_table + table_row * half + i0;
        const T* s = sin_table + table_row * half + i0;
        if (vec) {
            const uint4 r1 = *reinterpret_cast<const uint4*>(x1);
            const uint4 r2 = *reinterpret_cast<const uint4*>(x2);
            const uint4 rc = *reinterpret_cast<const uint4*>(c);
            const uint4 rs = *reinterpret_cast<const uint4*>(s);
            uint4 o1, o2;
#pragma unroll
            for (int u = 0; u < V; ++u) {
                const float a = to_float(reinterpret_cast<const T*>(&r1)[u]);
                const float b = to_float(reinterpret_cast<const T*>(&r2)[u]);
                const float cv = to_float(reinterpret_cast<const T*>(&rc)[u]);
                const float sv = sign * to_float(reinterpret_cast<const T*>(&rs)[u]);
                reinterpret_cast<T*>(&o1)[u] = from_float<T>(a * cv - b * sv);
                reinterpret_cast<T*>(&o2)[u] = from_float<T>(b * cv + a * sv);
            }
            *reinterpret_cast<uint4*>(y1) = o1;
            *reinterpret_cast<uint4*>(y2) = o2;
        } else {
            const float a = to_float(*x1), b = to_float(*x2);
            const float cv = to_float(*c), sv = sign * to_float(*s);
            *y1 = from_float<T>(a * cv - b * sv);
            *y2 = from_float<T>(b * cv + a * sv);
        }
    }
}

#define ROPE(T, NAME)                                                                            \
    extern "C" __global__ void rope_##NAME(const T* x, const T* cos_table, const T* sin_table,   \
                                           T* y, int h, int t, int d, int per_batch, float sign, \
                                           unsigned long long rows, long long xb, long long xh,  \
                                           long long xt, long long yb, long long yh,             \
                                           long long yt) {                                       \
        rope<T>(x, cos_table, sin_table, y, h, t, d, per_batch, sign, rows, RowStrides{xb, xh, xt}, \
                RowStrides{yb, yh, yt});                                                         \
    }

ROPE(float, f32)
ROPE(__nv_bfloat16, bf16)
ROPE(__half, f16)
