/* y = x W^T for weights in GGUF's own block layouts, read as the file holds them (little-endian, fp16 scales).

   Layouts (one block covers that many consecutive values of a weight row; a row is K / values blocks):
   gguf_q4_k  256 values, 144 bytes: fp16 d, fp16 dmin, 12 bytes of eight 6-bit scales sc_j and mins m_j
              (packed as ggml's get_scale_min_k4), 128 bytes of nibbles. Sub-block j (values 32j..32j+31) is
              the low nibbles (j even) or high nibbles (j odd) of bytes 32 (j / 2)..+31.
              w = (d sc_j) q - (dmin m_j), q in 0..15.
   gguf_q6_k  256 values, 210 bytes: 128 bytes ql, 64 bytes qh, 16 int8 scales, fp16 d. Value v (half h = v / 128,
              u = v % 128): low 4 bits from ql[64 h + u % 64] (low nibble if u < 64, else high), high 2 bits from
              qh[32 h + u % 32] >> 2 (u / 32). w = (d sc[v / 16]) (q - 32), q in 0..63.
   gguf_q5_0  32 values, 22 bytes: fp16 d, 4 bytes qh (bit i: value i's 5th bit), 16 bytes nibbles (value i < 16
              the low nibble of byte i, value i + 16 its high one). w = d (q - 16), q in 0..31.
   gguf_q8_0  32 values, 34 bytes: fp16 d, 32 int8 q. w = d q.

   Every weight is rebuilt in one rounding, as gguf.quants.dequantize computes it (d sc, dmin m and d sc q are
   exact in fp32, so only Q4_K's subtraction rounds; an fma gives the same value).

   fp32 activations (exact reference): per output, value v of the row goes into lane v % 32 of 32 fp32 fma
   lanes, in order of v; the lanes are added in one fixed tree at the end.

   int8 activations (what llama.cpp computes, lossy): each row of x is rounded per block of 256 values (K-quants,
   like ggml's Q8_K) or 32 (Q5_0, Q8_0) to xd * qx, qx = round-half-even(x * 127 / max |x|) in -127..127, and
   for Q4_K the sums of each 32 qx are kept (times xd). A weight block is unpacked once to int16 weights with its
   integer sub-block scale applied (sc q, sc (q - 32), q - 16, q), which then serves all rows of the tile: per
   row, int16 pair products summed into 16 int32 lanes (vpdpwssd, or pmaddwd + paddd) give exact integers;
   lane l is converted (exactly: |sum| < 2^24) and fma'd with the float scale d * xd of the block into float
   lane l. Q4_K's mins go into 8 more float lanes: (dmin m_j) * (xd sum_j qx). The output is the fixed-tree
   sum of the 16 lanes minus that of the 8.

   So each output runs one instruction sequence whatever the number of rows (batch-invariant), and the float
   operations are the same on every ISA build: AVX-512 (one 512-bit register per 16 lanes), AVX-VNNI and AVX2
   (two 256-bit halves): results are bitwise the same on all three. The ISA is chosen by the compiler flags
   of each build (bild/kernels/__init__.py builds one library per ISA and loads the one the CPU runs). */

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "kquant.h"

#define TILE 16 /* rows of x per pass over a weight row: each block is unpacked once per 16 rows */
#define PREFETCH_BYTES 2048 /* how far ahead along the weight stream the products prefetch */
#define X_CHUNK_BYTES (256 * 1024) /* rows of x per pass over the whole weight stay in L2 */

static inline int kind_bytes(int kind) {
    switch (kind) {
    case KIND_GGUF_Q4_K: return 144;
    case KIND_GGUF_Q6_K: return 210;
    case KIND_GGUF_Q5_0: return 22;
    default: return 34;
    }
}

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline float hsum8(__m256 v) { /* the same tree as blocks.c's hsum */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- 16 lanes, in one 512-bit register or two 256-bit halves ------------------------------------------------
   vi: 32 int16 (as weights or activations) or 16 int32 (sums); vf: 16 floats. Lane l of an int32 sum holds the
   products of int16 elements 2l and 2l + 1, on every ISA. */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define KQ_ISA "avx512vnni"
typedef __m512i vi;
typedef __m512 vf;
static inline vi vi_zero(void) { return _mm512_setzero_si512(); }
static inline vi vi_u8(const uint8_t *p) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
static inline vi vi_s8(__m256i v) { return _mm512_cvtepi8_epi16(v); }
static inline vi vi_and(vi a, int m) { return _mm512_and_si512(a, _mm512_set1_epi16((short)m)); }
static inline vi vi_or(vi a, vi b) { return _mm512_or_si512(a, b); }
static inline vi vi_srl(vi a, int n) { return _mm512_srl_epi16(a, _mm_cvtsi32_si128(n)); }
static inline vi vi_sll(vi a, int n) { return _mm512_sll_epi16(a, _mm_cvtsi32_si128(n)); }
static inline vi vi_subc(vi a, int c) { return _mm512_sub_epi16(a, _mm512_set1_epi16((short)c)); }
static inline vi vi_scale(vi a, int s0, int s1) { /* elements 0..15 times s0, 16..31 times s1 */
    const vi s = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)s0)), _mm256_set1_epi16((short)s1), 1);
    return _mm512_mullo_epi16(a, s);
}
static inline void vi_store(int16_t *p, vi a) { _mm512_storeu_si512(p, a); }
static inline vi vi_dot(vi acc, vi w, const int16_t *x) { return _mm512_dpwssd_epi32(acc, w, _mm512_loadu_si512(x)); }
static inline vi vi_add32(vi a, vi b) { return _mm512_add_epi32(a, b); }
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_fma_i(vf acc, vi i, float s) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_set1_ps(s), acc); }
static inline vf vf_fma(vf acc, const float *w, const float *x) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(w), _mm512_loadu_ps(x), acc);
}
static inline float vf_hsum(vf a) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    return hsum8(_mm256_add_ps(_mm512_castps512_ps256(a), hi));
}
/* vb: 64 bytes (values 0..31 in the low half, 32..63 in the high half). */
typedef __m512i vb;
static inline vb vb_nibbles(const uint8_t *p, int high) { /* 64 bytes' low or high nibbles */
    const __m512i v = _mm512_loadu_si512(p);
    return _mm512_and_si512(high ? _mm512_srli_epi16(v, 4) : v, _mm512_set1_epi8(0x0F));
}
static inline vb vb_halves(const uint8_t *p, int s0, int s1, int mask) { /* 32 bytes >> s0, then >> s1, masked */
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
    const __m512i counts = _mm512_inserti64x4(_mm512_set1_epi16((short)s0), _mm256_set1_epi16((short)s1), 1);
    return _mm512_and_si512(_mm512_srlv_epi16(v, counts), _mm512_set1_epi8((char)mask));
}
static inline vb vb_or(vb a, vb b) { return _mm512_or_si512(a, b); }
static inline vb vb_sll4(vb a) { return _mm512_slli_epi16(a, 4); } /* bytes < 16 only */
/* 32 int16 scales: element e = s[idx(e)] with s 16 int16 in a 256-bit vector */
static inline vi vi_pick(__m256i s16, const int16_t idx[32]) {
    return _mm512_permutexvar_epi16(_mm512_loadu_si512(idx), _mm512_castsi256_si512(s16));
}
/* acc + per lane l: sum over e in {2l, 2l+1} of scale[e] * (q[2e] x[2e] + q[2e+1] x[2e+1]), q unsigned bytes */
static inline vi vi_dotb(vi acc, vb q, const int8_t *x, vi scale) {
    return _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(q, _mm512_loadu_si512(x)), scale);
}
#else
#if defined(__AVXVNNI__)
#define KQ_ISA "avxvnni"
#define DOT256(acc, w, x) _mm256_dpwssd_avx_epi32(acc, w, x)
#else
#define KQ_ISA "avx2"
#define DOT256(acc, w, x) _mm256_add_epi32(acc, _mm256_madd_epi16(w, x))
#endif
typedef struct { __m256i lo, hi; } vi;
typedef struct { __m256 lo, hi; } vf;
static inline vi vi_zero(void) { return (vi){_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline vi vi_u8(const uint8_t *p) {
    return (vi){_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)),
                _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)))};
}
static inline vi vi_s8(__m256i v) {
    return (vi){_mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1))};
}
static inline vi vi_and(vi a, int m) {
    const __m256i k = _mm256_set1_epi16((short)m);
    return (vi){_mm256_and_si256(a.lo, k), _mm256_and_si256(a.hi, k)};
}
static inline vi vi_or(vi a, vi b) { return (vi){_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
static inline vi vi_srl(vi a, int n) {
    const __m128i c = _mm_cvtsi32_si128(n);
    return (vi){_mm256_srl_epi16(a.lo, c), _mm256_srl_epi16(a.hi, c)};
}
static inline vi vi_sll(vi a, int n) {
    const __m128i c = _mm_cvtsi32_si128(n);
    return (vi){_mm256_sll_epi16(a.lo, c), _mm256_sll_epi16(a.hi, c)};
}
static inline vi vi_subc(vi a, int c) {
    const __m256i k = _mm256_set1_epi16((short)c);
    return (vi){_mm256_sub_epi16(a.lo, k), _mm256_sub_epi16(a.hi, k)};
}
static inline vi vi_scale(vi a, int s0, int s1) {
    return (vi){_mm256_mullo_epi16(a.lo, _mm256_set1_epi16((short)s0)), _mm256_mullo_epi16(a.hi, _mm256_set1_epi16((short)s1))};
}
static inline void vi_store(int16_t *p, vi a) {
    _mm256_storeu_si256((__m256i *)p, a.lo);
    _mm256_storeu_si256((__m256i *)(p + 16), a.hi);
}
static inline vi vi_dot(vi acc, vi w, const int16_t *x) {
    return (vi){DOT256(acc.lo, w.lo, _mm256_loadu_si256((const __m256i *)x)),
                DOT256(acc.hi, w.hi, _mm256_loadu_si256((const __m256i *)(x + 16)))};
}
static inline vi vi_add32(vi a, vi b) { return (vi){_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
static inline vf vf_zero(void) { return (vf){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline vf vf_add(vf a, vf b) { return (vf){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline vf vf_fma_i(vf acc, vi i, float s) {
    const __m256 k = _mm256_set1_ps(s);
    return (vf){_mm256_fmadd_ps(_mm256_cvtepi32_ps(i.lo), k, acc.lo), _mm256_fmadd_ps(_mm256_cvtepi32_ps(i.hi), k, acc.hi)};
}
static inline vf vf_fma(vf acc, const float *w, const float *x) {
    return (vf){_mm256_fmadd_ps(_mm256_loadu_ps(w), _mm256_loadu_ps(x), acc.lo),
                _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), _mm256_loadu_ps(x + 8), acc.hi)};
}
static inline float vf_hsum(vf a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
typedef struct { __m256i lo, hi; } vb;
static inline vb vb_nibbles(const uint8_t *p, int high) {
    const __m256i m = _mm256_set1_epi8(0x0F), a = _mm256_loadu_si256((const __m256i *)p),
                  b = _mm256_loadu_si256((const __m256i *)(p + 32));
    return high ? (vb){_mm256_and_si256(_mm256_srli_epi16(a, 4), m), _mm256_and_si256(_mm256_srli_epi16(b, 4), m)}
                : (vb){_mm256_and_si256(a, m), _mm256_and_si256(b, m)};
}
static inline vb vb_halves(const uint8_t *p, int s0, int s1, int mask) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p), m = _mm256_set1_epi8((char)mask);
    return (vb){_mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(s0)), m),
                _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(s1)), m)};
}
static inline vb vb_or(vb a, vb b) { return (vb){_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
static inline vb vb_sll4(vb a) { return (vb){_mm256_slli_epi16(a.lo, 4), _mm256_slli_epi16(a.hi, 4)}; }
static inline vi vi_pick(__m256i s16, const int16_t idx[32]) { /* idx runs in aligned groups of 8 */
    int16_t s[16];
    _mm256_storeu_si256((__m256i *)s, s16);
    return (vi){_mm256_set_m128i(_mm_set1_epi16(s[idx[8]]), _mm_set1_epi16(s[idx[0]])),
                _mm256_set_m128i(_mm_set1_epi16(s[idx[24]]), _mm_set1_epi16(s[idx[16]]))};
}
static inline vi vi_dotb(vi acc, vb q, const int8_t *x, vi scale) {
    const __m256i p0 = _mm256_maddubs_epi16(q.lo, _mm256_loadu_si256((const __m256i *)x));
    const __m256i p1 = _mm256_maddubs_epi16(q.hi, _mm256_loadu_si256((const __m256i *)(x + 32)));
    return (vi){DOT256(acc.lo, p0, scale.lo), DOT256(acc.hi, p1, scale.hi)};
}
#endif

const char *kq_isa(void) { return KQ_ISA; }

/* ---- unpacking: a block's values as int16, offsets applied, sub-block scales not ---------------------------- */

/* ggml's get_scale_min_k4: the 12 scale bytes -> sc[8], m[8] in 0..63. */
static inline void q4k_scales(const uint8_t *s, int sc[8], int m[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63, m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

static inline vi q4k_chunk(const uint8_t *qs, int c) { /* sub-block c's q in 0..15 */
    const vi v = vi_u8(qs + 32 * (c / 2));
    return c & 1 ? vi_srl(v, 4) : vi_and(v, 15);
}

static inline vi q6k_chunk(const uint8_t *ql, const uint8_t *qh, int c) { /* values 32c..32c+31, q - 32 */
    const int h = c / 4, s = c % 4;
    const vi low = vi_and(vi_srl(vi_u8(ql + 64 * h + 32 * (s & 1)), 4 * (s / 2)), 15);
    const vi high = vi_sll(vi_and(vi_srl(vi_u8(qh + 32 * h), 2 * s), 3), 4);
    return vi_subc(vi_or(low, high), 32);
}

static inline __m256i bits_to_bytes(uint32_t bits) { /* byte i = 0xFF where bit i is set */
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i select = _mm256_set1_epi64x(0x8040201008040201LL);
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, select), select);
}

static inline vi b32_chunk(const uint8_t *blk, int kind) { /* a Q5_0 (q - 16) or Q8_0 (q) block's 32 values */
    if (kind == KIND_GGUF_Q8_0) return vi_s8(_mm256_loadu_si256((const __m256i *)(blk + 2)));
    uint32_t qh;
    memcpy(&qh, blk + 2, 4);
    const __m128i qs = _mm_loadu_si128((const __m128i *)(blk + 6)), low = _mm_set1_epi8(0x0F);
    const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), low), _mm_and_si128(qs, low));
    const __m256i fifth = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
    return vi_s8(_mm256_sub_epi8(_mm256_or_si256(nib, fifth), _mm256_set1_epi8(16)));
}

static inline void prefetch_block(const uint8_t *blk, int bytes) {
    for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(blk + PREFETCH_BYTES + o), _MM_HINT_T0);
}

/* ---- the weights as floats, exactly gguf's ---------------------------------------------------------------- */

/* 32 values q (int16) -> out[i] = fl(a * q[i] - b) with (a, b) = (a0, b0) for i < 16, (a1, b1) after. */
static inline void rebuild32(vi q, float a0, float b0, float a1, float b1, float *out) {
    int16_t v[32];
    vi_store(v, q);
    for (int g = 0; g < 4; g++) {
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(v + 8 * g))));
        const __m256 a = _mm256_set1_ps(g < 2 ? a0 : a1), b = _mm256_set1_ps(g < 2 ? b0 : b1);
        _mm256_storeu_ps(out + 8 * g, _mm256_fmsub_ps(a, f, b));
    }
}

/* One block (kq_family(kind) values) -> out, as gguf.quants.dequantize gives it. */
static inline void rebuild_block(const uint8_t *blk, int kind, float *out) {
    if (kind == KIND_GGUF_Q4_K) {
        int sc[8], m[8];
        q4k_scales(blk + 4, sc, m);
        const float d = f16(blk), dmin = f16(blk + 2);
        for (int c = 0; c < 8; c++) {
            const float a = d * (float)sc[c], b = dmin * (float)m[c];
            rebuild32(q4k_chunk(blk + 16, c), a, b, a, b, out + 32 * c);
        }
    } else if (kind == KIND_GGUF_Q6_K) {
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = f16(blk + 208);
        for (int c = 0; c < 8; c++)
            rebuild32(q6k_chunk(blk, blk + 128, c), d * (float)sc[2 * c], 0.0f, d * (float)sc[2 * c + 1], 0.0f,
                      out + 32 * c);
    } else {
        const float d = f16(blk);
        rebuild32(b32_chunk(blk, kind), d, 0.0f, d, 0.0f, out);
    }
}

/* Rows ids[0..n) of w (rows of K values) -> out (n, K) float32: an embedding lookup, or a whole dequantisation. */
void kq_rows(const uint8_t *w, int K, int kind, const int64_t *ids, int n, float *out, int threads) {
    const int F = kq_family(kind), bytes = kind_bytes(kind);
    const size_t row_bytes = (size_t)(K / F) * bytes;
#pragma omp parallel for schedule(static) num_threads(threads) if (n > 16)
    for (int i = 0; i < n; i++)
        for (int b = 0; b < K / F; b++)
            rebuild_block(w + (size_t)ids[i] * row_bytes + (size_t)b * bytes, kind, out + (size_t)i * K + (size_t)b * F);
}

/* ---- fp32 activations --------------------------------------------------------------------------------------- */

/* One weight row against R <= TILE rows of x (rows K apart): y[r * ldy]. */
static void row_f32(const float *x, int R, int K, const uint8_t *wrow, int kind, float *y, int ldy) {
    const int F = kq_family(kind), bytes = kind_bytes(kind);
    float wf[256] __attribute__((aligned(64)));
    vf a0[TILE], a1[TILE]; /* lanes v % 32 < 16, and >= 16 */
    for (int r = 0; r < R; r++) a0[r] = a1[r] = vf_zero();
    for (int b = 0; b < K / F; b++) {
        const uint8_t *blk = wrow + (size_t)b * bytes;
        prefetch_block(blk, bytes);
        rebuild_block(blk, kind, wf);
        for (int r = 0; r < R; r++) {
            const float *xb = x + (size_t)r * K + (size_t)b * F;
            for (int c = 0; c < F; c += 32) {
                a0[r] = vf_fma(a0[r], wf + c, xb + c);
                a1[r] = vf_fma(a1[r], wf + c + 16, xb + c + 16);
            }
        }
    }
    for (int r = 0; r < R; r++) y[(size_t)r * ldy] = vf_hsum(vf_add(a0[r], a1[r]));
}

void kq_linear_f32(const float *x, int T, int K, const uint8_t *w, int N, int kind, float *y, int ldy) {
    const size_t row_bytes = (size_t)(K / kq_family(kind)) * kind_bytes(kind);
    int chunk = X_CHUNK_BYTES / (int)(sizeof(float) * K) / TILE * TILE;
    if (chunk < TILE) chunk = TILE;
    for (int t0 = 0; t0 < T; t0 += chunk) {
        const int end = T - t0 < chunk ? T : t0 + chunk;
#pragma omp for schedule(static) nowait
        for (int n = 0; n < N; n++)
            for (int t = t0; t < end; t += TILE)
                row_f32(x + (size_t)t * K, end - t < TILE ? end - t : TILE, K, w + (size_t)n * row_bytes, kind,
                        y + (size_t)t * ldy + n, ldy);
    }
}

/* ---- int8 activations --------------------------------------------------------------------------------------- */

int kx_alloc(kx_t *x, int T, int K) {
    x->q = malloc(sizeof(int16_t) * (size_t)T * K);
    x->q8 = malloc((size_t)T * K);
    x->d = malloc(sizeof(float) * (size_t)T * (K / 32));
    x->s = malloc(sizeof(float) * (size_t)T * (K / 32));
    x->s16 = malloc(sizeof(float) * (size_t)T * (K / 16));
    return x->q && x->q8 && x->d && x->s && x->s16;
}

void kx_free(kx_t *x) { free(x->q), free(x->q8), free(x->d), free(x->s), free(x->s16); }

static inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

/* 16 values x * inv rounded half-even, as int16 in order; stored as int16 (q) or int8 (q8); returns their sum. */
static inline int round16(const float *x, __m256 inv, int16_t *q, int8_t *q8) {
    const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256i n0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), inv), mode));
    const __m256i n1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8), inv), mode));
    const __m256i v = _mm256_permute4x64_epi64(_mm256_packs_epi32(n0, n1), 0xD8); /* packs interleaves lanes */
    if (q) _mm256_storeu_si256((__m256i *)q, v);
    else _mm_storeu_si128((__m128i *)q8, _mm_packs_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
    return hsum_i32(_mm256_madd_epi16(v, _mm256_set1_epi16(1)));
}

/* One row x (K,) -> for F = 32: q (K,) and d (K / 32,); for F = 256: q8 (K,), d (K / 256,), s (K / 32,) and
   s16 (K / 16,). The same code on every ISA build. */
static void quantise_row(const float *x, int K, int F, int16_t *q, int8_t *q8, float *d, float *s, float *s16) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int b = 0; b < K / F; b++) {
        const float *xb = x + (size_t)b * F;
        __m256 top = _mm256_setzero_ps();
        for (int i = 0; i < F; i += 8) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(xb + i), abs_mask));
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        const float big = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        const float xd = big / 127.0f;
        const __m256 inv = _mm256_set1_ps(big > 0.0f ? 127.0f / big : 0.0f);
        if (F == 32) {
            round16(xb, inv, q + (size_t)b * F, NULL), round16(xb + 16, inv, q + (size_t)b * F + 16, NULL);
        } else {
            for (int j = 0; j < 8; j++) {
                const int s0 = round16(xb + 32 * j, inv, NULL, q8 + (size_t)b * F + 32 * j);
                const int s1 = round16(xb + 32 * j + 16, inv, NULL, q8 + (size_t)b * F + 32 * j + 16);
                s[b * 8 + j] = xd * (float)(s0 + s1);
                s16[b * 16 + 2 * j] = xd * (float)s0, s16[b * 16 + 2 * j + 1] = xd * (float)s1;
            }
        }
        d[b] = xd;
    }
}

void kq_quantise(const float *x, int T, int K, int family, kx_t *xq) {
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++)
        quantise_row(x + (size_t)t * K, K, family, xq->q + (size_t)t * K, xq->q8 + (size_t)t * K,
                     xq->d + (size_t)t * (K / family), xq->s + (size_t)t * (K / 32), xq->s16 + (size_t)t * (K / 16));
}

/* Scale pickers: element e of a chunk's 32 int16 scales (values 64c + 2e, +1) is sub-block scale idx[c][e]. */
#define RUN8(v) v, v, v, v, v, v, v, v
#define RUN16(v) RUN8(v), RUN8(v)
static const int16_t Q4K_PICK[4][32] = {{RUN16(0), RUN16(1)}, {RUN16(2), RUN16(3)}, {RUN16(4), RUN16(5)},
                                        {RUN16(6), RUN16(7)}};
static const int16_t Q6K_PICK[4][32] = {{RUN8(0), RUN8(1), RUN8(2), RUN8(3)}, {RUN8(4), RUN8(5), RUN8(6), RUN8(7)},
                                        {RUN8(8), RUN8(9), RUN8(10), RUN8(11)},
                                        {RUN8(12), RUN8(13), RUN8(14), RUN8(15)}};

/* ggml's get_scale_min_k4 on four words at once: the 12 scale bytes -> sc[0..8) in out[0..8), m in out[8..16). */
static inline void q4k_scale_bytes(const uint8_t *s, uint8_t out[16]) {
    uint32_t u[4];
    memcpy(u, s, 12);
    const uint32_t m6 = 0x3f3f3f3f, m4 = 0x0f0f0f0f, m2 = 0x03030303;
    u[3] = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4); /* m[4..8) */
    const uint32_t mins = u[1] & m6;                          /* m[0..4) */
    u[1] = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);           /* sc[4..8) */
    u[2] = mins;
    u[0] &= m6;                                               /* sc[0..4) */
    memcpy(out, u, 16);
}

/* One row's integer sum over a super-block: 4 chunks of 64 unsigned weights q with int16 scales sc. */
static inline vi dot256(const vb q[4], const vi sc[4], const int8_t *x) {
    vi i0 = vi_dotb(vi_zero(), q[0], x, sc[0]), i1 = vi_dotb(vi_zero(), q[1], x + 64, sc[1]);
    i0 = vi_dotb(i0, q[2], x + 128, sc[2]), i1 = vi_dotb(i1, q[3], x + 192, sc[3]);
    return vi_add32(i0, i1);
}

/* One Q4_K weight row against R <= TILE rows of x (q8 rows K apart, d rows K / 256, s rows K / 32). */
static void row_q4k_int8(const kx_t *x, int R, int K, const uint8_t *wrow, float *y, int ldy) {
    const int nb = K / 256;
    vf acc[TILE];
    __m256 macc[TILE]; /* the mins' 8 lanes */
    for (int r = 0; r < R; r++) acc[r] = vf_zero(), macc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = wrow + (size_t)b * 144;
        prefetch_block(blk, 144);
        uint8_t sm[16];
        q4k_scale_bytes(blk + 4, sm);
        const __m256i s16 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)sm));
        vb q[4];
        vi sc[4];
        for (int c = 0; c < 4; c++) q[c] = vb_halves(blk + 16 + 32 * c, 0, 4, 0x0F), sc[c] = vi_pick(s16, Q4K_PICK[c]);
        const float d = f16(blk);
        const __m256 mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sm + 8)))),
                                          _mm256_set1_ps(f16(blk + 2))); /* dmin m_j, exact */
        for (int r = 0; r < R; r++) {
            const size_t rb = (size_t)r * nb + b;
            acc[r] = vf_fma_i(acc[r], dot256(q, sc, x->q8 + (size_t)r * K + (size_t)b * 256), d * x->d[rb]);
            macc[r] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(x->s + rb * 8), macc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[(size_t)r * ldy] = vf_hsum(acc[r]) - hsum8(macc[r]);
}

/* One Q6_K weight row against R <= TILE rows of x (q8 rows K apart, d rows K / 256, s16 rows K / 16). The
   weights go in unsigned (q in 0..63); the offset 32 d sc_g times each 16 values' sum goes in 16 more lanes. */
static void row_q6k_int8(const kx_t *x, int R, int K, const uint8_t *wrow, float *y, int ldy) {
    const int nb = K / 256;
    vf acc[TILE], oacc[TILE];
    for (int r = 0; r < R; r++) acc[r] = oacc[r] = vf_zero();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = wrow + (size_t)b * 210, *ql = blk, *qh = blk + 128;
        prefetch_block(blk, 210);
        const __m128i s8 = _mm_loadu_si128((const __m128i *)(blk + 192));
        const __m256i s16 = _mm256_cvtepi8_epi16(s8);
        vb q[4];
        vi sc[4];
        for (int c = 0; c < 4; c++) {
            const int h = c / 2, u = c % 2; /* values 128 h + 64 u + (0..63) */
            q[c] = vb_or(vb_nibbles(ql + 64 * h, u), vb_sll4(vb_halves(qh + 32 * h, 4 * u, 4 * u + 2, 0x03)));
            sc[c] = vi_pick(s16, Q6K_PICK[c]);
        }
        const float d = f16(blk + 208);
        float off[16]; /* 32 d sc_g, exact */
        const __m256 d32 = _mm256_set1_ps(32.0f * d);
        _mm256_storeu_ps(off, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8)), d32));
        _mm256_storeu_ps(off + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s8, 8))), d32));
        for (int r = 0; r < R; r++) {
            const size_t rb = (size_t)r * nb + b;
            acc[r] = vf_fma_i(acc[r], dot256(q, sc, x->q8 + (size_t)r * K + (size_t)b * 256), d * x->d[rb]);
            oacc[r] = vf_fma(oacc[r], off, x->s16 + rb * 16);
        }
    }
    for (int r = 0; r < R; r++) y[(size_t)r * ldy] = vf_hsum(acc[r]) - vf_hsum(oacc[r]);
}

/* One Q5_0 / Q8_0 weight row against R <= TILE rows of x (x->q rows K apart, d rows K / 32). */
static void row_b32_int8(const kx_t *x, int R, int K, const uint8_t *wrow, int kind, float *y, int ldy) {
    const int nb = K / 32, bytes = kind_bytes(kind);
    vf acc[TILE];
    for (int r = 0; r < R; r++) acc[r] = vf_zero();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = wrow + (size_t)b * bytes;
        if (b % 2 == 0) prefetch_block(blk, 2 * bytes);
        const vi w = b32_chunk(blk, kind);
        const float d = f16(blk);
        for (int r = 0; r < R; r++)
            acc[r] = vf_fma_i(acc[r], vi_dot(vi_zero(), w, x->q + (size_t)r * K + (size_t)b * 32), d * x->d[(size_t)r * nb + b]);
    }
    for (int r = 0; r < R; r++) y[(size_t)r * ldy] = vf_hsum(acc[r]);
}

void kq_linear_int8(const kx_t *xq, int T, int K, const uint8_t *w, int N, int kind, float *y, int ldy) {
    const int F = kq_family(kind);
    const size_t row_bytes = (size_t)(K / F) * kind_bytes(kind);
    int chunk = X_CHUNK_BYTES / (int)(sizeof(int16_t) * K) / TILE * TILE;
    if (chunk < TILE) chunk = TILE;
    for (int t0 = 0; t0 < T; t0 += chunk) {
        const int end = T - t0 < chunk ? T : t0 + chunk;
#pragma omp for schedule(static) nowait
        for (int n = 0; n < N; n++)
            for (int t = t0; t < end; t += TILE) {
                const kx_t xt = {xq->q + (size_t)t * K, xq->q8 + (size_t)t * K, xq->d + (size_t)t * (K / F),
                                 xq->s + (size_t)t * (K / 32), xq->s16 + (size_t)t * (K / 16)};
                const int R = end - t < TILE ? end - t : TILE;
                const uint8_t *wrow = w + (size_t)n * row_bytes;
                float *yt = y + (size_t)t * ldy + n;
                if (kind == KIND_GGUF_Q4_K) row_q4k_int8(&xt, R, K, wrow, yt, ldy);
                else if (kind == KIND_GGUF_Q6_K) row_q6k_int8(&xt, R, K, wrow, yt, ldy);
                else row_b32_int8(&xt, R, K, wrow, kind, yt, ldy);
            }
    }
}

/* x (T, K) float32, w (N, row bytes), y (T, ldy) float32 (columns 0..N). int8: x rounded to int8 blocks.
   Returns 0, or -1 when scratch memory cannot be had. */
int kq_linear(const float *x, int T, int K, const uint8_t *w, int N, int kind, int int8, float *y, int ldy,
              int threads) {
    kx_t xq = {NULL, NULL, NULL, NULL, NULL};
    if (int8 && !kx_alloc(&xq, T, K)) {
        kx_free(&xq);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
        if (int8) {
            kq_quantise(x, T, K, kq_family(kind), &xq);
            kq_linear_int8(&xq, T, K, w, N, kind, y, ldy);
        } else {
            kq_linear_f32(x, T, K, w, N, kind, y, ldy);
        }
    }
    kx_free(&xq);
    return 0;
}
