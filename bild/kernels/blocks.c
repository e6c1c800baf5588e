/* y = x W^T for weights in GGUF-style blocks of 32 along the input dim, fp32 activations and accumulation.

   q4_1 block (24 bytes): float d, float m, 16 bytes of nibbles; element j < 16 is the low nibble of byte j,
        element j + 16 its high nibble; w = d * q + m with q in 0..15.
   q8_0 block (36 bytes): float d, 32 int8; w = d * q.

   Each weight is rebuilt in registers with one rounding, fl(d * q + m) (d * q is exact), which is the value
   gguf's own dequantisation produces. Every (row t, output n) dot product runs the same instruction sequence
   whatever the number of rows T, so results are batch-invariant: a row gives bitwise the same output alone or
   among T. Built by bild/kernels/__init__.py with -O3 -mavx2 -mfma -fopenmp.  Rows of x go in
   tiles of up to 8 against each block rebuilt in registers. GGUF's own layouts (Q4_K, Q6_K, Q5_0, Q8_0 with fp16
   scales) are kquant.c's; model_forward below runs layers made of any of the kinds.

   int8 activations (optional, lossy; what llama.cpp computes): each row's 32-value block of x is rounded to
   xd * qx with xd = max |x| / 127 and qx in -127..127, and a block's product is an integer dot product, d * xd *
   sum(q qx) (+ m * xd * sum(qx) for q4_1), accumulated in fp32. That is about 1.3x faster for one row of x
   (benchmarks/block_kernel.py); every output still runs the same instruction sequence whatever T, so it stays
   batch-invariant. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kquant.h"

#define QK 32
#define Q4_BYTES 24
#define Q8_BYTES 36
#define PREFETCH_BYTES 2048 /* how far ahead along a weight row the products prefetch (every other block) */
#define TILE 8 /* rows of x per pass over a weight row; the weight row stays in L1 across passes */

static inline int block_bytes(int kind) { return kind == 4 ? Q4_BYTES : Q8_BYTES; }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline void q4_1_block(const uint8_t *blk, __m256 w[4]) {
    float d, m;
    memcpy(&d, blk, 4);
    memcpy(&m, blk + 4, 4);
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 8)));   /* bytes 0..7 */
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 16)));  /* bytes 8..15 */
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(a, mask)), dv, mv);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, mask)), dv, mv);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), dv, mv);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), dv, mv);
}

static inline void q8_0_block(const uint8_t *blk, __m256 w[4]) {
    float d;
    memcpy(&d, blk, 4);
    const __m256 dv = _mm256_set1_ps(d);
    for (int i = 0; i < 4; i++)
        w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 4 + 8 * i)))), dv);
}

/* One block of a weight row against R rows of x: a block's partial sum is (w0 x0 + w1 x1) + (w2 x2 + w3 x3). */
static inline __attribute__((always_inline)) void block_dot(const uint8_t *blk, int kind, const float *x, int K,
                                                           int R, __m256 *acc) {
    __m256 w[4];
    if (kind == 4) q4_1_block(blk, w);
    else q8_0_block(blk, w);
    for (int r = 0; r < R; r++) {
        const float *xb = x + (size_t)r * K;
        __m256 p = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), _mm256_mul_ps(w[0], _mm256_loadu_ps(xb)));
        __m256 s = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), _mm256_mul_ps(w[2], _mm256_loadu_ps(xb + 16)));
        acc[r] = _mm256_add_ps(acc[r], _mm256_add_ps(p, s));
    }
}

/* One weight row against R rows of x (R a constant after inlining). The loop-carried chain is one add per block,
   shorter than the block's own work. */
static inline __attribute__((always_inline)) void row_tile(const float *x, int K, const uint8_t *wrow, int kind,
                                                          int R, float *y, int N) {
    const int bytes = block_bytes(kind);
    __m256 acc[TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < K / QK; b++) {
        if (b % 2 == 0) _mm_prefetch((const char *)(wrow + (size_t)b * bytes + PREFETCH_BYTES), _MM_HINT_T0);
        block_dot(wrow + (size_t)b * bytes, kind, x + (size_t)b * QK, K, R, acc);
    }
    for (int r = 0; r < R; r++) y[(size_t)r * N] = hsum(acc[r]);
}

static void row(const float *x, int T, int K, const uint8_t *wrow, int kind, float *y, int N) {
    for (int t = 0; t < T; t += TILE) {
        const float *xt = x + (size_t)t * K;
        float *yt = y + (size_t)t * N;
        switch (T - t >= TILE ? TILE : T - t) {
        case 8: row_tile(xt, K, wrow, kind, 8, yt, N); break;
        case 7: row_tile(xt, K, wrow, kind, 7, yt, N); break;
        case 6: row_tile(xt, K, wrow, kind, 6, yt, N); break;
        case 5: row_tile(xt, K, wrow, kind, 5, yt, N); break;
        case 4: row_tile(xt, K, wrow, kind, 4, yt, N); break;
        case 3: row_tile(xt, K, wrow, kind, 3, yt, N); break;
        case 2: row_tile(xt, K, wrow, kind, 2, yt, N); break;
        default: row_tile(xt, K, wrow, kind, 1, yt, N); break;
        }
    }
}

/* y = x W^T shared among the threads of the enclosing parallel region (each takes a run of output columns).
   Rows of x go in chunks of about X_CHUNK_BYTES, a multiple of TILE rows, that stay in L2 while every weight row
   passes over them: a long prompt's x would otherwise stream from memory once per weight row. */
#define X_CHUNK_BYTES (192 * 1024)
static void linear_team(const float *x, int T, int K, const uint8_t *w, int N, int kind, float *y, int ldy) {
    const size_t row_bytes = (size_t)(K / QK) * block_bytes(kind);
    int chunk = X_CHUNK_BYTES / (int)(sizeof(float) * K) / TILE * TILE;
    if (chunk < TILE) chunk = TILE;
    for (int t = 0; t < T; t += chunk) {
        const int rows = T - t < chunk ? T - t : chunk;
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++)
            row(x + (size_t)t * K, rows, K, w + (size_t)n * row_bytes, kind, y + (size_t)t * ldy + n, ldy);
    }
}

/* x (T, K) float32, w (N, K / 32, block bytes), y (T, N) float32; kind 4 = q4_1, 8 = q8_0. */
void block_linear(const float *x, int T, int K, const uint8_t *w, int N, int kind, float *y, int threads) {
#pragma omp parallel num_threads(threads)
    linear_team(x, T, K, w, N, kind, y, N);
}

/* ---- int8 activations ------------------------------------------------------------------------------------- */

/* x rounded per 32-value block: q (T, K) int8, d (T, K / 32) scales, s (T, K / 32) = d * sum of the block's q. */
typedef struct {
    int8_t *q;
    float *d, *s;
} xq_t;

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

/* One row x (K,) -> q (K,), d, s (K / 32,): q = round-to-nearest-even(x * 127 / max |x|), d = max |x| / 127. */
static void quantise_row(const float *x, int K, int8_t *q, float *d, float *s) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int b = 0; b < K / QK; b++) {
        __m256 v[4], top = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++)
            v[i] = _mm256_loadu_ps(x + b * QK + 8 * i), top = _mm256_max_ps(top, _mm256_and_ps(v[i], abs_mask));
        const float amax = hmax(top);
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m256i n[4];
        for (int i = 0; i < 4; i++)
            n[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i n01 = _mm256_packs_epi32(n[0], n[1]), n23 = _mm256_packs_epi32(n[2], n[3]); /* lane-interleaved */
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(n01, n23),
                                                          _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); /* in order */
        _mm256_storeu_si256((__m256i *)(q + b * QK), bytes);
        d[b] = amax / 127.0f;
        s[b] = d[b] * (float)hsum_epi32(_mm256_madd_epi16(_mm256_add_epi16(n01, n23), _mm256_set1_epi16(1)));
    }
}

/* A q4_1 block's 32 nibbles as bytes in element order (element j < 16 is byte j's low nibble, j + 16 its high). */
static inline __m256i nibbles(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), low = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
}

/* sum(q * qx) over a block, 8 int32 lanes converted to float: exact. */
static inline __m256 block_isum(__m256i q, __m256i qx, int kind) {
    const __m256i prod = kind == 4 ? _mm256_maddubs_epi16(q, qx) /* q unsigned */
                                   : _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(qx, q));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, _mm256_set1_epi16(1)));
}

/* Block b of one weight row against R rows of x, into output r's chain acc[r], macc[r]. */
static inline __attribute__((always_inline)) void block_int8(const xq_t *x, int K, const uint8_t *blk, int b, int kind,
                                                            int R, __m256 *acc, float *macc) {
    const int nb = K / QK;
    float d, m = 0.0f;
    memcpy(&d, blk, 4);
    if (kind == 4) memcpy(&m, blk + 4, 4);
    const __m256i q = kind == 4 ? nibbles(blk + 8) : _mm256_loadu_si256((const __m256i *)(blk + 4));
    for (int r = 0; r < R; r++) {
        const __m256i qx = _mm256_loadu_si256((const __m256i *)(x->q + (size_t)r * K + b * QK));
        const size_t rb = (size_t)r * nb + b;
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x->d[rb]), block_isum(q, qx, kind), acc[r]);
        if (kind == 4) macc[r] = fmaf(m, x->s[rb], macc[r]);
    }
}

/* One weight row against R rows of x (R <= 4, a constant after inlining). Output r accumulates its even blocks in
   one chain and its odd blocks in another, in order, whatever R: two chains hide the fma latency even for one
   row, and the weight row streams in order. */
static inline __attribute__((always_inline)) void tile_int8(const xq_t *x, int K, const uint8_t *w, int kind, int R,
                                                           float *y, int N) {
    const int nb = K / QK, bytes = block_bytes(kind);
    __m256 even[4], odd[4];
    float meven[4], modd[4];
    for (int r = 0; r < R; r++) even[r] = odd[r] = _mm256_setzero_ps(), meven[r] = modd[r] = 0.0f;
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        _mm_prefetch((const char *)(w + (size_t)b * bytes + PREFETCH_BYTES), _MM_HINT_T0);
        block_int8(x, K, w + (size_t)b * bytes, b, kind, R, even, meven);
        block_int8(x, K, w + (size_t)(b + 1) * bytes, b + 1, kind, R, odd, modd);
    }
    if (b < nb) block_int8(x, K, w + (size_t)b * bytes, b, kind, R, even, meven);
    for (int r = 0; r < R; r++) y[(size_t)r * N] = hsum(_mm256_add_ps(even[r], odd[r])) + (meven[r] + modd[r]);
}

/* One weight row against T rows of x, in tiles of up to 4 rows. */
static void row_int8(const xq_t *x, int T, int K, const uint8_t *wrow, int kind, float *y, int N) {
    const int nb = K / QK;
    for (int t = 0; t < T; t += 4) {
        const xq_t xt = {x->q + (size_t)t * K, x->d + (size_t)t * nb, x->s + (size_t)t * nb};
        float *yt = y + (size_t)t * N;
        switch (T - t >= 4 ? 4 : T - t) {
        case 4: tile_int8(&xt, K, wrow, kind, 4, yt, N); break;
        case 3: tile_int8(&xt, K, wrow, kind, 3, yt, N); break;
        case 2: tile_int8(&xt, K, wrow, kind, 2, yt, N); break;
        default: tile_int8(&xt, K, wrow, kind, 1, yt, N); break;
        }
    }
}

/* y = x W^T with x rounded to int8 blocks into xq (room for T rows of K), shared among the team's threads; rows
   of xq go in L2-sized chunks, as in linear_team. */
static void linear_int8_team(const float *x, int T, int K, const uint8_t *w, int N, int kind, float *y, int ldy,
                             xq_t *xq) {
    const int nb = K / QK;
    const size_t row_bytes = (size_t)nb * block_bytes(kind);
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++)
        quantise_row(x + (size_t)t * K, K, xq->q + (size_t)t * K, xq->d + (size_t)t * nb, xq->s + (size_t)t * nb);
    int chunk = X_CHUNK_BYTES / K / 4 * 4;
    if (chunk < 4) chunk = 4;
    for (int t = 0; t < T; t += chunk) {
        const xq_t xt = {xq->q + (size_t)t * K, xq->d + (size_t)t * nb, xq->s + (size_t)t * nb};
        const int rows = T - t < chunk ? T - t : chunk;
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++)
            row_int8(&xt, rows, K, w + (size_t)n * row_bytes, kind, y + (size_t)t * ldy + n, ldy);
    }
}

static int xq_alloc(xq_t *xq, int T, int K) {
    xq->q = malloc((size_t)T * K);
    xq->d = malloc(sizeof(float) * (size_t)T * (K / QK));
    xq->s = malloc(sizeof(float) * (size_t)T * (K / QK));
    return xq->q && xq->d && xq->s;
}

static void xq_free(xq_t *xq) { free(xq->q), free(xq->d), free(xq->s); }

/* As block_linear, with x rounded to int8 blocks. Returns 0, or -1 when scratch memory cannot be had. */
int block_linear_int8(const float *x, int T, int K, const uint8_t *w, int N, int kind, float *y, int threads) {
    xq_t xq;
    const int ok = xq_alloc(&xq, T, K);
    if (ok) {
#pragma omp parallel num_threads(threads)
        linear_int8_team(x, T, K, w, N, kind, y, N, &xq);
    }
    xq_free(&xq);
    return ok ? 0 : -1;
}

/* ------------------------------------------------------------------------------------------------------------
   One LLaMA decoder layer over T tokens at positions start..start+T-1, every matmul weight in blocks: the
   native engine's attention() and mlp() (bild/native.py) without a Python call per operation. x (T, dim) is
   updated in place; the layer's K and V caches are (H_kv, S, D). Attention for query t reads keys 0..start+t in
   order, so like the products it is batch-invariant. */

typedef struct {
    int dim, n_heads, n_kv_heads, head_dim, ffn_dim, cache_length; /* cache_length: S of the (H_kv, S, D) caches */
    float eps;
} dims_t;

/* One product's weights: the rows of up to MAX_SEGMENTS weights one after another (q | k | v, gate | up), each
   of its own kind, writing consecutive output columns. */
#define MAX_SEGMENTS 4
typedef struct {
    const uint8_t *w;
    int kind, rows;
} segment_t;

typedef struct {
    segment_t seg[4][MAX_SEGMENTS]; /* wqkv, wo, w13, w2 */
    int n_seg[4];
    const float *bias[4]; /* or NULL */
    const float *attn_norm, *mlp_norm;
    int int8; /* 1: the products take int8 activations */
} layer_t;

/* Sum of a (n,) row's squares in a fixed order: 8 lanes over the multiple-of-8 prefix, then the tail. */
static float sum_squares(const float *x, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float s = hsum(acc);
    for (; i < n; i++) s += x[i] * x[i];
    return s;
}

static void rms_norm_row(const float *x, int dim, const float *w, float eps, float *out) {
    const float r = 1.0f / sqrtf(sum_squares(x, dim) / dim + eps);
    for (int i = 0; i < dim; i++) out[i] = w[i] * (x[i] * r);
}

/* x (D,) rotated in place: x * cos + [x2, x1] * sin, the sign of rotate_half folded into sin. */
static void rope(float *x, int D, const float *cos, const float *sin) {
    const int h = D / 2;
    for (int i = 0; i < h; i++) {
        const float a = x[i], b = x[i + h];
        x[i] = a * cos[i] + b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* q . k over D: four 8-lane partial sums when D % 32 == 0 (one when D % 8 == 0, scalar otherwise), each key's
   sum computed the same way wherever it sits, so a query's scores never depend on the other queries. */
static inline float dot(const float *q, const float *k, int D) {
    if (D % 32 == 0) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < D; i += 32) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(k + i + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 16), _mm256_loadu_ps(k + i + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 24), _mm256_loadu_ps(k + i + 24), a3);
        }
        return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
    if (D % 8 == 0) {
        __m256 a = _mm256_setzero_ps();
        for (int i = 0; i < D; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a);
        return hsum(a);
    }
    float s = 0.0f;
    for (int i = 0; i < D; i++) s += q[i] * k[i];
    return s;
}

/* e^x in 8 lanes, Cephes' expf: a degree-5 polynomial after x = n ln2 + r, within 2 ulp; every lane is computed
   alone, so a value's exponential never depends on its neighbours. exp1 is the same function for one value. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline float exp1(float x) { return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x))); }

/* s[j] = e^(s[j] - top) for j < n; returns their sum, added in order of j. */
static float exps(float *s, int n, float top) {
    int j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(s + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(top))));
    for (; j < n; j++) s[j] = exp1(s[j] - top);
    float total = 0.0f;
    for (j = 0; j < n; j++) total += s[j];
    return total;
}

/* y[0, 8V) = sum_j p[j] v_j[0, 8V) over rows v_j of vc (D floats apart), in registers; V a constant after inlining. */
static inline __attribute__((always_inline)) void weigh(const float *p, const float *vc, int n_keys, int D, int V,
                                                       float *y) {
    __m256 acc[8];
    for (int i = 0; i < V; i++) acc[i] = _mm256_setzero_ps();
    for (int j = 0; j < n_keys; j++) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        for (int i = 0; i < V; i++) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vc + (size_t)j * D + 8 * i), acc[i]);
    }
    for (int i = 0; i < V; i++) _mm256_storeu_ps(y + 8 * i, acc[i]);
}

/* y (D,) = softmax(q K^T / sqrt(D)) V over the first n_keys rows of kc, vc (rows of D floats). */
static void attend(const float *q, const float *kc, const float *vc, int n_keys, int D, float *scores, float *y) {
    const float scale = 1.0f / sqrtf((float)D);
    float top = -INFINITY;
    for (int j = 0; j < n_keys; j++) {
        scores[j] = dot(q, kc + (size_t)j * D, D) * scale;
        if (scores[j] > top) top = scores[j];
    }
    const float total = exps(scores, n_keys, top);
    for (int j = 0; j < n_keys; j++) scores[j] /= total;
    if (D % 8 == 0) {
        for (int c0 = 0; c0 < D; c0 += 64) /* 64 columns (8 registers) at a time */
            switch ((D - c0 >= 64 ? 64 : D - c0) / 8) {
            case 8: weigh(scores, vc + c0, n_keys, D, 8, y + c0); break;
            case 7: weigh(scores, vc + c0, n_keys, D, 7, y + c0); break;
            case 6: weigh(scores, vc + c0, n_keys, D, 6, y + c0); break;
            case 5: weigh(scores, vc + c0, n_keys, D, 5, y + c0); break;
            case 4: weigh(scores, vc + c0, n_keys, D, 4, y + c0); break;
            case 3: weigh(scores, vc + c0, n_keys, D, 3, y + c0); break;
            case 2: weigh(scores, vc + c0, n_keys, D, 2, y + c0); break;
            default: weigh(scores, vc + c0, n_keys, D, 1, y + c0); break;
            }
        return;
    }
    for (int i = 0; i < D; i++) y[i] = 0.0f;
    for (int j = 0; j < n_keys; j++)
        for (int i = 0; i < D; i++) y[i] = fmaf(scores[j], vc[(size_t)j * D + i], y[i]);
}

/* Per-layer scratch, shared by the team: h (T, dim), qkv (T, (H + 2 H_kv) D), y (T, max(H D, 2F)),
   o (T, max(dim, F)), and x rounded to int8 for the products, xq (T, max(dim, H D, F)) for q4_1 / q8_0 and kx
   for GGUF's kinds. */
typedef struct {
    float *h, *qkv, *y, *o;
    xq_t xq;
    kx_t kx;
} scratch_t;

static int scratch_alloc(scratch_t *s, int T, const dims_t *c) {
    const int HD = c->n_heads * c->head_dim, width = (c->n_heads + 2 * c->n_kv_heads) * c->head_dim;
    const int wide = c->dim > c->ffn_dim ? c->dim : c->ffn_dim;
    s->h = malloc(sizeof(float) * (size_t)T * c->dim);
    s->qkv = malloc(sizeof(float) * (size_t)T * width);
    s->y = malloc(sizeof(float) * (size_t)T * (HD > 2 * c->ffn_dim ? HD : 2 * c->ffn_dim));
    s->o = malloc(sizeof(float) * (size_t)T * wide);
    const int xq = xq_alloc(&s->xq, T, wide > HD ? wide : HD), kx = kx_alloc(&s->kx, T, wide > HD ? wide : HD);
    return s->h && s->qkv && s->y && s->o && xq && kx;
}

static void scratch_free(scratch_t *s) {
    free(s->h), free(s->qkv), free(s->y), free(s->o), xq_free(&s->xq), kx_free(&s->kx);
}

/* y (T, N) = x W^T for the layer's product i, segment by segment, in its activation precision; ends in a barrier.
   GGUF segments share x rounded once per block family (256 or 32 values). */
static void layer_linear(const layer_t *L, int i, const float *x, int T, int K, int N, float *y, scratch_t *s) {
    int family = 0, col = 0;
    for (int g = 0; g < L->n_seg[i]; g++) {
        const segment_t *sg = &L->seg[i][g];
        if (!kq_is_gguf(sg->kind)) { /* bild's q4_1 / q8_0: these end in a barrier */
            if (L->int8) linear_int8_team(x, T, K, sg->w, sg->rows, sg->kind, y + col, N, &s->xq);
            else linear_team(x, T, K, sg->w, sg->rows, sg->kind, y + col, N);
        } else if (!L->int8) {
            kq_linear_f32(x, T, K, sg->w, sg->rows, sg->kind, y + col, N);
        } else {
            if (kq_family(sg->kind) != family) {
                if (family) {
#pragma omp barrier
                }
                family = kq_family(sg->kind);
                kq_quantise(x, T, K, family, &s->kx);
            }
            kq_linear_int8(&s->kx, T, K, sg->w, sg->rows, sg->kind, y + col, N);
        }
        col += sg->rows;
    }
#pragma omp barrier
}

/* x[t] += (o[t] + b) for every row t (b may be NULL). */
static void residual_team(float *x, const float *o, const float *b, int T, int dim) {
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++)
        for (int i = 0; i < dim; i++) x[(size_t)t * dim + i] += b ? o[(size_t)t * dim + i] + b[i] : o[(size_t)t * dim + i];
}

static void norm_team(const float *x, int T, int dim, const float *w, float eps, float *out) {
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) rms_norm_row(x + (size_t)t * dim, dim, w, eps, out + (size_t)t * dim);
}

/* qkv rows: bias, RoPE on the query and key heads, keys and values written to the caches at their positions. */
static void rope_team(float *qkv, int T, int start, const dims_t *c, const float *bias, float *kc, float *vc,
                      const float *cos, const float *sin) {
    const int H = c->n_heads, Hkv = c->n_kv_heads, D = c->head_dim, width = (H + 2 * Hkv) * D;
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) {
        float *row = qkv + (size_t)t * width;
        if (bias)
            for (int i = 0; i < width; i++) row[i] += bias[i];
        const float *ct = cos + (size_t)(start + t) * D, *st = sin + (size_t)(start + t) * D;
        for (int j = 0; j < H + Hkv; j++) rope(row + (size_t)j * D, D, ct, st);
        for (int g = 0; g < Hkv; g++) {
            memcpy(kc + ((size_t)g * c->cache_length + start + t) * D, row + (size_t)(H + g) * D, sizeof(float) * D);
            memcpy(vc + ((size_t)g * c->cache_length + start + t) * D, row + (size_t)(H + Hkv + g) * D,
                   sizeof(float) * D);
        }
    }
}

/* y (T, H D): every (query head, token) pair attends over keys 0..start+t; head h reads kv head h / G. */
static void attention_team(const float *qkv, int T, int start, const dims_t *c, const float *kc, const float *vc,
                           float *scores, float *y) {
    const int H = c->n_heads, D = c->head_dim, G = H / c->n_kv_heads, width = (H + 2 * c->n_kv_heads) * D;
#pragma omp for schedule(static)
    for (int ht = 0; ht < H * T; ht++) {
        const int hd = ht / T, t = ht % T;
        const size_t kv = (size_t)(hd / G) * c->cache_length * D;
        attend(qkv + (size_t)t * width + (size_t)hd * D, kc + kv, vc + kv, start + t + 1, D, scores,
               y + (size_t)t * H * D + (size_t)hd * D);
    }
}

/* o (T, F) = silu(gate + b) * (up + b) from y (T, 2F) = [gate | up]; 8 values at a time when F % 8 == 0. */
static void swiglu_team(const float *y, const float *b, int T, int F, float *o) {
    const int step = F % 8 ? 1 : 8;
#pragma omp for schedule(static)
    for (int i = 0; i < T * F; i += step) {
        const int t = i / F, j = i % F;
        const float *gate = y + (size_t)t * 2 * F + j, *up = gate + F;
        if (step == 8) {
            __m256 g = _mm256_loadu_ps(gate), u = _mm256_loadu_ps(up);
            if (b) g = _mm256_add_ps(g, _mm256_loadu_ps(b + j)), u = _mm256_add_ps(u, _mm256_loadu_ps(b + F + j));
            const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_sub_ps(_mm256_setzero_ps(), g);
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, exp8(neg))), u));
        } else {
            const float g = *gate + (b ? b[j] : 0.0f), u = *up + (b ? b[F + j] : 0.0f);
            o[i] = g / (1.0f + exp1(-g)) * u;
        }
    }
}

/* One decoder layer, run by every thread of the enclosing parallel region; each `omp for` ends in a barrier. */
static void layer_team(float *x, int T, int start, const dims_t *c, const layer_t *L, float *kc, float *vc,
                       const float *cos, const float *sin, scratch_t *s, float *scores) {
    const int HD = c->n_heads * c->head_dim, F = c->ffn_dim, dim = c->dim;
    const int width = (c->n_heads + 2 * c->n_kv_heads) * c->head_dim;
    norm_team(x, T, dim, L->attn_norm, c->eps, s->h);
    layer_linear(L, 0, s->h, T, dim, width, s->qkv, s); /* (T, (H + 2 H_kv) D) */
    rope_team(s->qkv, T, start, c, L->bias[0], kc, vc, cos, sin);
    attention_team(s->qkv, T, start, c, kc, vc, scores, s->y); /* (T, H D) */
    layer_linear(L, 1, s->y, T, HD, dim, s->o, s); /* (T, dim) */
    residual_team(x, s->o, L->bias[1], T, dim);
    norm_team(x, T, dim, L->mlp_norm, c->eps, s->h);
    layer_linear(L, 2, s->h, T, dim, 2 * F, s->y, s); /* (T, 2F): gate, then up */
    swiglu_team(s->y, L->bias[2], T, F, s->o); /* (T, F) */
    layer_linear(L, 3, s->o, T, F, dim, s->h, s); /* (T, dim) */
    residual_team(x, s->h, L->bias[3], T, dim);
}

/* n_layers decoder layers over x (T, dim), updated in place, in one parallel region. Layer l's caches are
   kc[l], vc[l] (H_kv, S, D). Returns 0, or -1 when scratch memory cannot be had. */
int model_forward(float *x, int T, int start, const dims_t *c, const layer_t *layers, int n_layers, float **kc,
                  float **vc, const float *cos, const float *sin, int threads) {
    scratch_t s;
    if (!scratch_alloc(&s, T, c)) {
        scratch_free(&s);
        return -1;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(start + T));
#pragma omp atomic
        failed += scores == NULL;
#pragma omp barrier
        for (int l = 0; l < n_layers && !failed; l++)
            layer_team(x, T, start, c, &layers[l], kc[l], vc[l], cos, sin, &s, scores);
        free(scores);
    }
    scratch_free(&s);
    return failed ? -1 : 0;
}
