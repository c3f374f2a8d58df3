/* Kernels of a quantised frozen linear layer (finegrain/model/qlinear.py, `model.quantize`).
 *
 * Built with the other kernels by finegrain/model/native.py (`cc -O3 -march=native -fopenmp`) and
 * called through ctypes. A weight (out_features, in_features) is stored row by row in one of
 * these formats; the 4-bit ones are llama.cpp's GGUF blocks, byte for byte:
 *
 *   FMT_INT8  int8 w[in], one float scale per row:            x = scale * w
 *   FMT_Q4_0  blocks of 32: f16 d, 16 bytes of nibbles:        x = d * (q - 8)
 *   FMT_Q4_1  blocks of 32: f16 d, f16 m, 16 bytes of nibbles: x = d * q + m
 *   FMT_Q4_K  super-blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and mins,
 *             128 bytes of nibbles; sub-block s of 32:         x = d * sc[s] * q - dmin * mn[s]
 *
 * In a block of 32 the low nibbles of its 16 bytes are elements 0-15 and the high nibbles 16-31
 * (for Q4_K, of each 64 elements: the low nibbles of 32 bytes, then their high nibbles).
 *
 * `fg_q_dequantize` writes a tile of float32 weights (the caller multiplies it with oneDNN/MKL,
 * so many-row products run at the float GEMM's speed); `fg_q_linear` computes y = x W^T + b for
 * a few rows (decoding, a classifier's last position) straight from the blocks, where reading the
 * 4-bit weights once is what costs.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

enum { FMT_INT8 = 0, FMT_Q4_0 = 1, FMT_Q4_1 = 2, FMT_Q4_K = 3 };

/* IEEE half (little-endian bytes) to float, exactly. */
static inline float half_at(const uint8_t *p)
{
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        float v = (float)man * 5.9604644775390625e-8f; /* subnormal: man * 2^-24 */
        return sign ? -v : v;
    }
    bits = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* Q4_K's 6-bit scale and min of sub-block j (0-7) from its 12 packed bytes (ggml's get_scale_min_k4). */
static inline void scale_min_k4(int j, const uint8_t *q, float *sc, float *mn)
{
    if (j < 4) {
        *sc = (float)(q[j] & 63);
        *mn = (float)(q[j + 4] & 63);
    } else {
        *sc = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *mn = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* Elements col0 .. col0+cols of one stored row, as float32, into y. col0 and cols are whole
 * blocks (32 elements; 256 for Q4_K) except at the row's end. */
static void dequantize_row(int64_t fmt, const uint8_t *row, const float *scale, int64_t col0, int64_t cols,
                           float *restrict y)
{
    if (fmt == FMT_INT8) {
        const int8_t *w = (const int8_t *)row + col0;
        float s = *scale;
#pragma omp simd
        for (int64_t j = 0; j < cols; j++)
            y[j] = (float)w[j] * s;
        return;
    }
    if (fmt == FMT_Q4_K) {
        for (int64_t b = col0 / 256; b < (col0 + cols) / 256; b++) {
            const uint8_t *block = row + b * 144, *scales = block + 4, *q = block + 16;
            float d = half_at(block), dmin = half_at(block + 2);
            for (int j = 0; j < 8; j += 2, q += 32, y += 64) {
                float sc0, mn0, sc1, mn1;
                scale_min_k4(j, scales, &sc0, &mn0);
                scale_min_k4(j + 1, scales, &sc1, &mn1);
                float d0 = d * sc0, m0 = dmin * mn0, d1 = d * sc1, m1 = dmin * mn1;
#pragma omp simd
                for (int l = 0; l < 32; l++) {
                    y[l] = d0 * (float)(q[l] & 0xF) - m0;
                    y[l + 32] = d1 * (float)(q[l] >> 4) - m1;
                }
            }
        }
        return;
    }
    int64_t size = fmt == FMT_Q4_0 ? 18 : 20;
    for (int64_t b = col0 / 32; b < (col0 + cols) / 32; b++, y += 32) {
        const uint8_t *block = row + b * size;
        float d = half_at(block);
        if (fmt == FMT_Q4_0) {
            const uint8_t *q = block + 2;
#pragma omp simd
            for (int l = 0; l < 16; l++) {
                y[l] = (float)((q[l] & 0xF) - 8) * d;
                y[l + 16] = (float)((q[l] >> 4) - 8) * d;
            }
        } else {
            const uint8_t *q = block + 4;
            float m = half_at(block + 2);
#pragma omp simd
            for (int l = 0; l < 16; l++) {
                y[l] = d * (float)(q[l] & 0xF) + m;
                y[l + 16] = d * (float)(q[l] >> 4) + m;
            }
        }
    }
}

/* out (rows, cols) = columns col0 .. col0+cols of `rows` stored rows starting at `weight`
 * (`row_bytes` apart; `scale` the rows' int8 scales, else NULL). */
void fg_q_dequantize(int64_t fmt, const uint8_t *weight, int64_t row_bytes, const float *scale, int64_t rows,
                     int64_t col0, int64_t cols, float *out)
{
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        dequantize_row(fmt, weight + r * row_bytes, scale ? scale + r : NULL, col0, cols, out + r * cols);
}

#define ROW_GROUP 4 /* weight rows dequantized together, each then used by every input row */

/* y (N, out) = x (N, in) W^T (+ bias), W dequantized a few rows at a time into a per-thread buffer. */
void fg_q_linear(int64_t fmt, const uint8_t *weight, int64_t row_bytes, const float *scale, const float *bias,
                 const float *x, float *y, int64_t N, int64_t out_features, int64_t in_features)
{
#pragma omp parallel
    {
        float *rows = malloc(sizeof(float) * (size_t)(ROW_GROUP * in_features));
#pragma omp for schedule(static)
        for (int64_t o = 0; o < out_features; o += ROW_GROUP) {
            int64_t group = out_features - o < ROW_GROUP ? out_features - o : ROW_GROUP;
            for (int64_t g = 0; g < group; g++)
                dequantize_row(fmt, weight + (o + g) * row_bytes, scale ? scale + o + g : NULL, 0, in_features,
                               rows + g * in_features);
            for (int64_t n = 0; n < N; n++) {
                const float *xn = x + n * in_features;
                for (int64_t g = 0; g < group; g++) {
                    const float *w = rows + g * in_features;
                    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                    for (int64_t k = 0; k < in_features; k++)
                        sum += xn[k] * w[k];
                    y[n * out_features + o + g] = bias ? sum + bias[o + g] : sum;
                }
            }
        }
        free(rows);
    }
}
