/* One decode step of a Llama-shaped model (Llama, Qwen2, Mistral), whole, in one call: the token's
 * embedding row through every layer to the output layer's logits, for x86-64 with AVX2 and FMA.
 *
 * Why: on a 30-layer, 576-wide model (SmolLM2-135M) a step through torch is some 600 operator
 * calls, each paying dispatch and allocation; with int8 or int4 weights the arithmetic is a few
 * milliseconds and the calls were most of the rest. Here a step is one call, one OpenMP parallel
 * region and a few barriers per layer (its own, `sync_wait`).
 *
 * What it computes (activations fp32 throughout, as the engine's quantized models run):
 *   h = embed[token]                                (a bf16 table widened, or fp32)
 *   per layer: x = rmsnorm(h) * ln1; q,k,v = W_qkv x (+ bias); rotary on q, k at `pos`;
 *              k, v written into the cache at `pos`; a = softmax(q k^T * scale) v per head
 *              (grouped: head h reads kv head h / (heads / kv_heads));
 *              h += W_o a (+ bias); x = rmsnorm(h) * ln2; h += W_down (silu(W_gate x) * W_up x)
 *   logits = W_head (rmsnorm(h) * norm)
 * Weights, each an `hs_lin`:
 *   kind 1, int8:  w int8 [out, in], one fp32 scale per row:   y = s[o] * sum(w * x)
 *   kind 2, int4:  w uint8 [out, in/2], two values a byte, low nibble first (element 2j low,
 *                  2j + 1 high: the quantized-weight cache's form); s bf16 [out, in/32, 2] =
 *                  (scale, zero) per group of 32 along a row: value = (q - 8) * scale + zero
 *   kind 3, fp32:  w float [out, in]
 *   kind 4, bf16:  w bf16 [out, in]
 * A bf16 model (`bf16` set) keeps its activations and KV cache in bf16 as torch runs it: every
 * value is rounded to bf16 (to nearest, ties to even) where torch's bf16 operations round theirs,
 * each product and sum in between in fp32, so the two differ only where a sum taken in another
 * order lands on the other side of a bf16 rounding boundary.
 * `in` must be a multiple of 32 (the Python side checks shapes before it calls).
 *
 * The sums run in another order than torch's kernels and in fp32 where torch's int8/int4 kernels
 * round activations to bf16, so results agree with torch's to rounding, not bit for bit: the
 * Python side (`engine.tuned.step`) checks each kind against torch on load and tests compare
 * whole steps.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>

typedef struct {
    int64_t kind, out, in;
    const void *w;
    const void *s;     /* int8: fp32 [out]; int4: bf16 [out, in/32, 2]; fp32: unused */
    const float *bias; /* [out] or NULL */
} hs_lin;

typedef struct {
    hs_lin q, k, v, o, gate, up, down; /* q, k, v (gate, up) read one input; where one product
                                          holds them, each points at its rows of it */
    const float *ln1, *ln2;
    void *kc, *vc; /* the KV cache, [kv_heads, capacity, head_dim] each: fp32, or bf16 where bf16 */
} hs_layer;

typedef struct {
    int64_t layers, dim, heads, kv_heads, head_dim, ffn, vocab, capacity, threads;
    float eps, scale;
    int64_t bf16; /* a bf16 model: weights kind 4, values rounded to bf16 where torch rounds them */
    const void *embed;     /* [vocab, dim]: bf16, or fp32 where embed_f32 */
    int64_t embed_f32;
    const float *norm;     /* [dim] */
    const float *inv_freq; /* [head_dim / 2] */
    hs_lin head;
    const hs_layer *layer;
    float *scratch; /* see hs_step */
} hs_model;

static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

static inline __m256 i8x8(const int8_t *p) { /* 8 int8 -> 8 floats */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static float dot_int8(const int8_t *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 32) {
        _mm_prefetch((const char *)(w + i + 1024), _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(i8x8(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(i8x8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(i8x8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(i8x8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

static inline float bf16f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* xp: x with each group of 32 reordered as its 16 even elements, then its 16 odd ones (so the
 * low and the high nibbles of 16 bytes meet their inputs in order); xs: the sum of each group. */
static float dot_int4(const uint8_t *w, const uint16_t *sz, const float *xp, const float *xs,
                      int64_t n) {
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float zeros = 0.0f;
    for (int64_t g = 0; g < n / 32; g++) {
        const uint8_t *b = w + g * 16;
        const float *xg = xp + g * 32;
        _mm_prefetch((const char *)(b + 512), _MM_HINT_T0);
        __m128i bytes = _mm_loadu_si128((const __m128i *)b);
        __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
        __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        __m256 d = _mm256_mul_ps(q0, _mm256_loadu_ps(xg));
        d = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xg + 8), d);
        d = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xg + 16), d);
        d = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xg + 24), d);
        float scale = bf16f(sz[2 * g]), zero = bf16f(sz[2 * g + 1]);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(scale), d, acc);
        zeros += (zero - 8.0f * scale) * xs[g];
    }
    return hsum8(acc) + zeros;
}

static inline float rb(float f) { /* to the nearest bf16, ties to even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return f;
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) { /* f already a bf16 value */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static float dot_bf16(const uint16_t *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 32) {
        _mm_prefetch((const char *)(w + i + 512), _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(bf16x8(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(bf16x8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(bf16x8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(bf16x8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

static float dot_f32(const float *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* Row `o` of lin's product with x (xs: group sums of x, for int4), bias included. */
static inline float row(const hs_lin *lin, int64_t o, const float *x, const float *xs) {
    float y;
    if (lin->kind == 1)
        y = ((const float *)lin->s)[o] * dot_int8((const int8_t *)lin->w + o * lin->in, x, lin->in);
    else if (lin->kind == 2)
        y = dot_int4((const uint8_t *)lin->w + o * (lin->in / 2),
                     (const uint16_t *)lin->s + o * (lin->in / 16), x, xs, lin->in);
    else if (lin->kind == 4)
        y = dot_bf16((const uint16_t *)lin->w + o * lin->in, x, lin->in);
    else
        y = dot_f32((const float *)lin->w + o * lin->in, x, lin->in);
    return lin->bias ? y + lin->bias[o] : y;
}

/* The input the rows of `lin` read: x itself, or for int4 its permuted copy in xp (sums in xs). */
static const float *prep(const hs_lin *lin, const float *x, float *xp, float *xs) {
    if (lin->kind != 2) return x;
    for (int64_t g = 0; g < lin->in / 32; g++) {
        const float *xg = x + g * 32;
        float *pg = xp + g * 32, s = 0.0f;
        for (int j = 0; j < 16; j++) {
            pg[j] = xg[2 * j];
            pg[16 + j] = xg[2 * j + 1];
            s += xg[2 * j] + xg[2 * j + 1];
        }
        xs[g] = s;
    }
    return xp;
}

/* The threads of a step wait for each other here between its parts (a dozen times a layer):
 * spinning, as the wait is microseconds, then giving the core up if a partner has been descheduled.
 * Not OpenMP's own barriers: under OMP_WAIT_POLICY=PASSIVE, which the TUI's child processes set so
 * that training and chat share the cores, those sleep in the kernel, and a step took twice as long. */
typedef struct {
    atomic_int arrived, phase;
} hs_sync;

static void sync_wait(hs_sync *s, int *phase, int threads) {
    const int next = ++*phase;
    if (threads == 1) return;
    if (atomic_fetch_add_explicit(&s->arrived, 1, memory_order_acq_rel) == threads - 1) {
        atomic_store_explicit(&s->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&s->phase, next, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&s->phase, memory_order_acquire) != next; spins++) {
        if (spins < 4096)
            _mm_pause();
        else
            sched_yield();
    }
}

/* y = the rows of `n` products of one input, one after the other (q, k, v): as `gemv` */
static void gemv_parts(const hs_lin *parts, int n, const float *x, const float *xs, float *y, int bf16) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += parts[i].out;
#pragma omp for schedule(static) nowait
    for (int64_t o = 0; o < total; o++) {
        const hs_lin *l = parts;
        int64_t r = o;
        while (r >= l->out) r -= (l++)->out;
        float v = row(l, r, x, xs);
        y[o] = bf16 ? rb(v) : v;
    }
}

/* y[o] (+)= row o, for the rows of this thread (inside a parallel region; no barrier). */
static void gemv(const hs_lin *lin, const float *x, const float *xs, float *y, int add, int bf16) {
#pragma omp for schedule(static) nowait
    for (int64_t o = 0; o < lin->out; o++) {
        float r = row(lin, o, x, xs);
        if (bf16) r = rb(r);
        y[o] = add ? (bf16 ? rb(y[o] + r) : y[o] + r) : r;
    }
}

static void rmsnorm(const float *h, const float *w, float *out, int64_t n, float eps, int bf16) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += h[i] * h[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    if (bf16)
        for (int64_t i = 0; i < n; i++) out[i] = rb(w[i] * rb(h[i] * r));
    else
        for (int64_t i = 0; i < n; i++) out[i] = w[i] * (h[i] * r);
}

static void rotate(float *x, const float *cos_, const float *sin_, int64_t hd, int bf16) {
    int64_t half = hd / 2;
    for (int64_t j = 0; j < half; j++) {
        float a = x[j], b = x[j + half];
        if (bf16) { /* x * cos + rotate_half(x) * sin, each operation rounded */
            x[j] = rb(rb(a * cos_[j]) + rb(-b * sin_[j]));
            x[j + half] = rb(rb(b * cos_[j + half]) + rb(a * sin_[j + half]));
        } else {
            x[j] = a * cos_[j] - b * sin_[j];
            x[j + half] = b * cos_[j + half] + a * sin_[j + half];
        }
    }
}

static inline float kv_at(const void *base, int64_t i, int bf16) {
    return bf16 ? bf16f(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* One head's attention over positions 0..pos. A bf16 model as torch's CPU flash attention runs
 * it: scores and their softmax in fp32, the unnormalised weights rounded to bf16 for the product
 * with the values, the sum divided out in fp32, the result rounded. */
static void attend(const hs_model *m, const hs_layer *L, const float *q, float *out, float *scores,
                   int64_t h, int64_t pos) {
    const int bf16 = (int)m->bf16;
    int64_t hd = m->head_dim, kvh = h / (m->heads / m->kv_heads);
    const float *qh = q + h * hd;
    int64_t base = kvh * m->capacity * hd;
    float best = -INFINITY;
    for (int64_t t = 0; t <= pos; t++) {
        float s = 0.0f;
        for (int64_t j = 0; j < hd; j++) s += qh[j] * kv_at(L->kc, base + t * hd + j, bf16);
        s *= m->scale;
        scores[t] = s;
        if (s > best) best = s;
    }
    float total = 0.0f;
    for (int64_t t = 0; t <= pos; t++) {
        scores[t] = expf(scores[t] - best);
        total += scores[t];
    }
    float *oh = out + h * hd;
    for (int64_t j = 0; j < hd; j++) oh[j] = 0.0f;
    for (int64_t t = 0; t <= pos; t++) {
        float p = bf16 ? rb(scores[t]) : scores[t] / total;
        for (int64_t j = 0; j < hd; j++) oh[j] += p * kv_at(L->vc, base + t * hd + j, bf16);
    }
    if (bf16)
        for (int64_t j = 0; j < hd; j++) oh[j] = rb(oh[j] / total);
}

static inline void kv_put(void *base, int64_t at, const float *src, int64_t n, int bf16) {
    if (bf16)
        for (int64_t j = 0; j < n; j++) ((uint16_t *)base)[at + j] = to_bf16(src[j]);
    else
        memcpy((float *)base + at, src, n * sizeof(float));
}

static inline const float *input(const hs_lin *lin, const float *x, const float *xp) {
    return lin->kind == 2 ? xp : x;
}

/* The logits [vocab] of `token` at position `pos` (< capacity); the cache gains that position.
 * Returns 0, or 1 when an argument is out of range (nothing written).
 * Scratch: h [dim], x [dim], qkv [(heads + 2 kv_heads) head_dim], att [heads head_dim],
 * act [ffn], scores [heads capacity], xp [max in], xs [max in / 32]. */
int hs_step(const hs_model *m, int64_t token, int64_t pos, float *logits) {
    if (token < 0 || token >= m->vocab || pos < 0 || pos >= m->capacity || m->head_dim > 512)
        return 1;
    const int64_t d = m->dim, hd = m->head_dim, nq = m->heads * hd, nkv = m->kv_heads * hd;
    const int64_t f = m->ffn, widest = f > nq ? (f > d ? f : d) : (nq > d ? nq : d);
    float *h = m->scratch, *x = h + d, *qkv = x + d, *att = qkv + nq + 2 * nkv;
    float *act = att + nq, *scores = act + f, *xp = scores + m->heads * m->capacity;
    float *xs = xp + widest;
    float cos_[512], sin_[512];
    const int bf16 = (int)m->bf16;
    for (int64_t j = 0; j < hd / 2; j++) {
        float a = m->inv_freq[j] * (float)pos;
        cos_[j] = cos_[j + hd / 2] = bf16 ? rb(cosf(a)) : cosf(a);
        sin_[j] = sin_[j + hd / 2] = bf16 ? rb(sinf(a)) : sinf(a);
    }
    if (m->embed_f32) {
        memcpy(h, (const float *)m->embed + token * d, d * sizeof(float));
    } else {
        const uint16_t *e = (const uint16_t *)m->embed + token * d;
        for (int64_t i = 0; i < d; i++) h[i] = bf16f(e[i]);
    }
    hs_sync sync;
    atomic_init(&sync.arrived, 0);
    atomic_init(&sync.phase, 0);
#pragma omp parallel num_threads((int)m->threads)
    {
        const int threads = omp_get_num_threads(), first = omp_get_thread_num() == 0;
        int phase = 0;
#define SYNC() sync_wait(&sync, &phase, threads)
        for (int64_t l = 0; l < m->layers; l++) {
            const hs_layer *L = &m->layer[l];
            if (first) {
                rmsnorm(h, L->ln1, x, d, m->eps, bf16);
                prep(&L->q, x, xp, xs);
            }
            SYNC();
            gemv_parts(&L->q, 3, input(&L->q, x, xp), xs, qkv, bf16);
            SYNC();
            if (first) {
                float *k = qkv + nq, *v = k + nkv;
                for (int64_t i = 0; i < m->heads; i++) rotate(qkv + i * hd, cos_, sin_, hd, bf16);
                for (int64_t i = 0; i < m->kv_heads; i++) {
                    rotate(k + i * hd, cos_, sin_, hd, bf16);
                    kv_put(L->kc, (i * m->capacity + pos) * hd, k + i * hd, hd, bf16);
                    kv_put(L->vc, (i * m->capacity + pos) * hd, v + i * hd, hd, bf16);
                }
            }
            SYNC();
#pragma omp for schedule(static) nowait
            for (int64_t i = 0; i < m->heads; i++)
                attend(m, L, qkv, att, scores + i * m->capacity, i, pos);
            SYNC();
            if (L->o.kind == 2) {
                if (first) prep(&L->o, att, xp, xs);
                SYNC();
            }
            gemv(&L->o, input(&L->o, att, xp), xs, h, 1, bf16);
            SYNC();
            if (first) {
                rmsnorm(h, L->ln2, x, d, m->eps, bf16);
                prep(&L->gate, x, xp, xs);
            }
            SYNC();
            const float *gx = input(&L->gate, x, xp);
            /* gate row i and up row i together: act[i] = silu(gate) * up */
#pragma omp for schedule(static) nowait
            for (int64_t i = 0; i < f; i++) {
                float g = row(&L->gate, i, gx, xs), u = row(&L->up, i, gx, xs);
                if (bf16) {
                    g = rb(g);
                    act[i] = rb(rb(g / (1.0f + expf(-g))) * rb(u));
                } else {
                    act[i] = g / (1.0f + expf(-g)) * u;
                }
            }
            SYNC();
            if (L->down.kind == 2) {
                if (first) prep(&L->down, act, xp, xs);
                SYNC();
            }
            gemv(&L->down, input(&L->down, act, xp), xs, h, 1, bf16);
            SYNC();
        }
        if (first) {
            rmsnorm(h, m->norm, x, d, m->eps, bf16);
            prep(&m->head, x, xp, xs);
        }
        SYNC();
        gemv(&m->head, input(&m->head, x, xp), xs, logits, 0, bf16);
#undef SYNC
    }
    return 0;
}

/* y = lin x for `rows` inputs (x [rows, in], y [rows, out]), one thread: the self-check's entry
 * to the same row products a step runs. scratch: in + in / 32 floats. */
void hs_rows(const hs_lin *lin, const float *x, int64_t rows, float *y, float *scratch) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * lin->in;
        const float *in = input(lin, xr, scratch);
        prep(lin, xr, scratch, scratch + lin->in);
        for (int64_t o = 0; o < lin->out; o++) y[r * lin->out + o] = row(lin, o, in, scratch + lin->in);
    }
}
