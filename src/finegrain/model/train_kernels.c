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

#define QB 64 /* queries per block: a block's scores (QB x T) stay in L2 up to T = 512 and beyond */
#define GROUP_ITEMS 8 /* at least this many (sequence, KV head) pairs: one work item each (see below) */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* One (sequence, KV head)'s rotated keys kr (T, hd), from k (rows ld_kv apart) unless k is NULL
 * (kr already holds them), and their transpose kT (hd, Tp), zero past T; with vT, v's transpose. */
static void prepare_keys(const float *k, const float *v, const float *cb, const float *sb, int64_t T, int64_t ld_kv,
                         int64_t hd, float *kr, float *kT, float *vT)
{
    if (k)
        for (int64_t t = 0; t < T; t++)
            rope(k + t * ld_kv, cb + t * hd, sb + t * hd, kr + t * hd, hd);
    transpose(kr, T, hd, hd, kT, padded(T));
    if (vT)
        transpose(v, T, hd, ld_kv, vT, padded(T));
}

/* Queries t0 .. t0+rows-1 of one (sequence, head): q rows ld_q apart, rotated into qr (rows, hd);
 * their scores against the keys up to the last of them only (kT: hd x Tp; the keys past it are
 * masked for every query of the block), the softmax (log-sum-exp into lse[t] unless NULL), and
 * the output rows into out, ld_out apart. cb, sb, q, v, lse and out point at position 0. */
static void attention_forward_block(const float *q, int64_t ld_q, const float *cb, const float *sb, const float *kT,
                                    int64_t Tp, const float *v, int64_t ld_kv, int64_t t0, int64_t rows, int64_t hd,
                                    float scale, float *qr, float *S, float *lse, float *out, int64_t ld_out)
{
    int64_t keys = t0 + rows, kp = padded(keys);
    for (int64_t i = 0; i < rows; i++)
        rope(q + (t0 + i) * ld_q, cb + (t0 + i) * hd, sb + (t0 + i) * hd, qr + i * hd, hd);
    gemm(rows, kp, hd, qr, hd, kT, Tp, S, kp, 0); /* scores */
    for (int64_t i = 0; i < rows; i++) {
        float row_lse = softmax_row(S + i * kp, t0 + i, kp, scale, NULL);
        if (lse)
            lse[t0 + i] = row_lse;
    }
    gemm(rows, hd, keys, S, kp, v, ld_kv, out + t0 * ld_out, ld_out, 0);
}

/* Causal grouped-query attention with rotary embeddings.
 *
 * q (B, T, nh*hd), k and v (B, T, nkv*hd): the projections as the linear layers return them;
 * cos and sin (B, T, hd) (sin signed as in apply_rope). Writes out (B, T, nh*hd), ready for
 * o_proj, and for the backward pass q_rot (B, nh, T, hd), k_rot (B, nkv, T, hd) and the
 * log-sum-exp of each query's scores, lse (B, nh, T); q_rot, k_rot and lse may be NULL (no
 * backward pass to come: nothing is kept). hd % VW == 0.
 *
 * Queries go in blocks of QB; a block's scores reach only the keys up to its last query, so
 * the causally masked key blocks above the diagonal are never computed. With many
 * (sequence, KV head) pairs (short texts, many per batch) each pair is one work item, its
 * keys rotated and transposed once for its group of heads; with few (long texts), keys are
 * prepared first and each (block, sequence, head) is a work item, heavier blocks first.
 */
void fg_attention_forward(const float *q, const float *k, const float *v, const float *cos, const float *sin,
                          int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t hd, float scale, float *out,
                          float *q_rot, float *k_rot, float *lse)
{
    int64_t group = nh / nkv, Tp = padded(T), blocks = (T + QB - 1) / QB, by_group = B * nkv >= GROUP_ITEMS;
    int64_t ld_q = nh * hd, ld_kv = nkv * hd;
    float *kT_all = by_group ? NULL : malloc(sizeof(float) * (size_t)(B * nkv * hd * Tp));
    float *own_k_rot = k_rot ? NULL : malloc(sizeof(float) * (size_t)(B * nkv * T * hd));
    float *kr_all = k_rot ? k_rot : own_k_rot;
#pragma omp parallel
    {
        float *S = malloc(sizeof(float) * (size_t)(QB * Tp));
        float *q_block = malloc(sizeof(float) * (size_t)(QB * hd));
        float *kT_own = by_group ? malloc(sizeof(float) * (size_t)(hd * Tp)) : NULL;
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t g = 0; g < nkv; g++) {
                const float *cb = cos + b * T * hd, *sb = sin + b * T * hd;
                float *kT = by_group ? kT_own : kT_all + (b * nkv + g) * hd * Tp;
                prepare_keys(k + b * T * ld_kv + g * hd, NULL, cb, sb, T, ld_kv, hd, kr_all + (b * nkv + g) * T * hd,
                             kT, NULL);
                for (int64_t h = g * group; by_group && h < (g + 1) * group; h++)
                    for (int64_t blk = 0; blk < blocks; blk++) {
                        int64_t t0 = blk * QB;
                        float *qr = q_rot ? q_rot + ((b * nh + h) * T + t0) * hd : q_block;
                        attention_forward_block(q + b * T * ld_q + h * hd, ld_q, cb, sb, kT, Tp,
                                                v + b * T * ld_kv + g * hd, ld_kv, t0, min64(QB, T - t0), hd, scale,
                                                qr, S, lse ? lse + (b * nh + h) * T : NULL,
                                                out + b * T * ld_q + h * hd, ld_q);
                    }
            }
        if (!by_group) {
#pragma omp for collapse(3) schedule(dynamic)
            for (int64_t last = 0; last < blocks; last++)
                for (int64_t b = 0; b < B; b++)
                    for (int64_t h = 0; h < nh; h++) {
                        int64_t g = h / group, t0 = (blocks - 1 - last) * QB;
                        float *qr = q_rot ? q_rot + ((b * nh + h) * T + t0) * hd : q_block;
                        attention_forward_block(q + b * T * ld_q + h * hd, ld_q, cos + b * T * hd, sin + b * T * hd,
                                                kT_all + (b * nkv + g) * hd * Tp, Tp, v + b * T * ld_kv + g * hd,
                                                ld_kv, t0, min64(QB, T - t0), hd, scale, qr, S,
                                                lse ? lse + (b * nh + h) * T : NULL, out + b * T * ld_q + h * hd, ld_q);
                    }
        }
        free(S);
        free(q_block);
        free(kT_own);
    }
    free(kT_all);
    free(own_k_rot);
}

/* One (sequence, head)'s share of the backward pass: its q's gradient into dq (rows ld_q apart,
 * rotated back), and its (rotated) k's and v's into dk_h (T, hd) and dv_h (rows ld_dv apart).
 * Query blocks run last to first: the last block reaches every key and writes dk_h and dv_h
 * (adds to them with `add`), the others add to the keys they reach. */
static void attention_backward_head(const float *doh, int64_t ld_out, const float *qr, const float *kr,
                                    const float *kT, const float *vT, const float *lse, const float *cb,
                                    const float *sb, int64_t T, int64_t hd, float scale, float *dq, int64_t ld_q,
                                    float *dk_h, float *dv_h, int64_t ld_dv, int add, float *P, float *dS,
                                    float *flip, float *dqr)
{
    int64_t Tp = padded(T), blocks = (T + QB - 1) / QB;
    for (int64_t blk = blocks - 1; blk >= 0; blk--) {
        int64_t t0 = blk * QB, rows = min64(QB, T - t0), keys = t0 + rows, kp = padded(keys);
        const float *qb = qr + t0 * hd, *dob = doh + t0 * ld_out;
        int accumulate = add || blk != blocks - 1;
        gemm(rows, kp, hd, qb, hd, kT, Tp, P, kp, 0);
        for (int64_t i = 0; i < rows; i++)
            softmax_row(P + i * kp, t0 + i, kp, scale, lse + t0 + i);
        gemm(rows, kp, hd, dob, ld_out, vT, Tp, dS, kp, 0); /* dP = dO V^T */
        for (int64_t i = 0; i < rows; i++) {                 /* dS = P * (dP - rowsum(P * dP)) * scale */
            float *p = P + i * kp, *ds = dS + i * kp, rowdot = 0.0f;
#pragma omp simd reduction(+ : rowdot)
            for (int64_t s = 0; s < kp; s++)
                rowdot += p[s] * ds[s];
            for (int64_t s = 0; s < kp; s++)
                ds[s] = p[s] * (ds[s] - rowdot) * scale;
        }
        gemm(rows, hd, keys, dS, kp, kr, hd, dqr, hd, 0); /* dQ = dS K */
        for (int64_t i = 0; i < rows; i++)
            rope_backward(dqr + i * hd, cb + (t0 + i) * hd, sb + (t0 + i) * hd, dq + (t0 + i) * ld_q, hd);
        transpose(dS, rows, keys, kp, flip, rows);
        gemm(keys, hd, rows, flip, rows, qb, hd, dk_h, hd, accumulate); /* dK += dS^T Q */
        transpose(P, rows, keys, kp, flip, rows);
        gemm(keys, hd, rows, flip, rows, dob, ld_out, dv_h, ld_dv, accumulate); /* dV += P^T dO */
    }
}

/* Gradients of fg_attention_forward's inputs q, k, v (same layouts), overwritten, from dout.
 * Work is split as in the forward pass: by (sequence, KV head), whose heads add into the
 * group's key and value gradients in turn; or, with few pairs, by (sequence, head), each
 * head's key and value gradients in a buffer of its own, summed over the group at the end in
 * head order. Either way the result does not depend on the number of threads. */
void fg_attention_backward(const float *dout, const float *q_rot, const float *k_rot, const float *v, const float *lse,
                           const float *cos, const float *sin, int64_t B, int64_t T, int64_t nh, int64_t nkv,
                           int64_t hd, float scale, float *dq, float *dk, float *dv)
{
    int64_t group = nh / nkv, Tp = padded(T), by_group = B * nkv >= GROUP_ITEMS, ld_q = nh * hd, ld_kv = nkv * hd;
    size_t keys_size = sizeof(float) * (size_t)((by_group ? 1 : B * nkv) * hd * Tp);
    float *kT_all = by_group ? NULL : malloc(keys_size), *vT_all = by_group ? NULL : malloc(keys_size);
    float *dk_heads = by_group ? NULL : malloc(sizeof(float) * (size_t)(B * nh * T * hd));
    float *dv_heads = by_group ? NULL : malloc(sizeof(float) * (size_t)(B * nh * T * hd));
#pragma omp parallel
    {
        float *P = malloc(sizeof(float) * (size_t)(QB * Tp));
        float *dS = malloc(sizeof(float) * (size_t)(QB * Tp));
        float *flip = malloc(sizeof(float) * (size_t)(QB * Tp));
        float *dqr = malloc(sizeof(float) * (size_t)(QB * hd));
        float *kT_own = by_group ? malloc(keys_size) : NULL, *vT_own = by_group ? malloc(keys_size) : NULL;
        float *dkr = malloc(sizeof(float) * (size_t)((by_group ? T : 1) * hd));
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t g = 0; g < nkv; g++) {
                int64_t bg = b * nkv + g;
                const float *cb = cos + b * T * hd, *sb = sin + b * T * hd, *kr = k_rot + bg * T * hd;
                float *kT = by_group ? kT_own : kT_all + bg * hd * Tp, *vT = by_group ? vT_own : vT_all + bg * hd * Tp;
                prepare_keys(NULL, v + b * T * ld_kv + g * hd, cb, sb, T, ld_kv, hd, (float *)kr, kT, vT);
                for (int64_t h = g * group; by_group && h < (g + 1) * group; h++)
                    attention_backward_head(dout + b * T * ld_q + h * hd, ld_q, q_rot + (b * nh + h) * T * hd, kr, kT,
                                            vT, lse + (b * nh + h) * T, cb, sb, T, hd, scale,
                                            dq + b * T * ld_q + h * hd, ld_q, dkr, dv + b * T * ld_kv + g * hd, ld_kv,
                                            h != g * group, P, dS, flip, dqr);
                for (int64_t s = 0; by_group && s < T; s++)
                    rope_backward(dkr + s * hd, cb + s * hd, sb + s * hd, dk + (b * T + s) * ld_kv + g * hd, hd);
            }
        if (!by_group) {
#pragma omp for collapse(2) schedule(dynamic)
            for (int64_t b = 0; b < B; b++)
                for (int64_t h = 0; h < nh; h++) {
                    int64_t bh = b * nh + h, bg = b * nkv + h / group;
                    attention_backward_head(dout + b * T * ld_q + h * hd, ld_q, q_rot + bh * T * hd, k_rot + bg * T * hd,
                                            kT_all + bg * hd * Tp, vT_all + bg * hd * Tp, lse + bh * T,
                                            cos + b * T * hd, sin + b * T * hd, T, hd, scale,
                                            dq + b * T * ld_q + h * hd, ld_q, dk_heads + bh * T * hd,
                                            dv_heads + bh * T * hd, hd, 0, P, dS, flip, dqr);
                }
#pragma omp for collapse(3) schedule(static)
            for (int64_t b = 0; b < B; b++)
                for (int64_t g = 0; g < nkv; g++)
                    for (int64_t s = 0; s < T; s++) {
                        float *dvs = dv + (b * T + s) * ld_kv + g * hd;
                        for (int64_t d = 0; d < hd; d++)
                            dkr[d] = dvs[d] = 0.0f;
                        for (int64_t h = g * group; h < (g + 1) * group; h++) {
                            const float *dkh = dk_heads + ((b * nh + h) * T + s) * hd;
                            const float *dvh = dv_heads + ((b * nh + h) * T + s) * hd;
                            for (int64_t d = 0; d < hd; d++) {
                                dkr[d] += dkh[d];
                                dvs[d] += dvh[d];
                            }
                        }
                        rope_backward(dkr, cos + (b * T + s) * hd, sin + (b * T + s) * hd,
                                      dk + (b * T + s) * ld_kv + g * hd, hd);
                    }
        }
        free(P);
        free(dS);
        free(flip);
        free(dqr);
        free(kT_own);
        free(vT_own);
        free(dkr);
    }
    free(kT_all);
    free(vT_all);
    free(dk_heads);
    free(dv_heads);
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
