/* Int8-weight kernels for CPU decoding: a matmul, and a whole decoding step of a LLaMA model.
 *
 * Built on first use by finegrain/model/native.py (`cc -O3 -march=native -fopenmp`) and
 * called through ctypes. The step computes what finegrain/model/llama.py computes for one new
 * token per sequence with a KV cache, with every linear layer an `Int8Linear`:
 *
 *     x += o_proj(attention(rope(qkv_proj(rms_norm(x)))))
 *     x += down_proj(silu(gate) * up), gate, up = gate_up_proj(rms_norm(x))
 *
 * In PyTorch each of those small operations costs microseconds of dispatch, ~25 per layer,
 * about as long as the int8 matmuls themselves at batch 1; here they cost nothing.
 *
 * Weights are int8, one float scale per output row: y[n] = scale[n] * sum_k x[k] * w[n, k]
 * (+ bias[n]), activations stay float32 and sums are float32. Matmuls run on all OpenMP threads
 * (torch's own libgomp, already loaded by the process); everything else is single-threaded.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

typedef struct {
    const int8_t *weight; /* (out_features, in_features), row-major */
    const float *scale;   /* (out_features,) */
    const float *bias;    /* (out_features,) or NULL */
    int64_t out_features, in_features;
} Linear;

typedef struct {
    const float *input_norm, *post_norm; /* RMSNorm weights (hidden,) */
    Linear qkv, o, gate_up, down;         /* qkv: q rows, then k, then v; gate_up: gate rows, then up */
    float *k_cache, *v_cache;             /* (batch, num_kv_heads, max_len, head_dim) */
} Layer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, max_len;
    float eps;
    const float *inv_freq; /* (head_dim / 2,) rotary inverse frequencies */
    const float *final_norm;
    Linear lm_head;
    const Layer *layers;
} Model;

#define ROWS 4 /* rows of x sharing each converted weight vector */

/* out[m] = dot(x[m], w) for `rows` rows of x (<= ROWS), stride K. */
static void dot_rows(const int8_t *w, const float *x, int64_t K, int64_t rows, float *out)
{
    int64_t k = 0;
    for (int64_t m = 0; m < rows; m++)
        out[m] = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    if (rows == 1) { /* four independent sums hide the FMA latency */
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (; k + 32 <= K; k += 32) {
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k)))),
                                 _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k + 8)))),
                                 _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k + 16)))),
                                 _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k + 24)))),
                                 _mm256_loadu_ps(x + k + 24), a3);
        }
        a0 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        float lanes[8];
        _mm256_storeu_ps(lanes, a0);
        out[0] = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    } else if (rows == ROWS) { /* each weight vector converted once, used by four rows */
        __m256 acc[ROWS][2];
        for (int m = 0; m < ROWS; m++)
            acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        for (; k + 16 <= K; k += 16) {
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k))));
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k + 8))));
            for (int m = 0; m < ROWS; m++) {
                acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m][1]);
            }
        }
        for (int m = 0; m < ROWS; m++) {
            float lanes[8];
            _mm256_storeu_ps(lanes, _mm256_add_ps(acc[m][0], acc[m][1]));
            out[m] = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        }
    }
#endif
    for (; k < K; k++) /* the tail, or all of it without AVX2 (the compiler vectorizes what it can) */
        for (int64_t m = 0; m < rows; m++)
            out[m] += x[m * K + k] * (float)w[k];
}

/* y (M, N) = x (M, K) @ dequantized weight^T (+ bias). */
void fg_int8_linear(const Linear *linear, const float *x, float *y, int64_t M)
{
    const int64_t N = linear->out_features, K = linear->in_features;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *w = linear->weight + n * K;
        const float scale = linear->scale[n], bias = linear->bias ? linear->bias[n] : 0.0f;
        float dots[ROWS];
        int64_t m = 0;
        for (; m + ROWS <= M; m += ROWS) {
            dot_rows(w, x + m * K, K, ROWS, dots);
            for (int64_t r = 0; r < ROWS; r++)
                y[(m + r) * N + n] = dots[r] * scale + bias;
        }
        for (; m < M; m++) {
            dot_rows(w, x + m * K, K, 1, dots);
            y[m * N + n] = dots[0] * scale + bias;
        }
    }
}

/* out = rms_norm(x) * weight for each of `rows` rows of H. */
static void rms_norm(const float *x, const float *weight, float eps, int64_t rows, int64_t H, float *out)
{
    for (int64_t r = 0; r < rows; r++, x += H, out += H) {
        float sum = 0.0f;
        for (int64_t i = 0; i < H; i++)
            sum += x[i] * x[i];
        const float rstd = 1.0f / sqrtf(sum / (float)H + eps);
        for (int64_t i = 0; i < H; i++)
            out[i] = x[i] * rstd * weight[i];
    }
}

/* The residual connection: x += y, n values. */
static void add(float *x, const float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] += y[i];
}

/* Hugging Face's rotate-half rotary embedding of one head, in place. */
static void rope(float *head, const float *cos_, const float *sin_, int64_t half)
{
    for (int64_t i = 0; i < half; i++) {
        const float a = head[i], b = head[i + half];
        head[i] = a * cos_[i] - b * sin_[i];
        head[i + half] = b * cos_[i] + a * sin_[i];
    }
}

/* One query head over cache positions 0..slot of its key/value head; `scores` holds slot + 1. */
static void attend(const float *q, const float *keys, const float *values, const uint8_t *key_ok, int64_t slot,
                   int64_t hd, float *scores, float *out)
{
    const float scale = 1.0f / sqrtf((float)hd);
    float top = -INFINITY;
    for (int64_t s = 0; s <= slot; s++) {
        float dot = 0.0f;
        for (int64_t i = 0; i < hd; i++)
            dot += q[i] * keys[s * hd + i];
        /* masked keys (padding) are skipped; the new token always sees itself */
        scores[s] = (key_ok == NULL || key_ok[s] || s == slot) ? dot * scale : -INFINITY;
        if (scores[s] > top)
            top = scores[s];
    }
    float total = 0.0f;
    for (int64_t s = 0; s <= slot; s++)
        total += scores[s] = expf(scores[s] - top);
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int64_t s = 0; s <= slot; s++) {
        const float p = scores[s] / total;
        for (int64_t i = 0; i < hd; i++)
            out[i] += p * values[s * hd + i];
    }
}

/* Scratch floats `fg_decode_step` needs for `batch` sequences. */
int64_t fg_decode_workspace(const Model *model, int64_t batch)
{
    const int64_t qkv = (model->num_heads + 2 * model->num_kv_heads) * model->head_dim;
    return batch * (2 * model->hidden + qkv + model->num_heads * model->head_dim + 3 * model->intermediate +
                    model->head_dim) + model->max_len;
}

/* One new token per sequence at cache slot `slot`: x (batch, hidden) holds its embeddings and is
 * overwritten; positions (batch,) are the rotary positions; key_mask (batch, key_stride) marks
 * real cache positions (1) and padding (0), or is NULL; logits (batch, vocab) receive the output.
 * The caller checked that slot < max_len. */
void fg_decode_step(const Model *model, float *x, int64_t batch, const int64_t *positions, int64_t slot,
                    const uint8_t *key_mask, int64_t key_stride, float *logits, float *work)
{
    const int64_t H = model->hidden, nh = model->num_heads, nkv = model->num_kv_heads, hd = model->head_dim;
    const int64_t I = model->intermediate, half = hd / 2, L = model->max_len;
    const int64_t qkv_size = (nh + 2 * nkv) * hd;
    float *normed = work;                      /* (batch, H) */
    float *qkv = normed + batch * H;           /* (batch, qkv_size) */
    float *attn = qkv + batch * qkv_size;      /* (batch, nh * hd) */
    float *gate_up = attn + batch * nh * hd;   /* (batch, 2I) */
    float *hidden = gate_up + batch * 2 * I;   /* (batch, I) */
    float *delta = hidden + batch * I;         /* (batch, H) */
    float *angles = delta + batch * H;         /* (batch, hd): cos, then sin */
    float *scores = angles + batch * hd;       /* (max_len,) */

    for (int64_t b = 0; b < batch; b++)
        for (int64_t i = 0; i < half; i++) {
            const float angle = (float)positions[b] * model->inv_freq[i];
            angles[b * hd + i] = cosf(angle);
            angles[b * hd + half + i] = sinf(angle);
        }

    for (int64_t l = 0; l < model->num_layers; l++) {
        const Layer *layer = &model->layers[l];
        rms_norm(x, layer->input_norm, model->eps, batch, H, normed);
        fg_int8_linear(&layer->qkv, normed, qkv, batch);
        for (int64_t b = 0; b < batch; b++) {
            float *q = qkv + b * qkv_size, *k = q + nh * hd, *v = k + nkv * hd;
            const float *cos_ = angles + b * hd, *sin_ = cos_ + half;
            for (int64_t h = 0; h < nh; h++)
                rope(q + h * hd, cos_, sin_, half);
            for (int64_t h = 0; h < nkv; h++) {
                rope(k + h * hd, cos_, sin_, half);
                const int64_t at = ((b * nkv + h) * L + slot) * hd;
                memcpy(layer->k_cache + at, k + h * hd, (size_t)hd * sizeof(float));
                memcpy(layer->v_cache + at, v + h * hd, (size_t)hd * sizeof(float));
            }
            const uint8_t *key_ok = key_mask ? key_mask + b * key_stride : NULL;
            for (int64_t h = 0; h < nh; h++) {
                const int64_t kv = h / (nh / nkv), at = (b * nkv + kv) * L * hd;
                attend(q + h * hd, layer->k_cache + at, layer->v_cache + at, key_ok, slot, hd, scores,
                       attn + (b * nh + h) * hd);
            }
        }
        fg_int8_linear(&layer->o, attn, delta, batch);
        add(x, delta, batch * H);

        rms_norm(x, layer->post_norm, model->eps, batch, H, normed);
        fg_int8_linear(&layer->gate_up, normed, gate_up, batch);
        for (int64_t b = 0; b < batch; b++)
            for (int64_t i = 0; i < I; i++) {
                const float g = gate_up[b * 2 * I + i], u = gate_up[b * 2 * I + I + i];
                hidden[b * I + i] = g / (1.0f + expf(-g)) * u;
            }
        fg_int8_linear(&layer->down, hidden, delta, batch);
        add(x, delta, batch * H);
    }
    rms_norm(x, model->final_norm, model->eps, batch, H, normed);
    fg_int8_linear(&model->lm_head, normed, logits, batch);
}
