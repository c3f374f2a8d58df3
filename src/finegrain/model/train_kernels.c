/* Fused float32 kernels for LoRA training on the CPU.
 *
 * Built with int8_decode.c by finegrain/model/native.py (`cc -O3 -march=native -fopenmp`) and
 * called through ctypes from fused.py. In a training step, outside its
 * matmuls, a decoder layer runs ~30 small PyTorch operations, each a pass over memory and a
 * few microseconds of dispatch: rotary embeddings, attention for a few dozen tokens, SwiGLU,
 * RMSNorm, LoRA dropout. Each kernel here does one of those jobs in one pass.
 *
 * Plain C loops over fixed-width blocks, which the compiler vectorises for the CPU at hand;
 * OpenMP on torch's own libgomp (already loaded by the process, so the same threads).
 * Every kernel computes what the PyTorch code it replaces computes, in float32, to rounding,
 * except the dropout mask, which comes from another generator; tests/test_train_kernels.py
 * checks each against that code.
 */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define VW 16 /* columns per block: one AVX-512 register, two AVX2 ones */

/* e^x, clamped to float's range; Cephes' expf polynomial (~2 ulp) in vectorisable form. */
static inline float exp_approx(float x)
{
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2**23 */
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    return p * two_n.f;
}

/* ---------------------------------------------------------------- attention */

/* C (M, N) = A (M, K) @ B (K, N), or C += A @ B; row-major with leading dimensions; N % VW == 0. */
static void gemm(int64_t M, int64_t N, int64_t K, const float *restrict A, int64_t lda, const float *restrict B,
                 int64_t ldb, float *restrict C, int64_t ldc, int accumulate)
{
    for (int64_t j = 0; j < N; j += VW) {
        int64_t i = 0;
        for (; i + 4 <= M; i += 4) { /* four rows share each loaded vector of B */
            float c0[VW], c1[VW], c2[VW], c3[VW];
            for (int v = 0; v < VW; v++) {
                c0[v] = accumulate ? C[i * ldc + j + v] : 0.0f;
                c1[v] = accumulate ? C[(i + 1) * ldc + j + v] : 0.0f;
                c2[v] = accumulate ? C[(i + 2) * ldc + j + v] : 0.0f;
                c3[v] = accumulate ? C[(i + 3) * ldc + j + v] : 0.0f;
            }
            const float *a = A + i * lda;
            for (int64_t k = 0; k < K; k++) {
                const float *b = B + k * ldb + j;
                float a0 = a[k], a1 = a[lda + k], a2 = a[2 * lda + k], a3 = a[3 * lda + k];
                for (int v = 0; v < VW; v++) {
                    c0[v] += a0 * b[v];
                    c1[v] += a1 * b[v];
                    c2[v] += a2 * b[v];
                    c3[v] += a3 * b[v];
                }
            }
            for (int v = 0; v < VW; v++) {
                C[i * ldc + j + v] = c0[v];
                C[(i + 1) * ldc + j + v] = c1[v];
                C[(i + 2) * ldc + j + v] = c2[v];
                C[(i + 3) * ldc + j + v] = c3[v];
            }
        }
        for (; i < M; i++) {
            float c[VW];
            for (int v = 0; v < VW; v++)
                c[v] = accumulate ? C[i * ldc + j + v] : 0.0f;
            for (int64_t k = 0; k < K; k++) {
                const float *b = B + k * ldb + j;
                float a0 = A[i * lda + k];
                for (int v = 0; v < VW; v++)
                    c[v] += a0 * b[v];
            }
            for (int v = 0; v < VW; v++)
                C[i * ldc + j + v] = c[v];
        }
    }
}

/* y = x * cos + rotate_half(x) * sin, with rotate_half's sign folded into sin (llama.py's apply_rope). */
static inline void rope(const float *restrict x, const float *restrict c, const float *restrict s, float *restrict y,
                        int64_t hd)
{
    int64_t half = hd / 2;
    for (int64_t d = 0; d < half; d++)
        y[d] = x[d] * c[d] + x[d + half] * s[d];
    for (int64_t d = half; d < hd; d++)
        y[d] = x[d] * c[d] + x[d - half] * s[d];
}

/* The transpose of `rope`: dx = dy * cos + rotate_half^T(dy * sin). */
static inline void rope_backward(const float *restrict dy, const float *restrict c, const float *restrict s,
                                 float *restrict dx, int64_t hd)
{
    int64_t half = hd / 2;
    for (int64_t d = 0; d < half; d++)
        dx[d] = dy[d] * c[d] + dy[d + half] * s[d + half];
    for (int64_t d = half; d < hd; d++)
        dx[d] = dy[d] * c[d] + dy[d - half] * s[d - half];
}

/* xT (cols, ldt) = x (rows, cols; leading dimension ldx) transposed, zero from `rows` to ldt. */
static void transpose(const float *restrict x, int64_t rows, int64_t cols, int64_t ldx, float *restrict xT, int64_t ldt)
{
    for (int64_t c = 0; c < cols; c++) {
        for (int64_t r = 0; r < rows; r++)
            xT[c * ldt + r] = x[r * ldx + c];
        for (int64_t r = rows; r < ldt; r++)
            xT[c * ldt + r] = 0.0f;
    }
}

/* Row t of the scores (Tp wide, unscaled) to its causal softmax in place, zero past t.
 * Returns the log-sum-exp of the scaled scores; given `lse` (the backward pass), uses it instead. */
static float softmax_row(float *restrict row, int64_t t, int64_t Tp, float scale, const float *lse)
{
    float max = -INFINITY;
    if (lse)
        max = *lse;
    else
#pragma omp simd reduction(max : max)
        for (int64_t s = 0; s <= t; s++)
            max = row[s] * scale > max ? row[s] * scale : max;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t s = 0; s < Tp; s++) {
        float e = s <= t ? exp_approx(row[s] * scale - max) : 0.0f;
        row[s] = e;
        sum += e;
    }
    if (lse)
        return *lse;
    float inv = 1.0f / sum;
    for (int64_t s = 0; s < Tp; s++)
        row[s] *= inv;
    return max + logf(sum);
}

static int64_t padded(int64_t T) { return (T + VW - 1) / VW * VW; }

/* Causal grouped-query attention with rotary embeddings, for short sequences.
 *
 * q (B, T, nh*hd), k and v (B, T, nkv*hd): the projections as the linear layers return them;
 * cos and sin (B, T, hd) (sin signed as in apply_rope). Writes out (B, T, nh*hd), ready for
 * o_proj, and for the backward pass q_rot (B, nh, T, hd), k_rot (B, nkv, T, hd) and the
 * log-sum-exp of each query's scores, lse (B, nh, T). hd % VW == 0. Work is split over
 * (sequence, KV head); each computes its T x T scores whole (T is short: see fused.py).
 */
void fg_attention_forward(const float *q, const float *k, const float *v, const float *cos, const float *sin,
                          int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t hd, float scale, float *out,
                          float *q_rot, float *k_rot, float *lse)
{
    int64_t group = nh / nkv, Tp = padded(T);
#pragma omp parallel
    {
        float *kT = malloc(sizeof(float) * (size_t)(hd * Tp));
        float *S = malloc(sizeof(float) * (size_t)(T * Tp));
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t g = 0; g < nkv; g++) {
                const float *cb = cos + b * T * hd, *sb = sin + b * T * hd;
                float *kr = k_rot + (b * nkv + g) * T * hd;
                for (int64_t t = 0; t < T; t++)
                    rope(k + ((b * T + t) * nkv + g) * hd, cb + t * hd, sb + t * hd, kr + t * hd, hd);
                transpose(kr, T, hd, hd, kT, Tp);
                for (int64_t h = g * group; h < (g + 1) * group; h++) {
                    float *qr = q_rot + (b * nh + h) * T * hd;
                    for (int64_t t = 0; t < T; t++)
                        rope(q + ((b * T + t) * nh + h) * hd, cb + t * hd, sb + t * hd, qr + t * hd, hd);
                    gemm(T, Tp, hd, qr, hd, kT, Tp, S, Tp, 0); /* scores */
                    for (int64_t t = 0; t < T; t++)
                        lse[(b * nh + h) * T + t] = softmax_row(S + t * Tp, t, Tp, scale, NULL);
                    gemm(T, hd, T, S, Tp, v + b * T * nkv * hd + g * hd, nkv * hd, out + b * T * nh * hd + h * hd,
                         nh * hd, 0);
                }
            }
        free(kT);
        free(S);
    }
}

/* Gradients of fg_attention_forward's inputs q, k, v (same layouts), overwritten, from dout. */
void fg_attention_backward(const float *dout, const float *q_rot, const float *k_rot, const float *v, const float *lse,
                           const float *cos, const float *sin, int64_t B, int64_t T, int64_t nh, int64_t nkv,
                           int64_t hd, float scale, float *dq, float *dk, float *dv)
{
    int64_t group = nh / nkv, Tp = padded(T);
#pragma omp parallel
    {
        float *kT = malloc(sizeof(float) * (size_t)(hd * Tp));
        float *vT = malloc(sizeof(float) * (size_t)(hd * Tp));
        float *P = malloc(sizeof(float) * (size_t)(T * Tp));
        float *dS = malloc(sizeof(float) * (size_t)(T * Tp));
        float *flip = malloc(sizeof(float) * (size_t)(T * Tp));
        float *dqr = malloc(sizeof(float) * (size_t)(T * hd));
        float *dkr = malloc(sizeof(float) * (size_t)(T * hd));
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t g = 0; g < nkv; g++) {
                const float *cb = cos + b * T * hd, *sb = sin + b * T * hd;
                const float *kr = k_rot + (b * nkv + g) * T * hd;
                const float *vg = v + b * T * nkv * hd + g * hd;
                float *dvg = dv + b * T * nkv * hd + g * hd;
                transpose(kr, T, hd, hd, kT, Tp);
                transpose(vg, T, hd, nkv * hd, vT, Tp);
                for (int64_t h = g * group; h < (g + 1) * group; h++) {
                    const float *qr = q_rot + (b * nh + h) * T * hd;
                    const float *doh = dout + b * T * nh * hd + h * hd;
                    int first = h == g * group; /* the group's first head writes dk, dv; the others add */
                    gemm(T, Tp, hd, qr, hd, kT, Tp, P, Tp, 0);
                    for (int64_t t = 0; t < T; t++)
                        softmax_row(P + t * Tp, t, Tp, scale, lse + (b * nh + h) * T + t);
                    gemm(T, Tp, hd, doh, nh * hd, vT, Tp, dS, Tp, 0); /* dP = dO V^T */
                    for (int64_t t = 0; t < T; t++) {                 /* dS = P * (dP - rowsum(P * dP)) * scale */
                        float *p = P + t * Tp, *ds = dS + t * Tp, rowdot = 0.0f;
#pragma omp simd reduction(+ : rowdot)
                        for (int64_t s = 0; s < Tp; s++)
                            rowdot += p[s] * ds[s];
                        for (int64_t s = 0; s < Tp; s++)
                            ds[s] = p[s] * (ds[s] - rowdot) * scale;
                    }
                    gemm(T, hd, T, dS, Tp, kr, hd, dqr, hd, 0); /* dQ = dS K */
                    for (int64_t t = 0; t < T; t++)
                        rope_backward(dqr + t * hd, cb + t * hd, sb + t * hd, dq + ((b * T + t) * nh + h) * hd, hd);
                    transpose(dS, T, T, Tp, flip, Tp);
                    gemm(T, hd, T, flip, Tp, qr, hd, dkr, hd, !first); /* dK += dS^T Q */
                    transpose(P, T, T, Tp, flip, Tp);
                    gemm(T, hd, T, flip, Tp, doh, nh * hd, dvg, nkv * hd, !first); /* dV += P^T dO */
                }
                for (int64_t s = 0; s < T; s++)
                    rope_backward(dkr + s * hd, cb + s * hd, sb + s * hd, dk + ((b * T + s) * nkv + g) * hd, hd);
            }
        free(kT);
        free(vT);
        free(P);
        free(dS);
        free(flip);
        free(dqr);
        free(dkr);
    }
}

/* ---------------------------------------------------------------- SwiGLU and RMSNorm */

#define CHUNK 4096 /* elements per OpenMP work item in elementwise kernels */

static void swiglu_range(const float *restrict gate, const float *restrict up, float *restrict y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = gate[i] / (1.0f + exp_approx(-gate[i])) * up[i];
}

/* y = silu(gate) * up, over n elements. */
void fg_swiglu_forward(const float *gate, const float *up, float *y, int64_t n)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i += CHUNK)
        swiglu_range(gate + i, up + i, y + i, n - i < CHUNK ? n - i : CHUNK);
}

static void swiglu_backward_range(const float *restrict grad, const float *restrict gate, const float *restrict up,
                                  float *restrict grad_gate, float *restrict grad_up, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i], sig = 1.0f / (1.0f + exp_approx(-g));
        grad_up[i] = grad[i] * g * sig;
        grad_gate[i] = grad[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
    }
}

/* The gradients of gate and up from grad, in one pass. */
void fg_swiglu_backward(const float *grad, const float *gate, const float *up, float *grad_gate, float *grad_up,
                        int64_t n)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i += CHUNK)
        swiglu_backward_range(grad + i, gate + i, up + i, grad_gate + i, grad_up + i, n - i < CHUNK ? n - i : CHUNK);
}

/* y = x * rstd * weight, rstd = 1 / sqrt(mean(x**2) + eps), one row of H at a time. */
void fg_rms_norm_forward(const float *x, const float *weight, float eps, int64_t rows, int64_t H, float *y, float *rstd)
{
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * H;
        float *yr = y + r * H, squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < H; i++)
            squares += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(squares / (float)H + eps);
        for (int64_t i = 0; i < H; i++)
            yr[i] = xr[i] * inv * weight[i];
        rstd[r] = inv;
    }
}

/* RMSNorm's input gradient, one row of H at a time: dx = rstd * (g*w - normed * mean(g*w*normed)),
 * normed = kept / w (kept: the output) or kept * rstd (kept: the input). */
void fg_rms_norm_backward(const float *grad, const float *kept, const float *weight, const float *rstd,
                          int64_t from_output, int64_t rows, int64_t H, float *grad_x)
{
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = grad + r * H, *y = kept + r * H;
        float *dx = grad_x + r * H, inv = rstd[r], dot = 0.0f;
        if (from_output) {
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < H; i++)
                dot += g[i] * y[i]; /* g*w . y/w */
        } else {
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < H; i++)
                dot += g[i] * weight[i] * y[i] * inv;
        }
        float mean = dot / (float)H;
        if (from_output)
            for (int64_t i = 0; i < H; i++)
                dx[i] = (g[i] * weight[i] - y[i] / weight[i] * mean) * inv;
        else
            for (int64_t i = 0; i < H; i++)
                dx[i] = (g[i] * weight[i] - y[i] * inv * mean) * inv;
    }
}

/* ---------------------------------------------------------------- LoRA dropout */

/* A dropout mask: keep[i] = 1 with probability 1 - p. Each group of four elements takes a 64-bit
 * SplitMix64 hash of (seed, group index), 16 bits per element, kept when the signed 16-bit lane
 * is >= least_kept (lanes are uniform on [-2**15, 2**15)). A counter-based generator: the mask
 * depends on the seed alone, not on the number of threads. */
void fg_keep_mask(uint8_t *keep, int64_t n, uint64_t seed, int32_t least_kept)
{
    int64_t groups = (n + 3) / 4;
#pragma omp parallel for simd schedule(static)
    for (int64_t j = 0; j < groups; j++) {
        uint64_t z = seed + (uint64_t)(j + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        for (int l = 0; l < 4; l++) {
            int64_t i = 4 * j + l;
            if (i < n)
                keep[i] = (int16_t)(uint16_t)(z >> (16 * l)) >= least_kept;
        }
    }
}

/* a (N, r) = (x * keep) A^T, x (N, in), A (r, in): LoRA's down projection of the dropped input. */
void fg_lora_down(const float *x, const uint8_t *keep, const float *A, float *a, int64_t N, int64_t in, int64_t r)
{
#pragma omp parallel
    {
        float *dropped = malloc(sizeof(float) * (size_t)in);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const float *xn = x + n * in;
            const uint8_t *kn = keep + n * in;
            for (int64_t i = 0; i < in; i++)
                dropped[i] = xn[i] * (float)kn[i];
            for (int64_t j = 0; j < r; j++) {
                const float *Aj = A + j * in;
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int64_t i = 0; i < in; i++)
                    sum += dropped[i] * Aj[i];
                a[n * r + j] = sum;
            }
        }
        free(dropped);
    }
}

/* grad_A (r, in) = grad_a^T (x * keep), grad_a (N, r). Each thread sums its rows into its own
 * (r, in) block; the blocks are then added in thread order, so the result does not depend on timing. */
void fg_lora_grad_A(const float *grad_a, const float *x, const uint8_t *keep, float *grad_A, int64_t N, int64_t in,
                    int64_t r)
{
    int64_t size = r * in;
    float *partial = NULL;
    int threads = 1;
#pragma omp parallel
    {
#pragma omp single
        {
            threads = omp_get_num_threads();
            partial = calloc((size_t)(threads * size), sizeof(float));
        }
        float *own = partial + omp_get_thread_num() * size;
        float *dropped = malloc(sizeof(float) * (size_t)in);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            for (int64_t i = 0; i < in; i++)
                dropped[i] = x[n * in + i] * (float)keep[n * in + i];
            for (int64_t j = 0; j < r; j++) {
                float w = grad_a[n * r + j], *row = own + j * in;
                for (int64_t i = 0; i < in; i++)
                    row[i] += w * dropped[i];
            }
        }
        free(dropped);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < size; i++) {
            float sum = 0.0f;
            for (int t = 0; t < threads; t++)
                sum += partial[t * size + i];
            grad_A[i] = sum;
        }
    }
    free(partial);
}

/* grad_x (N, in) += (grad_a A) * keep: the adapter's share of the input gradient. */
void fg_lora_grad_x(const float *grad_a, const float *A, const uint8_t *keep, float *grad_x, int64_t N, int64_t in,
                    int64_t r)
{
#pragma omp parallel
    {
        float *update = malloc(sizeof(float) * (size_t)in);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            for (int64_t i = 0; i < in; i++)
                update[i] = 0.0f;
            for (int64_t j = 0; j < r; j++) {
                float w = grad_a[n * r + j];
                const float *Aj = A + j * in;
                for (int64_t i = 0; i < in; i++)
                    update[i] += w * Aj[i];
            }
            float *gx = grad_x + n * in;
            const uint8_t *kn = keep + n * in;
            for (int64_t i = 0; i < in; i++)
                gx[i] += update[i] * (float)kn[i];
        }
        free(update);
    }
}
