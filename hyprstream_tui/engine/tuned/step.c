/* One decode step of a Llama-shaped model (Llama, Qwen2, Mistral), whole, in one call: the token's
 * embedding row through every layer to the output layer's logits, for x86-64 with AVX2 and FMA;
 * and a prompt's tokens, many at once, each exactly as a step computes it (`hs_prefill`).
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
 *   kind 5, bf16 packed for an exact model (see "A bf16 model as torch computes it" below)
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
    /* exact (a bf16 model, every weight kind 5): computed as torch computes it, bit for bit, on a
     * CPU where torch's bf16 products are oneDNN's AVX512-BF16 ones; see `step_exact` below */
    int64_t exact, sum_lanes, rope_positions;
    const uint16_t *silu;              /* [65536]: torch's silu of each bf16 value, as bf16 */
    const float *rope_cos, *rope_sin;  /* [rope_positions, head_dim / 2]: torch's bf16 cos, sin */
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

/* prep for projections `parts` of one input: xp and xs filled where any of them is int4. */
static void prep_any(const hs_lin *parts, int n, const float *x, float *xp, float *xs) {
    for (int i = 0; i < n; i++)
        if (parts[i].kind == 2) {
            prep(&parts[i], x, xp, xs);
            return;
        }
}

/* The threads of a step wait for each other here between its parts (a dozen times a layer):
 * spinning, as the wait is microseconds, then giving the core up if a partner has been descheduled.
 * Not OpenMP's own barriers: under OMP_WAIT_POLICY=PASSIVE, which the TUI's child processes set so
 * that training and chat share the cores, those sleep in the kernel, and a step took twice as long. */
typedef struct {
    atomic_int arrived, phase;
} hs_sync;

static void sync_init(hs_sync *s) {
    atomic_init(&s->arrived, 0);
    atomic_init(&s->phase, 0);
}

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
static void gemv_parts(const hs_lin *parts, int n, const float *x, const float *xp, const float *xs, float *y,
                       int bf16) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += parts[i].out;
#pragma omp for schedule(static) nowait
    for (int64_t o = 0; o < total; o++) {
        const hs_lin *l = parts;
        int64_t r = o;
        while (r >= l->out) r -= (l++)->out;
        float v = row(l, r, l->kind == 2 ? xp : x, xs);
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
    const int64_t wide = hd & ~(int64_t)7;
    for (int64_t t = 0; t <= pos; t++) {
        __m256 acc = _mm256_setzero_ps();
        const int64_t kt = base + t * hd;
        for (int64_t j = 0; j < wide; j += 8) {
            __m256 k = bf16 ? bf16x8((const uint16_t *)L->kc + kt + j) : _mm256_loadu_ps((const float *)L->kc + kt + j);
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + j), k, acc);
        }
        float s = hsum8(acc);
        for (int64_t j = wide; j < hd; j++) s += qh[j] * kv_at(L->kc, kt + j, bf16);
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
        const __m256 pv = _mm256_set1_ps(p);
        const int64_t vt = base + t * hd;
        for (int64_t j = 0; j < wide; j += 8) {
            __m256 v = bf16 ? bf16x8((const uint16_t *)L->vc + vt + j) : _mm256_loadu_ps((const float *)L->vc + vt + j);
            _mm256_storeu_ps(oh + j, _mm256_add_ps(_mm256_loadu_ps(oh + j), _mm256_mul_ps(pv, v)));
        }
        for (int64_t j = wide; j < hd; j++) oh[j] += p * kv_at(L->vc, vt + j, bf16);
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

static void rope_tables(const hs_model *m, int64_t pos, float *cos_, float *sin_) {
    const int bf16 = (int)m->bf16;
    for (int64_t j = 0; j < m->head_dim / 2; j++) {
        float a = m->inv_freq[j] * (float)pos;
        cos_[j] = cos_[j + m->head_dim / 2] = bf16 ? rb(cosf(a)) : cosf(a);
        sin_[j] = sin_[j + m->head_dim / 2] = bf16 ? rb(sinf(a)) : sinf(a);
    }
}

/* ---- A bf16 model as torch computes it, bit for bit (`exact`) ----
 * torch's step for a bf16 model, on a CPU whose oneDNN runs bf16 products with AVX512-BF16, rounds
 * where `bf16` above rounds, but sums in its own orders; here each sum runs in that order, with
 * the instructions torch's kernels use, so every value (and the KV cache) equals torch's:
 * - a linear layer (oneDNN's matmul, one row of inputs): each output sums its products two inputs
 *   at a time with VDPBF16PS (the odd one first, then the even), over blocks of 512 inputs, each
 *   block from zero and added to the running sum; then + bias in fp32, rounded. Weights are kind 5:
 *   rows in blocks of 64 (the last may hold 16, 32 or 48), each block [in / 2][rows][2], the layout
 *   that instruction reads (`step.py` packs them once per model);
 * - rmsnorm: the sum of squares in the order of torch's vectorised sum kernel (`sum_lanes` wide
 *   vectors, four at a time, in cascades of 16), divided by the size; 1 / sqrt, as torch;
 * - silu and the rotary cos/sin: torch's own values, tabled by `step.py` (`silu`, `rope_*`);
 * - attention: torch's own (see `hs_exact_begin` below).
 * A self-check (`step.py`) compares whole steps with torch's before this runs anywhere. */

#define XROWS 64 /* rows of a kind-5 block */

/* x (bf16 values) as pairs: element 2p in the low half, 2p + 1 in the high half. */
static void pairs_of(const float *x, uint32_t *xp, int64_t n) {
    for (int64_t p = 0; p < n / 2; p++)
        xp[p] = (uint32_t)to_bf16(x[2 * p]) | ((uint32_t)to_bf16(x[2 * p + 1]) << 16);
}

/* c[0..rows) = the sums of block `wb` ([in/2][rows][2]) with x pairs `xp`, oneDNN's order. */
__attribute__((target("avx512f,avx512bf16"))) static void xblock(const uint16_t *wb, int64_t rows,
                                                                 int64_t in, const uint32_t *xp,
                                                                 float *c) {
    const int64_t pairs = in / 2, G = rows / 16;
    __m512 C0 = _mm512_setzero_ps(), C1 = C0, C2 = C0, C3 = C0;
    for (int64_t kb = 0; kb < pairs; kb += 256) {
        const int64_t end = kb + 256 < pairs ? kb + 256 : pairs;
        __m512 A0 = _mm512_setzero_ps(), A1 = A0, A2 = A0, A3 = A0;
        if (G == 4) {
            for (int64_t p = kb; p < end; p++) {
                const __m512bh x = (__m512bh)_mm512_set1_epi32((int)xp[p]);
                const uint16_t *w = wb + p * 128; /* one stream: the hardware's prefetch beats ours here */
                A0 = _mm512_dpbf16_ps(A0, (__m512bh)_mm512_loadu_si512(w), x);
                A1 = _mm512_dpbf16_ps(A1, (__m512bh)_mm512_loadu_si512(w + 32), x);
                A2 = _mm512_dpbf16_ps(A2, (__m512bh)_mm512_loadu_si512(w + 64), x);
                A3 = _mm512_dpbf16_ps(A3, (__m512bh)_mm512_loadu_si512(w + 96), x);
            }
        } else {
            for (int64_t p = kb; p < end; p++) {
                const __m512bh x = (__m512bh)_mm512_set1_epi32((int)xp[p]);
                const uint16_t *w = wb + p * rows * 2;
                A0 = _mm512_dpbf16_ps(A0, (__m512bh)_mm512_loadu_si512(w), x);
                if (G > 1) A1 = _mm512_dpbf16_ps(A1, (__m512bh)_mm512_loadu_si512(w + 32), x);
                if (G > 2) A2 = _mm512_dpbf16_ps(A2, (__m512bh)_mm512_loadu_si512(w + 64), x);
            }
        }
        if (kb == 0) {
            C0 = A0, C1 = A1, C2 = A2, C3 = A3;
        } else {
            C0 = _mm512_add_ps(C0, A0), C1 = _mm512_add_ps(C1, A1);
            C2 = _mm512_add_ps(C2, A2), C3 = _mm512_add_ps(C3, A3);
        }
    }
    _mm512_storeu_ps(c, C0);
    if (G > 1) _mm512_storeu_ps(c + 16, C1);
    if (G > 2) _mm512_storeu_ps(c + 32, C2);
    if (G > 3) _mm512_storeu_ps(c + 48, C3);
}

/* bf16 rows w [out, in] packed as kind 5 into dst (out * in values): blocks of XROWS rows, each
 * [in / 2][rows][2] (`step.py`'s `pack_rows`). */
void hs_pack_rows(const uint16_t *w, int64_t out, int64_t in, uint16_t *dst, int64_t threads) {
#pragma omp parallel for schedule(static) num_threads((int)threads)
    for (int64_t first = 0; first < out; first += XROWS) {
        const int64_t rows = out - first < XROWS ? out - first : XROWS;
        const uint32_t *src = (const uint32_t *)(w + first * in);
        uint32_t *block = (uint32_t *)(dst + first * in);
        for (int64_t p = 0; p < in / 2; p++) /* writes in order; the block's rows stay in cache */
            for (int64_t r = 0; r < rows; r++) block[p * rows + r] = src[r * (in / 2) + p];
    }
}

/* Output row block `b` of a kind-5 layer: rows [XROWS b, ...) into c (bias added), rounded. */
static int64_t xrows(const hs_lin *lin, int64_t b, const uint32_t *xp, float *c) {
    const int64_t first = b * XROWS, rows = lin->out - first < XROWS ? lin->out - first : XROWS;
    xblock((const uint16_t *)lin->w + first * lin->in, rows, lin->in, xp, c);
    for (int64_t i = 0; i < rows; i++) c[i] = rb(lin->bias ? c[i] + lin->bias[first + i] : c[i]);
    return rows;
}

static inline int64_t xblocks(const hs_lin *lin) { return (lin->out + XROWS - 1) / XROWS; }

/* y = the rows of `n` kind-5 products of one input, one after the other (q, k, v); y[o] += them
 * (rounded) where `add`. Inside a parallel region, no barrier. */
static void xgemv(const hs_lin *parts, int n, const uint32_t *xp, float *y, int add) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += xblocks(&parts[i]);
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < total; b++) {
        int64_t r = b, base = 0;
        const hs_lin *l = parts;
        while (r >= xblocks(l)) {
            r -= xblocks(l);
            base += (l++)->out;
        }
        float c[XROWS];
        const int64_t rows = xrows(l, r, xp, c), at = base + r * XROWS;
        for (int64_t i = 0; i < rows; i++) y[at + i] = add ? rb(y[at + i] + c[i]) : c[i];
    }
}

static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    int64_t b = 0;
    for (uint64_t v = (uint64_t)(x - 1); v; v >>= 1) b++;
    return b;
}

/* The sum of h[i]^2 (each square rounded) in the order of torch's vectorised sum kernel
 * (`cascade_sum`): vectors of W, four at a time (`multi_row_sum` in cascades of 16), then their
 * partial vectors, then the elements past the last whole vector, then the W lanes. */
static float torch_sum_squares(const float *h, int64_t n, int W) {
    float acc[4][4][16], sq[16];
    memset(acc, 0, sizeof(acc));
    const int64_t nv = n / W, rows = nv / 4;
    const int64_t power = ceil_log2(rows) / 4 > 4 ? ceil_log2(rows) / 4 : 4, step = (int64_t)1 << power,
                  mask = step - 1;
#define ADD_ROW(I)                                                  \
    for (int k = 0; k < 4; k++)                                    \
        for (int l = 0; l < W; l++) {                              \
            const float v = h[((I) * 4 + k) * W + l];              \
            acc[0][k][l] += v * v;                                 \
        }
    int64_t i = 0;
    while (i + step <= rows) {
        for (int64_t j = 0; j < step; j++, i++) ADD_ROW(i)
        for (int j = 1; j < 4; j++) {
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < W; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if (i & (mask << (j * power))) break;
        }
    }
    for (; i < rows; i++) ADD_ROW(i)
#undef ADD_ROW
    for (int j = 1; j < 4; j++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < W; l++) acc[0][k][l] += acc[j][k][l];
    for (int64_t v = rows * 4; v < nv; v++)
        for (int l = 0; l < W; l++) {
            const float x = h[v * W + l];
            acc[0][0][l] += x * x;
        }
    for (int k = 1; k < 4; k++)
        for (int l = 0; l < W; l++) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t e = nv * W; e < n; e++) {
        sq[0] = h[e] * h[e];
        total += sq[0];
    }
    for (int l = 0; l < W; l++) total += acc[0][0][l];
    return total;
}

/* torch_sum_squares for the self-check (`exact.check`), which holds it to torch's own. */
float hs_sum_squares(const float *h, int64_t n, int64_t lanes) {
    return lanes == 8 || lanes == 16 ? torch_sum_squares(h, n, (int)lanes) : NAN;
}

static void rmsnorm_exact(const float *h, const float *w, float *out, int64_t n, float eps, int W) {
    const float var = torch_sum_squares(h, n, W) / (float)n;
    const float r = 1.0f / sqrtf(var + eps);
    for (int64_t i = 0; i < n; i++) out[i] = rb(w[i] * rb(h[i] * r));
}

/* An exact model's step runs in parts, with torch's own attention between them (torch's CPU flash
 * attention sums in orders that depend on the context's length; `step.py` calls it on the cache):
 * `hs_exact_begin` takes the token to layer 0's query, and `hs_exact_layer` takes layer l's
 * attention output to layer l + 1's query, or after the last layer to the logits. The query (q,
 * [heads, head_dim] bf16) and the attention output (att, the same) are the caller's buffers. The
 * hidden state lives in the scratch between the calls. */

/* Layer l's input norm, q/k/v, rotary; k, v into the cache at pos; q out as bf16. */
static void exact_front(const hs_model *m, int64_t l, int64_t pos, uint16_t *q, hs_sync *sync, int *phase,
                        int threads, int first) {
    const int64_t d = m->dim, hd = m->head_dim, nq = m->heads * hd, nkv = m->kv_heads * hd;
    const hs_layer *L = &m->layer[l];
    float *h = m->scratch, *x = h + d, *qkv = x + d, *att = qkv + nq + 2 * nkv, *act = att + nq;
    uint32_t *xp = (uint32_t *)(act + m->ffn + m->heads * m->capacity);
    if (first) {
        rmsnorm_exact(h, L->ln1, x, d, m->eps, (int)m->sum_lanes);
        pairs_of(x, xp, d);
    }
    sync_wait(sync, phase, threads);
    xgemv(&L->q, 3, xp, qkv, 0);
    sync_wait(sync, phase, threads);
    if (first) {
        float cs[512], sn[512];
        const float *c = m->rope_cos + pos * (hd / 2), *s = m->rope_sin + pos * (hd / 2);
        for (int64_t j = 0; j < hd / 2; j++) {
            cs[j] = cs[j + hd / 2] = c[j];
            sn[j] = sn[j + hd / 2] = s[j];
        }
        float *k = qkv + nq, *v = k + nkv;
        for (int64_t i = 0; i < m->heads; i++) rotate(qkv + i * hd, cs, sn, hd, 1);
        for (int64_t i = 0; i < m->kv_heads; i++) {
            rotate(k + i * hd, cs, sn, hd, 1);
            kv_put(L->kc, (i * m->capacity + pos) * hd, k + i * hd, hd, 1);
            kv_put(L->vc, (i * m->capacity + pos) * hd, v + i * hd, hd, 1);
        }
        for (int64_t i = 0; i < nq; i++) q[i] = to_bf16(qkv[i]);
    }
}

static int exact_unfit(const hs_model *m, int64_t pos) {
    return pos < 0 || pos >= m->capacity || pos >= m->rope_positions || m->head_dim % 16 || m->head_dim > 512;
}

/* The token's embedding row through layer 0's query (q). Returns 0, or 1 when an argument is out of
 * range (nothing written). */
int hs_exact_begin(const hs_model *m, int64_t token, int64_t pos, uint16_t *q) {
    if (!m->exact || token < 0 || token >= m->vocab || exact_unfit(m, pos)) return 1;
    const uint16_t *e = (const uint16_t *)m->embed + token * m->dim;
    for (int64_t i = 0; i < m->dim; i++) m->scratch[i] = bf16f(e[i]);
    hs_sync sync;
    sync_init(&sync);
#pragma omp parallel num_threads((int)m->threads)
    {
        int phase = 0;
        exact_front(m, 0, pos, q, &sync, &phase, omp_get_num_threads(), omp_get_thread_num() == 0);
    }
    return 0;
}

/* Layer l's attention output (att, bf16) through its o projection, residual, MLP and residual, then
 * layer l + 1's query (q), or after the last layer the logits. Returns 0, or 1 when out of range. */
int hs_exact_layer(const hs_model *m, int64_t l, int64_t pos, const uint16_t *att, uint16_t *q,
                   float *logits) {
    if (!m->exact || l < 0 || l >= m->layers || exact_unfit(m, pos)) return 1;
    const int64_t d = m->dim, hd = m->head_dim, nq = m->heads * hd, nkv = m->kv_heads * hd, f = m->ffn;
    const hs_layer *L = &m->layer[l];
    float *h = m->scratch, *x = h + d, *qkv = x + d, *a = qkv + nq + 2 * nkv, *act = a + nq;
    uint32_t *xp = (uint32_t *)(act + f + m->heads * m->capacity);
    const int W = (int)m->sum_lanes;
    hs_sync sync;
    sync_init(&sync);
#pragma omp parallel num_threads((int)m->threads)
    {
        const int threads = omp_get_num_threads(), first = omp_get_thread_num() == 0;
        int phase = 0;
#define SYNC() sync_wait(&sync, &phase, threads)
        if (first)
            for (int64_t i = 0; i < nq / 2; i++) xp[i] = (uint32_t)att[2 * i] | ((uint32_t)att[2 * i + 1] << 16);
        SYNC();
        xgemv(&L->o, 1, xp, h, 1);
        SYNC();
        if (first) {
            rmsnorm_exact(h, L->ln2, x, d, m->eps, W);
            pairs_of(x, xp, d);
        }
        SYNC();
        /* gate and up rows of one block together: act = silu(gate) * up, each rounded */
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < xblocks(&L->gate); b++) {
            float g[XROWS], u[XROWS];
            const int64_t rows = xrows(&L->gate, b, xp, g);
            xrows(&L->up, b, xp, u);
            for (int64_t i = 0; i < rows; i++) act[b * XROWS + i] = rb(bf16f(m->silu[to_bf16(g[i])]) * u[i]);
        }
        SYNC();
        if (first) pairs_of(act, xp, f);
        SYNC();
        xgemv(&L->down, 1, xp, h, 1);
        SYNC();
        if (l + 1 < m->layers) {
            exact_front(m, l + 1, pos, q, &sync, &phase, threads, first);
        } else {
            if (first) {
                rmsnorm_exact(h, m->norm, x, d, m->eps, W);
                pairs_of(x, xp, d);
            }
            SYNC();
            xgemv(&m->head, 1, xp, logits, 0);
        }
#undef SYNC
    }
    return 0;
}

/* torch's attention called from here, through libtorch_cpu's stable C interface (AOTInductor's
 * shim: extern "C" functions, handed over once by `exact.py`, `hs_exact_torch`): `hs_exact_run`
 * then runs a whole exact step in one call, each layer's attention torch's own flash kernel on
 * the cache, as torch's step calls it (one query, keys and values [1, kv_heads, pos + 1, head_dim]
 * views of the cache, GQA by the kernel). */
typedef int32_t (*hs_blob_fn)(void *, int64_t, const int64_t *, const int64_t *, int64_t, int32_t, int32_t,
                              int32_t, void **);
typedef int32_t (*hs_sdpa_fn)(void *, void *, void *, double, int32_t, void **, double *, void **, void **);
typedef int32_t (*hs_data_fn)(void *, void **);
typedef int32_t (*hs_free_fn)(void *);
static struct {
    hs_blob_fn blob;
    hs_sdpa_fn sdpa;
    hs_data_fn data;
    hs_free_fn free;
    int32_t bf16, cpu;
} torch_c;

void hs_exact_torch(void *blob, void *sdpa, void *data, void *free_fn, int32_t bf16, int32_t cpu) {
    torch_c.blob = (hs_blob_fn)blob;
    torch_c.sdpa = (hs_sdpa_fn)sdpa;
    torch_c.data = (hs_data_fn)data;
    torch_c.free = (hs_free_fn)free_fn;
    torch_c.bf16 = bf16;
    torch_c.cpu = cpu;
}

static int torch_attend(const hs_model *m, const hs_layer *L, int64_t end, uint16_t *q, uint16_t *att, double scale) {
    const int64_t H = m->heads, KV = m->kv_heads, hd = m->head_dim, cap = m->capacity;
    const int64_t qs[4] = {1, H, 1, hd}, qst[4] = {H * hd, hd, hd, 1};
    const int64_t ks[4] = {1, KV, end, hd}, kst[4] = {KV * cap * hd, cap * hd, hd, 1};
    void *tq = NULL, *tk = NULL, *tv = NULL, *out = NULL, *lse = NULL, *data = NULL;
    int rc = torch_c.blob(q, 4, qs, qst, 0, torch_c.bf16, torch_c.cpu, 0, &tq) ||
             torch_c.blob(L->kc, 4, ks, kst, 0, torch_c.bf16, torch_c.cpu, 0, &tk) ||
             torch_c.blob(L->vc, 4, ks, kst, 0, torch_c.bf16, torch_c.cpu, 0, &tv) ||
             torch_c.sdpa(tq, tk, tv, 0.0, 0, NULL, &scale, &out, &lse) || torch_c.data(out, &data) || !data;
    if (!rc) memcpy(att, data, (size_t)(H * hd) * 2); /* one query: [heads, head_dim] either way */
    void *made[5] = {tq, tk, tv, out, lse};
    for (int i = 0; i < 5; i++)
        if (made[i]) torch_c.free(made[i]);
    return rc;
}

/* A whole exact step: hs_exact_begin, then each layer's attention (torch's) and hs_exact_layer.
 * q and att: the caller's [heads, head_dim] bf16 buffers; scale: the model's (head_dim ** -0.5).
 * Returns 0; 1 when an argument is out of range; 2 without torch's functions; 3 where torch refused. */
int hs_exact_run(const hs_model *m, int64_t token, int64_t pos, uint16_t *q, uint16_t *att, float *logits,
                 double scale) {
    if (!torch_c.sdpa) return 2;
    if (hs_exact_begin(m, token, pos, q)) return 1;
    for (int64_t l = 0; l < m->layers; l++) {
        if (torch_attend(m, &m->layer[l], pos + 1, q, att, scale)) return 3;
        hs_exact_layer(m, l, pos, att, q, logits);
    }
    return 0;
}

/* The logits [vocab] of `token` at position `pos` (< capacity); the cache gains that position.
 * Returns 0, or 1 when an argument is out of range (nothing written).
 * Scratch: h [dim], x [dim], qkv [(heads + 2 kv_heads) head_dim], att [heads head_dim],
 * act [ffn], scores [heads capacity], xp [max in], xs [max in / 32]. */
int hs_step(const hs_model *m, int64_t token, int64_t pos, float *logits) {
    if (token < 0 || token >= m->vocab || pos < 0 || pos >= m->capacity || m->head_dim > 512)
        return 1;
    if (m->exact) return 1; /* an exact model steps through hs_exact_begin / hs_exact_layer */
    const int64_t d = m->dim, hd = m->head_dim, nq = m->heads * hd, nkv = m->kv_heads * hd;
    const int64_t f = m->ffn, widest = f > nq ? (f > d ? f : d) : (nq > d ? nq : d);
    float *h = m->scratch, *x = h + d, *qkv = x + d, *att = qkv + nq + 2 * nkv;
    float *act = att + nq, *scores = act + f, *xp = scores + m->heads * m->capacity;
    float *xs = xp + widest;
    float cos_[512], sin_[512];
    const int bf16 = (int)m->bf16;
    rope_tables(m, pos, cos_, sin_);
    if (m->embed_f32) {
        memcpy(h, (const float *)m->embed + token * d, d * sizeof(float));
    } else {
        const uint16_t *e = (const uint16_t *)m->embed + token * d;
        for (int64_t i = 0; i < d; i++) h[i] = bf16f(e[i]);
    }
    hs_sync sync;
    sync_init(&sync);
#pragma omp parallel num_threads((int)m->threads)
    {
        const int threads = omp_get_num_threads(), first = omp_get_thread_num() == 0;
        int phase = 0;
#define SYNC() sync_wait(&sync, &phase, threads)
        for (int64_t l = 0; l < m->layers; l++) {
            const hs_layer *L = &m->layer[l];
            if (first) {
                rmsnorm(h, L->ln1, x, d, m->eps, bf16);
                prep_any(&L->q, 3, x, xp, xs);
            }
            SYNC();
            gemv_parts(&L->q, 3, x, xp, xs, qkv, bf16);
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
                prep_any(&L->gate, 2, x, xp, xs);
            }
            SYNC();
            /* gate row i and up row i together: act[i] = silu(gate) * up */
#pragma omp for schedule(static) nowait
            for (int64_t i = 0; i < f; i++) {
                float g = row(&L->gate, i, input(&L->gate, x, xp), xs), u = row(&L->up, i, input(&L->up, x, xp), xs);
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

/* ---- Prefill: many tokens at once, each computed exactly as `hs_step` computes it alone. ----
 * The row products below take up to three inputs at a time, converting each weight vector once for
 * all three, and run for each input the very operations, in the very order, of `dot_int8`,
 * `dot_int4`, `dot_bf16` and `dot_f32` (four fp32 accumulators over blocks of 32, the same
 * reduction). Everything else (norms, rotary, the cache, attention, silu) is the step's own
 * functions, row by row. So a prompt through `hs_prefill` leaves the cache and logits that as many
 * `hs_step` calls leave, bit for bit (tests/engine/test_fused_step.py holds them equal), whatever
 * the chunking: a sequence's positions do not depend on how its prompt was run. */
#define MAXR 5 /* inputs a row product takes at once: int4's (its chain per input is five operations
                 deep); three for the others (four accumulators each, in 16 registers) */
#define DENSE_R 3
#define PREFILL_ROWS 64 /* inputs per chunk: a layer's weights are read once per chunk */
#define OUT_BLOCK 16    /* output rows a thread takes in turn over one chunk's inputs */

static inline __attribute__((always_inline)) __m256 wvec(int kind, const void *w, int64_t i) {
    if (kind == 1) return i8x8((const int8_t *)w + i);
    if (kind == 4) return bf16x8((const uint16_t *)w + i);
    return _mm256_loadu_ps((const float *)w + i);
}

/* v[r] = dot(w, x[r]) for r < R, as dot_int8 / dot_bf16 / dot_f32 compute each (kind 1 / 4 / 3). */
static inline __attribute__((always_inline)) void dots_dense(int kind, const void *w, const float *const *x,
                                                             int R, int64_t n, float *v) {
    __m256 a[MAXR][4];
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++)
        #pragma GCC unroll 8
        for (int j = 0; j < 4; j++) a[r][j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 32) {
        #pragma GCC unroll 8
        for (int j = 0; j < 4; j++) {
            __m256 wj = wvec(kind, w, i + 8 * j);
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) a[r][j] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(x[r] + i + 8 * j), a[r][j]);
        }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++)
        v[r] = hsum8(_mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3])));
}

/* v[r] = dot_int4(w, sz, xp[r], xs[r], n) for r < R. */
static inline __attribute__((always_inline)) void dots_int4(const uint8_t *w, const uint16_t *sz,
                                                            const float *const *xp, const float *const *xs,
                                                            int R, int64_t n, float *v) {
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 acc[MAXR];
    float zeros[MAXR];
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        acc[r] = _mm256_setzero_ps();
        zeros[r] = 0.0f;
    }
    for (int64_t g = 0; g < n / 32; g++) {
        __m128i bytes = _mm_loadu_si128((const __m128i *)(w + g * 16));
        __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
        __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        float scale = bf16f(sz[2 * g]), zero = bf16f(sz[2 * g + 1]);
        __m256 sv = _mm256_set1_ps(scale);
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const float *xg = xp[r] + g * 32;
            __m256 d = _mm256_mul_ps(q0, _mm256_loadu_ps(xg));
            d = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xg + 8), d);
            d = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xg + 16), d);
            d = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xg + 24), d);
            acc[r] = _mm256_fmadd_ps(sv, d, acc[r]);
            zeros[r] += (zero - 8.0f * scale) * xs[r][g];
        }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) v[r] = hsum8(acc[r]) + zeros[r];
}

/* Row `o` of lin for R inputs (x[r], xs[r]: as `row` takes them), bias included: `row`'s values. */
static inline __attribute__((always_inline)) void rows_of(const hs_lin *lin, int64_t o, const float *const *x,
                                                          const float *const *xs, int R, float *v) {
    if (lin->kind == 1) {
        dots_dense(1, (const int8_t *)lin->w + o * lin->in, x, R, lin->in, v);
        const float s = ((const float *)lin->s)[o];
        for (int r = 0; r < R; r++) v[r] = s * v[r];
    } else if (lin->kind == 2) {
        dots_int4((const uint8_t *)lin->w + o * (lin->in / 2), (const uint16_t *)lin->s + o * (lin->in / 16),
                  x, xs, R, lin->in, v);
    } else if (lin->kind == 4) {
        dots_dense(4, (const uint16_t *)lin->w + o * lin->in, x, R, lin->in, v);
    } else {
        dots_dense(3, (const float *)lin->w + o * lin->in, x, R, lin->in, v);
    }
    if (lin->bias)
        for (int r = 0; r < R; r++) v[r] = v[r] + lin->bias[o];
}

static void rows_any(const hs_lin *lin, int64_t o, const float *const *x, const float *const *xs, int R, float *v) {
    if (lin->kind != 2 && R > DENSE_R) {
        rows_any(lin, o, x, xs, DENSE_R, v);
        rows_any(lin, o, x + DENSE_R, xs + DENSE_R, R - DENSE_R, v + DENSE_R);
        return;
    }
    switch (R) {
    case 5: rows_of(lin, o, x, xs, 5, v); break;
    case 4: rows_of(lin, o, x, xs, 4, v); break;
    case 3: rows_of(lin, o, x, xs, 3, v); break;
    case 2: rows_of(lin, o, x, xs, 2, v); break;
    default: rows_of(lin, o, x, xs, 1, v);
    }
}

/* Inputs a pass over rows of `parts` takes at once. */
static int group_of(const hs_lin *parts, int n) {
    for (int i = 0; i < n; i++)
        if (parts[i].kind != 2) return DENSE_R;
    return MAXR;
}

/* One chunk's activations, a row per input: each of stride `ld` floats. */
typedef struct {
    float *base;
    int64_t ld;
} hs_mat;

static inline float *at(hs_mat m, int64_t r) { return m.base + r * m.ld; }

/* The inputs lin reads for rows r..r+R-1: x itself, or for int4 the permuted copies in xp. */
static void inputs_of(const hs_lin *lin, hs_mat x, hs_mat xp, hs_mat xs, int64_t r, int R,
                      const float **xr, const float **xsr) {
    for (int i = 0; i < R; i++) {
        xr[i] = lin->kind == 2 ? at(xp, r + i) : at(x, r + i);
        xsr[i] = at(xs, r + i);
    }
}

/* y[r] (+)= lin x[r] for the chunk's T rows, as `gemv` / `gemv_parts` (n parts) write them; output
 * rows in blocks over the threads (inside the parallel region; no barrier). */
static void gemm_parts(const hs_lin *parts, int n, hs_mat x, hs_mat xp, hs_mat xs, int64_t T,
                       hs_mat y, int add, int bf16) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += parts[i].out;
    const int G = group_of(parts, n);
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < total; b += OUT_BLOCK) {
        const int64_t end = b + OUT_BLOCK < total ? b + OUT_BLOCK : total;
        for (int64_t r = 0; r < T; r += G) {
            const int R = (int)(T - r < G ? T - r : G);
            for (int64_t o = b; o < end; o++) {
                const hs_lin *l = parts;
                int64_t k = o;
                while (k >= l->out) k -= (l++)->out;
                const float *xr[MAXR], *xsr[MAXR];
                inputs_of(l, x, xp, xs, r, R, xr, xsr);
                float v[MAXR];
                rows_any(l, k, xr, xsr, R, v);
                for (int i = 0; i < R; i++) {
                    float *yo = at(y, r + i) + o;
                    float t = bf16 ? rb(v[i]) : v[i];
                    *yo = add ? (bf16 ? rb(*yo + t) : *yo + t) : t;
                }
            }
        }
    }
}

/* act[r][i] = silu(gate row i) * (up row i), as the step computes it. */
static void gate_up(const hs_layer *L, hs_mat x, hs_mat xp, hs_mat xs, int64_t T, hs_mat act,
                    int bf16) {
    const int64_t f = L->gate.out;
    const int G = group_of(&L->gate, 2);
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < f; b += OUT_BLOCK) {
        const int64_t end = b + OUT_BLOCK < f ? b + OUT_BLOCK : f;
        for (int64_t r = 0; r < T; r += G) {
            const int R = (int)(T - r < G ? T - r : G);
            const float *xg[MAXR], *xu[MAXR], *xsr[MAXR];
            inputs_of(&L->gate, x, xp, xs, r, R, xg, xsr);
            inputs_of(&L->up, x, xp, xs, r, R, xu, xsr);
            for (int64_t i = b; i < end; i++) {
                float g[MAXR], u[MAXR];
                rows_any(&L->gate, i, xg, xsr, R, g);
                rows_any(&L->up, i, xu, xsr, R, u);
                for (int k = 0; k < R; k++) {
                    float gk = g[k], uk = u[k];
                    if (bf16) {
                        gk = rb(gk);
                        at(act, r + k)[i] = rb(rb(gk / (1.0f + expf(-gk))) * rb(uk));
                    } else {
                        at(act, r + k)[i] = gk / (1.0f + expf(-gk)) * uk;
                    }
                }
            }
        }
    }
}

/* Floats of `work` that hs_prefill needs for this model and cache capacity. */
int64_t hs_prefill_floats(const hs_model *m) {
    const int64_t d = m->dim, nq = m->heads * m->head_dim, nkv = m->kv_heads * m->head_dim, f = m->ffn;
    const int64_t widest = f > nq ? (f > d ? f : d) : (nq > d ? nq : d);
    const int64_t row = 2 * d + nq + 2 * nkv + nq + f + widest + widest / 32;
    return PREFILL_ROWS * row + m->threads * m->capacity + 64;
}

static void prefill_chunk(const hs_model *m, const int64_t *tokens, int64_t T, int64_t pos, float *logits,
                          int every, float *work) {
    const int64_t d = m->dim, hd = m->head_dim, nq = m->heads * hd, nkv = m->kv_heads * hd, f = m->ffn;
    const int64_t widest = f > nq ? (f > d ? f : d) : (nq > d ? nq : d);
    const int bf16 = (int)m->bf16;
    hs_mat H = {work, d}, X = {H.base + PREFILL_ROWS * d, d};
    hs_mat QKV = {X.base + PREFILL_ROWS * d, nq + 2 * nkv};
    hs_mat ATT = {QKV.base + PREFILL_ROWS * QKV.ld, nq};
    hs_mat ACT = {ATT.base + PREFILL_ROWS * nq, f};
    hs_mat XP = {ACT.base + PREFILL_ROWS * f, widest};
    hs_mat XS = {XP.base + PREFILL_ROWS * widest, widest / 32};
    float *scores = XS.base + PREFILL_ROWS * XS.ld;
    for (int64_t r = 0; r < T; r++) {
        float *h = at(H, r);
        if (m->embed_f32) {
            memcpy(h, (const float *)m->embed + tokens[r] * d, d * sizeof(float));
        } else {
            const uint16_t *e = (const uint16_t *)m->embed + tokens[r] * d;
            for (int64_t i = 0; i < d; i++) h[i] = bf16f(e[i]);
        }
    }
    hs_sync sync;
    sync_init(&sync);
#pragma omp parallel num_threads((int)m->threads)
    {
        const int threads = omp_get_num_threads();
        float *mine = scores + omp_get_thread_num() * m->capacity;
        int phase = 0;
#define SYNC() sync_wait(&sync, &phase, threads)
        for (int64_t l = 0; l < m->layers; l++) {
            const hs_layer *L = &m->layer[l];
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < T; r++) {
                rmsnorm(at(H, r), L->ln1, at(X, r), d, m->eps, bf16);
                prep_any(&L->q, 3, at(X, r), at(XP, r), at(XS, r));
            }
            SYNC();
            gemm_parts(&L->q, 3, X, XP, XS, T, QKV, 0, bf16);
            SYNC();
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < T; r++) {
                float cos_[512], sin_[512];
                float *q = at(QKV, r), *k = q + nq, *v = k + nkv;
                rope_tables(m, pos + r, cos_, sin_);
                for (int64_t i = 0; i < m->heads; i++) rotate(q + i * hd, cos_, sin_, hd, bf16);
                for (int64_t i = 0; i < m->kv_heads; i++) {
                    rotate(k + i * hd, cos_, sin_, hd, bf16);
                    kv_put(L->kc, (i * m->capacity + pos + r) * hd, k + i * hd, hd, bf16);
                    kv_put(L->vc, (i * m->capacity + pos + r) * hd, v + i * hd, hd, bf16);
                }
            }
            SYNC();
#pragma omp for schedule(static) nowait
            for (int64_t p = 0; p < T * m->heads; p++) {
                const int64_t r = p / m->heads;
                attend(m, L, at(QKV, r), at(ATT, r), mine, p % m->heads, pos + r);
            }
            SYNC();
            if (L->o.kind == 2) {
#pragma omp for schedule(static) nowait
                for (int64_t r = 0; r < T; r++) prep(&L->o, at(ATT, r), at(XP, r), at(XS, r));
                SYNC();
            }
            gemm_parts(&L->o, 1, ATT, XP, XS, T, H, 1, bf16);
            SYNC();
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < T; r++) {
                rmsnorm(at(H, r), L->ln2, at(X, r), d, m->eps, bf16);
                prep_any(&L->gate, 2, at(X, r), at(XP, r), at(XS, r));
            }
            SYNC();
            gate_up(L, X, XP, XS, T, ACT, bf16);
            SYNC();
            if (L->down.kind == 2) {
#pragma omp for schedule(static) nowait
                for (int64_t r = 0; r < T; r++) prep(&L->down, at(ACT, r), at(XP, r), at(XS, r));
                SYNC();
            }
            gemm_parts(&L->down, 1, ACT, XP, XS, T, H, 1, bf16);
            SYNC();
        }
        if (logits && every) { /* each row's logits, as its own step's head writes them */
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < T; r++) {
                rmsnorm(at(H, r), m->norm, at(X, r), d, m->eps, bf16);
                prep(&m->head, at(X, r), at(XP, r), at(XS, r));
            }
            SYNC();
            hs_mat Y = {logits, m->vocab};
            gemm_parts(&m->head, 1, X, XP, XS, T, Y, 0, bf16);
        } else if (logits) {
            const int64_t r = T - 1;
            if (omp_get_thread_num() == 0) {
                rmsnorm(at(H, r), m->norm, at(X, r), d, m->eps, bf16);
                prep(&m->head, at(X, r), at(XP, r), at(XS, r));
            }
            SYNC();
            gemv(&m->head, input(&m->head, at(X, r), at(XP, r)), at(XS, r), logits, 0, bf16);
        }
#undef SYNC
    }
}

/* The logits [vocab] of the last of `count` tokens at positions pos..pos+count-1 (the cache holds
 * `pos` positions; pos + count <= capacity); the cache gains them all, as `count` steps would leave
 * it. work: hs_prefill_floats(m) floats. Returns 0, or 1 when an argument is out of range (nothing
 * written). */
static int prefill_rows(const hs_model *m, const int64_t *tokens, int64_t count, int64_t pos, float *logits,
                        int every, float *work) {
    if (count < 1 || pos < 0 || pos + count > m->capacity || m->head_dim > 512) return 1;
    for (int64_t i = 0; i < count; i++)
        if (tokens[i] < 0 || tokens[i] >= m->vocab) return 1;
    for (int64_t c = 0; c < count; c += PREFILL_ROWS) {
        const int64_t T = count - c < PREFILL_ROWS ? count - c : PREFILL_ROWS;
        float *out = every ? logits + c * m->vocab : c + T == count ? logits : NULL;
        prefill_chunk(m, tokens + c, T, pos + c, out, every, work);
    }
    return 0;
}

int hs_prefill(const hs_model *m, const int64_t *tokens, int64_t count, int64_t pos, float *logits, float *work) {
    return prefill_rows(m, tokens, count, pos, logits, 0, work);
}

/* As hs_prefill, with the logits of every token: logits [count, vocab], row i what the step of
 * tokens[i] at pos + i returns, bit for bit (a draft's tokens checked at once: engine/speculate.py). */
int hs_prefill_every(const hs_model *m, const int64_t *tokens, int64_t count, int64_t pos, float *logits,
                     float *work) {
    return prefill_rows(m, tokens, count, pos, logits, 1, work);
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
