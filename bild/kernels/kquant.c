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
   like ggml's Q8_K) or 32 (Q5_0, Q8_0) to xd * qx, qx = round-half-even(x * 127 / max |x|) in -127..127, kept
   as int8 and as qx + 128 unsigned (and for Q4_K the sums of each 32 qx, times xd). Products are vpdpbusd
   (unsigned bytes times signed bytes, four into each int32 lane; AVX2: maddubs + pmaddwd, never saturating
   here): exact integers. A weight block is unpacked once per register tile of up to RT rows of x, in the int8
   value order (below) that keeps each int32 lane of a row's four dpbusd within one sub-block of 16 values. The
   K-quants take the rows in pairs, two rows' lanes in one vector (below):
   Q4_K  unsigned q against qx; packs puts two rows' 16 lanes in int16 and pmaddwd multiplies them by sc_j and
         adds the two lanes of each sub-block j: 8 lanes a row; fma'd with d * xd into float lane j, then
         fnmadd'ed with (dmin m_j) (xd sum_j qx).
   Q6_K  q - 32 signed against qx + 128, the lane starting at -128 times its weights' sum (once per block, for
         all rows); times sc_l (pmulld), the lanes of sub-blocks 2 j, 2 j + 1 added: 8 lanes a row; fma'd with
         d * xd into float lane j.
   Q5_0, Q8_0  q - 16 or q signed against qx + 128 the same way, two blocks a vector, 16 lanes a row; fma'd with
         d * xd of the lane's block (AVX2 without VNNI: Q8_0 as |q| against qx with q's signs).
   Every lane's integer stays below 2^24 and converts exactly. The output is the fixed-tree sum of its 8 or 16
   float lanes.

   So each output runs one instruction sequence whatever the number of rows (batch-invariant), and the integer
   sums and float operations are the same on every ISA build: AVX-512 (one 512-bit register per 16 lanes),
   AVX-VNNI and AVX2 (two 256-bit halves): results are bitwise the same on all three. The ISA is chosen by the compiler flags
   of each build (bild/kernels/__init__.py builds one library per ISA and loads the one the CPU runs). */

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "kquant.h"

#define TILE 16 /* fp32: rows of x per pass over a weight row: each block is rebuilt once per 16 rows */
#if defined(__AVX512F__) /* int8: rows of x per register tile (their accumulators stay in registers) */
#define RT 16
#else
#define RT 8
#endif
#define NG 8 /* int8: weight rows per group: a group's rows stay in L1 for every register tile of x */
#define PREFETCH_BYTES 4096 /* how far ahead along the weight stream the products prefetch */
#define X_CHUNK_BYTES (256 * 1024) /* rows of x per pass over the whole weight stay in L2 */
#define X_L1_BYTES (24 * 1024) /* K-quants: a tile's x values per pass over a group's blocks stay in L1 */

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
   vi: 32 int16 (a block's values, for the fp32 path's rebuild); vf: 16 floats. */

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
static inline void vi_store(int16_t *p, vi a) { _mm512_storeu_si512(p, a); }
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_fma(vf acc, const float *w, const float *x) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(w), _mm512_loadu_ps(x), acc);
}
static inline float vf_hsum(vf a) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    return hsum8(_mm256_add_ps(_mm512_castps512_ps256(a), hi));
}
#else
#if defined(__AVXVNNI__)
#define KQ_ISA "avxvnni"
#else
#define KQ_ISA "avx2"
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
static inline void vi_store(int16_t *p, vi a) {
    _mm256_storeu_si256((__m256i *)p, a.lo);
    _mm256_storeu_si256((__m256i *)(p + 16), a.hi);
}
static inline vf vf_zero(void) { return (vf){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline vf vf_add(vf a, vf b) { return (vf){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline vf vf_fma(vf acc, const float *w, const float *x) {
    return (vf){_mm256_fmadd_ps(_mm256_loadu_ps(w), _mm256_loadu_ps(x), acc.lo),
                _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), _mm256_loadu_ps(x + 8), acc.hi)};
}
static inline float vf_hsum(vf a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
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

/* always_inline: a prefetch has no visible effect, so gcc deletes calls to a non-inlined one as dead code */
static inline __attribute__((always_inline)) void prefetch_block(const uint8_t *blk, int bytes) {
    for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(blk + PREFETCH_BYTES + o), _MM_HINT_T0);
}
/* The int8 tiles' prefetch: pf bytes ahead; PREFETCH_BYTES into L1 when the rows stream in order, or (K passes,
   which jump between a group's rows) the same block of the next group's rows, NG rows on, into L2. */
static inline __attribute__((always_inline)) void prefetch_tile(const uint8_t *blk, int bytes, size_t pf) {
    if (pf == PREFETCH_BYTES) prefetch_block(blk, bytes);
    else
        for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(blk + pf + o), _MM_HINT_T1);
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

/* 16 int32 lanes of integer dot products (ii), 64 unsigned weight bytes (ub: lane l's bytes 4l..4l+3), on every
   ISA: one 512-bit register, or two 256-bit halves (lanes 0..7, 8..15). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
typedef __m512i ii;
typedef __m512i ub;
static inline ii ii_zero(void) { return _mm512_setzero_si512(); }
static inline ii ii_dpbusd(ii acc, ub u, const int8_t *x) { return _mm512_dpbusd_epi32(acc, u, _mm512_loadu_si512(x)); }
/* acc + per lane: unsigned bytes of x (x + 128) times the signed weight bytes w */
static inline ii ii_dotu(ii acc, const uint8_t *xu, ub w) { return _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(xu), w); }
static inline ii ii_dotu_lo(ii acc, const uint8_t *xu, ub w) { /* x's bytes 0..31 only */
    return _mm512_dpbusd_epi32(acc, _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)xu)), w);
}
static inline ii ii_corr(ii acc, ub w) { /* acc - 128 times each lane's sum of w: what x + 128 adds */
    return _mm512_sub_epi32(acc, _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), w));
}
static inline ub ub_subc(ub a, int c) { return _mm512_sub_epi8(a, _mm512_set1_epi8((char)c)); }
static inline ii ii_madd(ii a, ii b) { return _mm512_madd_epi16(a, b); }
static inline ii ii_mullo(ii a, ii b) { return _mm512_mullo_epi32(a, b); }
static inline ii ii_bytes_u(__m128i b) { return _mm512_cvtepu8_epi32(b); }
static inline ii ii_bytes_s(const uint8_t b[16]) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b)); }
static inline vf vf_set1(float s) { return _mm512_set1_ps(s); }
static inline vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vf_bcast4(const float *p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); } /* 4 floats, x4 */
static inline vf vf_fnma(vf acc, vf a, const float *b) { return _mm512_fnmadd_ps(a, _mm512_loadu_ps(b), acc); }
static inline vf vf_u8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
static inline ii ii_u8_i16(__m256i b) { return _mm512_cvtepu8_epi16(b); }
static inline ii ii_packs(ii a, ii b) { return _mm512_packs_epi32(a, b); } /* a's lanes 4i..4i+3, then b's */
static inline ii ii_pairsum(ii a, ii b) { /* a0 + a1, a2 + a3, b0 + b1, b2 + b3 in each 128-bit lane */
    const __m512 fa = _mm512_castsi512_ps(a), fb = _mm512_castsi512_ps(b);
    return _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(fa, fb, 0x88)),
                            _mm512_castps_si512(_mm512_shuffle_ps(fa, fb, 0xDD)));
}
static inline void vf_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_fma_ii(vf acc, ii i, vf s) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), s, acc); }
static inline vf vf_pair(float a, float b) { /* lanes 0..7 a, 8..15 b */
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(a)), _mm256_castps_pd(_mm256_set1_ps(b)), 1));
}
static inline __m512i ld(const uint8_t *p) { return _mm512_loadu_si512(p); }
/* Q4_K nibbles in lane order (kquant's int8 value order, below): lane l of vector v holds 4 values of sub-block
   l / 2; dword IDX[v][l] of the 128 nibble bytes, shifted right by SH[l] (0 or 4), masked to 4 bits. */
static const int32_t Q4K_IDX[4][16] __attribute__((aligned(64))) = {
    {0, 4, 0, 4, 8, 12, 8, 12, 16, 20, 16, 20, 24, 28, 24, 28}, {1, 5, 1, 5, 9, 13, 9, 13, 17, 21, 17, 21, 25, 29, 25, 29},
    {2, 6, 2, 6, 10, 14, 10, 14, 18, 22, 18, 22, 26, 30, 26, 30}, {3, 7, 3, 7, 11, 15, 11, 15, 19, 23, 19, 23, 27, 31, 27, 31}};
static const int32_t Q4K_SH[16] __attribute__((aligned(64))) = {0, 0, 4, 4, 0, 0, 4, 4, 0, 0, 4, 4, 0, 0, 4, 4};
static inline void q4k_unpack(const uint8_t *qs, ub q[4]) {
    const __m512i z0 = ld(qs), z1 = ld(qs + 64), sh = _mm512_load_si512(Q4K_SH), m = _mm512_set1_epi8(0x0F);
    for (int v = 0; v < 4; v++)
        q[v] = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutex2var_epi32(z0, _mm512_load_si512(Q4K_IDX[v]), z1), sh), m);
}
/* Q6_K: lane l of vector v holds 4 values of sub-block l: low 4 bits from ql dword LIDX[v][l] >> LSH[l], high 2
   from qh dword HIDX[v][l] >> HSH[l]. */
static const int32_t Q6K_LIDX[4][16] __attribute__((aligned(64))) = {
    {0, 4, 8, 12, 0, 4, 8, 12, 16, 20, 24, 28, 16, 20, 24, 28}, {1, 5, 9, 13, 1, 5, 9, 13, 17, 21, 25, 29, 17, 21, 25, 29},
    {2, 6, 10, 14, 2, 6, 10, 14, 18, 22, 26, 30, 18, 22, 26, 30}, {3, 7, 11, 15, 3, 7, 11, 15, 19, 23, 27, 31, 19, 23, 27, 31}};
static const int32_t Q6K_LSH[16] __attribute__((aligned(64))) = {0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0, 4, 4, 4, 4};
static const int32_t Q6K_HIDX[4][16] __attribute__((aligned(64))) = {
    {0, 4, 0, 4, 0, 4, 0, 4, 8, 12, 8, 12, 8, 12, 8, 12}, {1, 5, 1, 5, 1, 5, 1, 5, 9, 13, 9, 13, 9, 13, 9, 13},
    {2, 6, 2, 6, 2, 6, 2, 6, 10, 14, 10, 14, 10, 14, 10, 14}, {3, 7, 3, 7, 3, 7, 3, 7, 11, 15, 11, 15, 11, 15, 11, 15}};
static const int32_t Q6K_HSH[16] __attribute__((aligned(64))) = {0, 0, 2, 2, 4, 4, 6, 6, 0, 0, 2, 2, 4, 4, 6, 6};
static inline void q6k_unpack(const uint8_t *ql, const uint8_t *qh, ub q[4]) {
    const __m512i l0 = ld(ql), l1 = ld(ql + 64), h = ld(qh), lsh = _mm512_load_si512(Q6K_LSH),
                  hsh = _mm512_load_si512(Q6K_HSH), m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(0x03);
    for (int v = 0; v < 4; v++) {
        const __m512i lo = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutex2var_epi32(l0, _mm512_load_si512(Q6K_LIDX[v]), l1), lsh), m4);
        const __m512i hi = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(_mm512_load_si512(Q6K_HIDX[v]), h), hsh), m2);
        q[v] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 4));
    }
}
/* Two 32-value blocks' bytes a (values 0..31), b (32..63) as one vector. */
static inline ub ub_pair(__m256i a, __m256i b) { return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1); }
#define HAVE_DPBUSD 1
#else
#if defined(__AVXVNNI__)
#define DPBUSD256(acc, u, x) _mm256_dpbusd_avx_epi32(acc, u, x)
#else /* u < 128: maddubs does not saturate */
#define DPBUSD256(acc, u, x) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)))
#endif
typedef struct { __m256i lo, hi; } ii;
typedef struct { __m256i lo, hi; } ub;
static inline ii ii_zero(void) { return (ii){_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline ii ii_dpbusd(ii acc, ub u, const int8_t *x) {
    return (ii){DPBUSD256(acc.lo, u.lo, _mm256_loadu_si256((const __m256i *)x)),
                DPBUSD256(acc.hi, u.hi, _mm256_loadu_si256((const __m256i *)(x + 32)))};
}
/* |w| <= 64 without VNNI: maddubs does not saturate */
static inline ii ii_dotu(ii acc, const uint8_t *xu, ub w) {
    return (ii){DPBUSD256(acc.lo, _mm256_loadu_si256((const __m256i *)xu), w.lo),
                DPBUSD256(acc.hi, _mm256_loadu_si256((const __m256i *)(xu + 32)), w.hi)};
}
static inline ii ii_dotu_lo(ii acc, const uint8_t *xu, ub w) {
    return (ii){DPBUSD256(acc.lo, _mm256_loadu_si256((const __m256i *)xu), w.lo), acc.hi};
}
static inline ii ii_corr(ii acc, ub w) {
    const __m256i k = _mm256_set1_epi8((char)0x80), z = _mm256_setzero_si256();
    return (ii){_mm256_sub_epi32(acc.lo, DPBUSD256(z, k, w.lo)), _mm256_sub_epi32(acc.hi, DPBUSD256(z, k, w.hi))};
}
static inline ub ub_subc(ub a, int c) {
    const __m256i k = _mm256_set1_epi8((char)c);
    return (ub){_mm256_sub_epi8(a.lo, k), _mm256_sub_epi8(a.hi, k)};
}
static inline ii ii_madd(ii a, ii b) { return (ii){_mm256_madd_epi16(a.lo, b.lo), _mm256_madd_epi16(a.hi, b.hi)}; }
static inline ii ii_mullo(ii a, ii b) { return (ii){_mm256_mullo_epi32(a.lo, b.lo), _mm256_mullo_epi32(a.hi, b.hi)}; }
static inline ii ii_bytes_u(__m128i b) { return (ii){_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))}; }
static inline ii ii_bytes_s(const uint8_t b[16]) {
    return (ii){_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b)), _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 8)))};
}
static inline vf vf_set1(float s) { return (vf){_mm256_set1_ps(s), _mm256_set1_ps(s)}; }
static inline vf vf_load(const float *p) { return (vf){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline vf vf_bcast4(const float *p) {
    const __m256 v = _mm256_broadcast_ps((const __m128 *)p);
    return (vf){v, v};
}
static inline vf vf_fnma(vf acc, vf a, const float *b) {
    return (vf){_mm256_fnmadd_ps(a.lo, _mm256_loadu_ps(b), acc.lo), _mm256_fnmadd_ps(a.hi, _mm256_loadu_ps(b + 8), acc.hi)};
}
static inline vf vf_u8(__m128i b) {
    return (vf){_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
}
static inline ii ii_u8_i16(__m256i b) {
    return (ii){_mm256_cvtepu8_epi16(_mm256_castsi256_si128(b)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256(b, 1))};
}
static inline ii ii_packs(ii a, ii b) { return (ii){_mm256_packs_epi32(a.lo, b.lo), _mm256_packs_epi32(a.hi, b.hi)}; }
static inline __m256i pairsum256(__m256i a, __m256i b) {
    const __m256 fa = _mm256_castsi256_ps(a), fb = _mm256_castsi256_ps(b);
    return _mm256_add_epi32(_mm256_castps_si256(_mm256_shuffle_ps(fa, fb, 0x88)),
                            _mm256_castps_si256(_mm256_shuffle_ps(fa, fb, 0xDD)));
}
static inline ii ii_pairsum(ii a, ii b) { return (ii){pairsum256(a.lo, b.lo), pairsum256(a.hi, b.hi)}; }
static inline void vf_store(float *p, vf a) { _mm256_storeu_ps(p, a.lo), _mm256_storeu_ps(p + 8, a.hi); }
static inline vf vf_mul(vf a, vf b) { return (vf){_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
static inline vf vf_fma_ii(vf acc, ii i, vf s) {
    return (vf){_mm256_fmadd_ps(_mm256_cvtepi32_ps(i.lo), s.lo, acc.lo), _mm256_fmadd_ps(_mm256_cvtepi32_ps(i.hi), s.hi, acc.hi)};
}
static inline vf vf_pair(float a, float b) { return (vf){_mm256_set1_ps(a), _mm256_set1_ps(b)}; }
static inline __m256i ld(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
/* The same lane order as the AVX-512 build's tables: within each 256-bit source, dwords v and 4 + v. */
static inline __m256i pick2(__m256i a, __m256i b, int v, int blend_mask) {
    const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4), _mm256_set1_epi32(v));
    const __m256i pa = _mm256_permutevar8x32_epi32(a, idx), pb = _mm256_permutevar8x32_epi32(b, idx);
    return blend_mask == 0xF0 ? _mm256_blend_epi32(pa, pb, 0xF0) : _mm256_blend_epi32(pa, pb, 0xCC);
}
static inline void q4k_unpack(const uint8_t *qs, ub q[4]) {
    const __m256i a0 = ld(qs), a1 = ld(qs + 32), a2 = ld(qs + 64), a3 = ld(qs + 96), m = _mm256_set1_epi8(0x0F);
    const __m256i sh = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
    for (int v = 0; v < 4; v++)
        q[v] = (ub){_mm256_and_si256(_mm256_srlv_epi32(pick2(a0, a1, v, 0xF0), sh), m),
                    _mm256_and_si256(_mm256_srlv_epi32(pick2(a2, a3, v, 0xF0), sh), m)};
}
static inline void q6k_unpack(const uint8_t *ql, const uint8_t *qh, ub q[4]) {
    const __m256i l0 = ld(ql), l1 = ld(ql + 32), l2 = ld(ql + 64), l3 = ld(ql + 96), h0 = ld(qh), h1 = ld(qh + 32);
    const __m256i lsh = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4), hsh = _mm256_setr_epi32(0, 0, 2, 2, 4, 4, 6, 6);
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
    for (int v = 0; v < 4; v++) {
        const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4), _mm256_set1_epi32(v));
        const __m256i lo0 = _mm256_and_si256(_mm256_srlv_epi32(pick2(l0, l1, v, 0xCC), lsh), m4);
        const __m256i lo1 = _mm256_and_si256(_mm256_srlv_epi32(pick2(l2, l3, v, 0xCC), lsh), m4);
        const __m256i hi0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_permutevar8x32_epi32(h0, idx), hsh), m2);
        const __m256i hi1 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_permutevar8x32_epi32(h1, idx), hsh), m2);
        q[v] = (ub){_mm256_or_si256(lo0, _mm256_slli_epi32(hi0, 4)), _mm256_or_si256(lo1, _mm256_slli_epi32(hi1, 4))};
    }
}
static inline ub ub_pair(__m256i a, __m256i b) { return (ub){a, b}; }
#if defined(__AVXVNNI__)
#define HAVE_DPBUSD 1
#else /* Q8_0's products straight: |w| against x with w's signs (|w| <= 128: maddubs does not saturate) */
#define HAVE_DPBUSD 0
static inline __m256i dots8_256(__m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}
static inline ii ii_dots8(ub w, const int8_t *x) {
    return (ii){dots8_256(w.lo, _mm256_loadu_si256((const __m256i *)x)), dots8_256(w.hi, _mm256_loadu_si256((const __m256i *)(x + 32)))};
}
static inline ii ii_dots8_lo(ub w, const int8_t *x) {
    return (ii){dots8_256(w.lo, _mm256_loadu_si256((const __m256i *)x)), _mm256_setzero_si256()};
}
#endif
#endif

/* int8 value order. x's int8 values of a K-quant super-block (256 values) are stored lane-major: byte 64 v + 4 l + i
   (vector v, lane l, i < 4) holds value 16 l + 4 v + i, so lane l of all four 64-byte vectors covers values
   16 l .. 16 l + 15 (Q6_K's sub-block l; lanes 2 j, 2 j + 1 are Q4_K's sub-block j), and a row's four dpbusd
   accumulate each lane within one sub-block. The weights are unpacked to the same order (q4k_unpack,
   q6k_unpack). Q5_0 / Q8_0 blocks keep their natural order, two blocks a vector.

   Row pairs. The K-quant tiles take the rows of x two at a time, rows 2 p (A) and 2 p + 1 (B), into one vector
   of 16 float lanes: lanes 4 i, 4 i + 1 are A's, 4 i + 2, 4 i + 3 B's (i < 4), so A's eight lanes hold, in the
   order 4 (j / 2) + (j % 2) of j < 8, its part j of a super-block (Q4_K's sub-block j, Q6_K's sub-blocks 2 j,
   2 j + 1). kx_t keeps for family 256, per pair and super-block, xd in that layout (d: A, A, B, B, one 128-bit
   lane) and Q4_K's mins sums (s: 16 lanes, A's and B's sub-block j at their lanes). An odd T has a zero row
   T, so its pair is whole. */

static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); } /* no split loads */

int kx_alloc(kx_t *x, int T, int K) {
    const size_t rows = (size_t)(T + RT - 1) / RT * RT; /* whole tiles */
    x->q8 = alloc64(rows * K), x->u8 = alloc64(rows * K);
    x->d = alloc64(sizeof(float) * rows * (K / 32)), x->s = alloc64(sizeof(float) * rows * (K / 32));
    return x->q8 && x->d && x->s && x->u8;
}

void kx_free(kx_t *x) { free(x->q8), free(x->d), free(x->s), free(x->u8); }

/* Row t of x's T (family 32), or its values in tile t / RT (family 256): row t % RT's first block, and its
   pair's, with the tile's row stride rt (RT, or the rows of a last short tile, rounded up to a pair). */
static inline kx_t kx_at(const kx_t *x, int t, int T, int K, int F) {
    if (F == 32) return (kx_t){x->q8 + (size_t)t * K, x->d + (size_t)t * (K / 32), x->s, x->u8 + (size_t)t * K, 0};
    const int first = t / RT * RT, left = T + (T & 1) - first, rt = left < RT ? left : RT;
    const size_t tile = (size_t)first * K, r = t % RT; /* a tile's values; its pairs' d, s: / 128, / 32 */
    return (kx_t){x->q8 + tile + 256 * r, x->d + tile / 128 + 4 * (r / 2), x->s + tile / 32 + 16 * (r / 2),
                  x->u8 + tile + 256 * r, rt};
}

static inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

/* 16 values x * inv rounded half-even, stored in order as int8 at q8; returns their sum. */
static inline int round16(const float *x, __m256 inv, int8_t *q8) {
    const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256i n0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), inv), mode));
    const __m256i n1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8), inv), mode));
    const __m256i v = _mm256_permute4x64_epi64(_mm256_packs_epi32(n0, n1), 0xD8); /* packs interleaves lanes */
    _mm_storeu_si128((__m128i *)q8, _mm_packs_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
    return hsum_i32(_mm256_madd_epi16(v, _mm256_set1_epi16(1)));
}

/* One row x (K,) -> kx_t's rows (see kquant.h); x NULL: the zero row. Family 256: block b of the row at q8, u8
   + b * rt * 256, its pair's d + b * rt * 2, s + b * rt * 8, h the row's half. The same code on every ISA. */
static void quantise_row(const float *x, int K, int F, int8_t *q8, float *d, float *s, uint8_t *u8, int h, int rt) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int b = 0; b < K / F; b++) {
        const float *xb = x + (size_t)b * F;
        __m256 top = _mm256_setzero_ps();
        for (int i = 0; x && i < F; i += 8) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(xb + i), abs_mask));
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        const float big = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        const float xd = big / 127.0f;
        const __m256 inv = _mm256_set1_ps(big > 0.0f ? 127.0f / big : 0.0f);
        if (F == 32) {
            int8_t *qb = q8 + (size_t)b * 32;
            if (x) round16(xb, inv, qb), round16(xb + 16, inv, qb + 16);
            else memset(qb, 0, 32);
            d[b] = xd;
            for (int i = 0; i < 32; i++) u8[(size_t)b * 32 + i] = (uint8_t)(qb[i] + 128); /* x + 128 */
            continue;
        }
        int8_t nat[256] = {0};
        for (int j = 0; j < 8; j++) {
            const int s0 = x ? round16(xb + 32 * j, inv, nat + 32 * j) : 0;
            const int s1 = x ? round16(xb + 32 * j + 16, inv, nat + 32 * j + 16) : 0;
            s[(size_t)b * rt * 8 + 4 * (j / 2) + 2 * h + j % 2] = xd * (float)(s0 + s1);
        }
        uint32_t in[64], out[64]; /* value 16 l + 4 v + i to byte 64 v + 4 l + i */
        memcpy(in, nat, 256);
        for (int v = 0; v < 4; v++)
            for (int l = 0; l < 16; l++) out[16 * v + l] = in[4 * l + v];
        int8_t *qb = q8 + (size_t)b * rt * 256;
        memcpy(qb, out, 256);
        for (int i = 0; i < 256; i++) u8[(size_t)b * rt * 256 + i] = (uint8_t)(qb[i] + 128); /* x + 128 */
        d[(size_t)b * rt * 2 + 2 * h] = d[(size_t)b * rt * 2 + 2 * h + 1] = xd;
    }
}

void kq_quantise(const float *x, int T, int K, int family, kx_t *xq) {
#pragma omp for schedule(static)
    for (int t = 0; t < T + (T & 1); t++) {
        const kx_t at = kx_at(xq, t, T, K, family);
        quantise_row(t < T ? x + (size_t)t * K : NULL, K, family, at.q8, at.d, at.s, at.u8, t & 1, at.rt);
    }
}

/* ggml's get_scale_min_k4 in one vector: the 12 scale bytes -> sc[0..8) in bytes 0..8, m[0..8) in bytes 8..16
   (the low 6 bits of s[0..8), or s[8..12)'s nibbles under the top 2 bits of s[0..8)). */
static inline __m128i q4k_scales_v(const uint8_t *s) {
    const __m128i v = _mm_loadu_si128((const __m128i *)s); /* the 12 scale bytes and 4 of the nibbles after */
    const __m128i low = _mm_and_si128(_mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, -1, -1, -1, -1)),
                                      _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0));
    const __m128i nib = _mm_and_si128(_mm_shuffle_epi8(_mm_srli_epi16(v, 4), _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 8, 9, 10, 11)),
                                      _mm_set1_epi8(15));
    const __m128i top = _mm_and_si128(_mm_shuffle_epi8(_mm_srli_epi16(v, 2), _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7)),
                                      _mm_set1_epi8(0x30));
    return _mm_or_si128(_mm_or_si128(low, nib), top);
}

/* A tile of x, family 32: row r's values at q8 + r K (kx_t's strides). Family 256: row r's super-block b at
   q8 + (b rt + r) 256, pair p's xd and mins sums at d + (b rt / 2 + p) 4, s + (b rt / 2 + p) 16. */
#define XQ(r, K) ((size_t)(r) * (size_t)(K))

static inline ii dot4(const ub q[4], const int8_t *x) { /* Q4_K: unsigned weights against signed x */
    return ii_dpbusd(ii_dpbusd(ii_dpbusd(ii_dpbusd(ii_zero(), q[0], x), q[1], x + 64), q[2], x + 128), q[3], x + 192);
}
static inline ii dotu4(ii acc, const uint8_t *xu, const ub w[4]) { /* Q6_K: x + 128 against signed weights */
    return ii_dotu(ii_dotu(ii_dotu(ii_dotu(acc, xu, w[0]), xu + 64, w[1]), xu + 128, w[2]), xu + 192, w[3]);
}

/* One Q4_K weight row against P pairs of rows of x (P a constant after inlining). Per row and super-block four
   dpbusd give lane l the exact sum over the 16 values of sub-block l / 2 (|sum| <= 16 * 15 * 127, an int16);
   packs puts a pair's two rows in int16 and pmaddwd multiplies each by its scale sc_j and adds the two lanes of
   sub-block j (an exact int32 below 2^22), into the pair layout. One fma adds it times d * xd to the float lane,
   one fnmadd subtracts dmin m_j times xd sum_j qx (both exact products of floats). */
static inline __attribute__((always_inline)) void q4k_tile(const kx_t *x, int P, int one, int K, const uint8_t *wrow,
                                                          int b0, int b1, size_t pf, float *state) {
    const __m256i sc_idx = _mm256_setr_epi8(0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3,
                                            4, 4, 5, 5, 4, 4, 5, 5, 6, 6, 7, 7, 6, 6, 7, 7);
    const __m128i m_idx = _mm_setr_epi8(8, 9, 8, 9, 10, 11, 10, 11, 12, 13, 12, 13, 14, 15, 14, 15);
    vf acc[RT / 2];
    _Pragma("GCC unroll 8")
    for (int p = 0; p < P; p++) acc[p] = b0 ? vf_load(state + 16 * p) : vf_zero();
    for (int b = b0; b < b1; b++) {
        const uint8_t *blk = wrow + (size_t)b * 144;
        prefetch_tile(blk, 144, pf);
        const __m128i sm = q4k_scales_v(blk + 4);
        const ii scale = ii_u8_i16(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(sm), sc_idx)); /* int16 sc_j */
        const vf mins = vf_mul(vf_u8(_mm_shuffle_epi8(sm, m_idx)), vf_set1(f16(blk + 2))); /* dmin m_j, exact */
        const vf d = vf_set1(f16(blk));
        ub q[4];
        q4k_unpack(blk + 16, q);
        _Pragma("GCC unroll 8")
        for (int p = 0; p < P; p++) {
            const int8_t *xa = x->q8 + ((size_t)b * x->rt + 2 * p) * 256;
            const ii sum = ii_madd(ii_packs(dot4(q, xa), one ? ii_zero() : dot4(q, xa + 256)), scale);
            const size_t at = (size_t)b * x->rt / 2 + p;
            acc[p] = vf_fnma(vf_fma_ii(acc[p], sum, vf_mul(d, vf_bcast4(x->d + 4 * at))), mins, x->s + 16 * at);
        }
    }
    _Pragma("GCC unroll 8")
    for (int p = 0; p < P; p++) vf_store(state + 16 * p, acc[p]);
}

/* One Q6_K weight row against P pairs of rows of x. The weights go in signed (q - 32) against x + 128; each row's
   lanes start at -128 times the sum of their weights, so after four dpbusd lane l holds the exact sum of
   (q - 32) qx over sub-block l (|sum| <= 16 * 32 * 127); times the int8 scale sc_l (below 2^23), the two lanes
   of each part j add to one exact int32 below 2^24, into the pair layout, fma'd with d * xd into its float
   lane. */
static inline __attribute__((always_inline)) void q6k_tile(const kx_t *x, int P, int one, int K, const uint8_t *wrow,
                                                          int b0, int b1, size_t pf, float *state) {
    vf acc[RT / 2];
    _Pragma("GCC unroll 8")
    for (int p = 0; p < P; p++) acc[p] = b0 ? vf_load(state + 16 * p) : vf_zero();
    for (int b = b0; b < b1; b++) {
        const uint8_t *blk = wrow + (size_t)b * 210;
        prefetch_tile(blk, 210, pf);
        const ii scale = ii_bytes_s(blk + 192);
        ub q[4];
        q6k_unpack(blk, blk + 128, q);
        ii corr = ii_zero();
        for (int v = 0; v < 4; v++) q[v] = ub_subc(q[v], 32), corr = ii_corr(corr, q[v]);
        const vf d = vf_set1(f16(blk + 208));
        _Pragma("GCC unroll 8")
        for (int p = 0; p < P; p++) {
            const uint8_t *xa = x->u8 + ((size_t)b * x->rt + 2 * p) * 256;
            const ii sb = one ? ii_zero() : ii_mullo(dotu4(corr, xa + 256, q), scale);
            const ii sum = ii_pairsum(ii_mullo(dotu4(corr, xa, q), scale), sb);
            acc[p] = vf_fma_ii(acc[p], sum, vf_mul(d, vf_bcast4(x->d + ((size_t)b * x->rt / 2 + p) * 4)));
        }
    }
    _Pragma("GCC unroll 8")
    for (int p = 0; p < P; p++) vf_store(state + 16 * p, acc[p]);
}

/* A Q5_0 block's q in 0..31, or a Q8_0 block's q, as 32 bytes in value order. */
static inline __m256i b32_bytes(const uint8_t *blk, int kind) {
    if (kind == KIND_GGUF_Q8_0) return _mm256_loadu_si256((const __m256i *)(blk + 2)); /* signed */
    uint32_t qh;
    memcpy(&qh, blk + 2, 4);
    const __m128i qs = _mm_loadu_si128((const __m128i *)(blk + 6)), low = _mm_set1_epi8(0x0F);
    const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), low), _mm_and_si128(qs, low));
    return _mm256_sub_epi8(_mm256_or_si256(nib, _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10))),
                           _mm256_set1_epi8(16)); /* q - 16 */
}

/* Two consecutive Q5_0 / Q8_0 blocks' values (b32_bytes of blk, then of the next block) as one vector, their fp16
   d as the float pair (first block's d in lanes 0..7), and two consecutive floats of x's d as a pair. AVX-512: the
   Q5_0 nibble bytes go in twice (lanes 1 and 3 shifted to the high nibbles), and the values whose qh bit is clear
   lose 16 in one masked subtraction; the same bytes as b32_bytes, in about a third of the instructions. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
static inline ub b32_two(const uint8_t *blk, int kind) {
    if (kind == KIND_GGUF_Q8_0)
        return ub_pair(_mm256_loadu_si256((const __m256i *)(blk + 2)), _mm256_loadu_si256((const __m256i *)(blk + 36)));
    uint32_t h0, h1;
    memcpy(&h0, blk + 2, 4), memcpy(&h1, blk + 24, 4);
    const __m512i qs = ub_pair(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 6))),
                               _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 28))));
    const __m512i nib = _mm512_and_si512(_mm512_mask_srli_epi16(qs, 0xFF00FF00u, qs, 4), _mm512_set1_epi8(0x0F));
    return _mm512_mask_sub_epi8(nib, ~((uint64_t)h0 | (uint64_t)h1 << 32), nib, _mm512_set1_epi8(16));
}
static inline vf vf_pair_f16(const uint8_t *a, const uint8_t *b) {
    uint16_t ha, hb;
    memcpy(&ha, a, 2), memcpy(&hb, b, 2);
    const __m128 d = _mm_cvtph_ps(_mm_cvtsi32_si128((int)(ha | (uint32_t)hb << 16)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(d));
}
static inline vf vf_pair_at(const float *p) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)p))));
}
#else
static inline ub b32_two(const uint8_t *blk, int kind) {
    return ub_pair(b32_bytes(blk, kind), b32_bytes(blk + kind_bytes(kind), kind));
}
static inline vf vf_pair_f16(const uint8_t *a, const uint8_t *b) { return vf_pair(f16(a), f16(b)); }
static inline vf vf_pair_at(const float *p) { return vf_pair(p[0], p[1]); }
#endif

/* Blocks b, b + 1 (two) or b alone (lanes 0..7) of one Q5_0 / Q8_0 weight row against R rows of x: lane l gains
   the exact sum of its 4 values' (q - 16) qx (Q5_0: unsigned q, the lane starting at -16 times its values' sum of
   x) or q qx (Q8_0), fma'd with d * xd of its block into float lane l. */
static inline __attribute__((always_inline)) void b32_step(const kx_t *x, int R, int K, const uint8_t *blk, int kind,
                                                          int b, int two, size_t pf, vf acc[]) {
    const int bytes = kind_bytes(kind), q8 = kind == KIND_GGUF_Q8_0;
    (void)q8; /* the AVX2 build multiplies Q8_0 signed by signed */
    if (two) prefetch_tile(blk, 2 * bytes, pf);
    const ub w = two ? b32_two(blk, kind) : ub_pair(b32_bytes(blk, kind), _mm256_setzero_si256());
    const ii corr = ii_corr(ii_zero(), w);
    const vf d = two ? vf_pair_f16(blk, blk + bytes) : vf_pair(f16(blk), 0.0f);
    _Pragma("GCC unroll 16")
    for (int r = 0; r < R; r++) {
        const float *xd = x->d + (size_t)r * (K / 32) + b;
        const size_t at = XQ(r, K) + (size_t)b * 32;
        ii sum;
#if HAVE_DPBUSD
        sum = two ? ii_dotu(corr, x->u8 + at, w) : ii_dotu_lo(corr, x->u8 + at, w);
#else
        if (q8) sum = two ? ii_dots8(w, x->q8 + at) : ii_dots8_lo(w, x->q8 + at);
        else sum = two ? ii_dotu(corr, x->u8 + at, w) : ii_dotu_lo(corr, x->u8 + at, w);
#endif
        acc[r] = vf_fma_ii(acc[r], sum, vf_mul(d, two ? vf_pair_at(xd) : vf_pair(xd[0], 0.0f)));
    }
}

/* One Q5_0 / Q8_0 weight row (kind a constant after inlining) against R = 2 P - one rows of x, two blocks (64
   values) a step; an odd last block fills lanes 0..7. */
static inline __attribute__((always_inline)) void b32_tile(const kx_t *x, int P, int one, int K, const uint8_t *wrow,
                                                          int kind, int b0, int b1, size_t pf, float *state) {
    const int bytes = kind_bytes(kind), R = 2 * P - one;
    vf acc[RT];
    _Pragma("GCC unroll 16")
    for (int r = 0; r < R; r++) acc[r] = b0 ? vf_load(state + 16 * r) : vf_zero();
    int b = b0;
    for (; b + 1 < b1; b += 2) b32_step(x, R, K, wrow + (size_t)b * bytes, kind, b, 1, pf, acc);
    if (b < b1) b32_step(x, R, K, wrow + (size_t)b * bytes, kind, b, 0, pf, acc);
    _Pragma("GCC unroll 16")
    for (int r = 0; r < R; r++) vf_store(state + 16 * r, acc[r]);
}

/* One register tile: R rows of x, in pairs (a constant number in each case; one row alone skips its pair's zero
   row), against one weight row, over its blocks b0..b1. */
static void tile_int8(const kx_t *x, int R, int K, const uint8_t *wrow, int kind, int b0, int b1, size_t pf,
                      float *state) {
#define CASE(n, one)                                                                                                 \
    if (kind == KIND_GGUF_Q4_K) q4k_tile(x, n, one, K, wrow, b0, b1, pf, state);                                         \
    else if (kind == KIND_GGUF_Q6_K) q6k_tile(x, n, one, K, wrow, b0, b1, pf, state);                                    \
    else if (kind == KIND_GGUF_Q5_0) b32_tile(x, n, one, K, wrow, KIND_GGUF_Q5_0, b0, b1, pf, state);                    \
    else b32_tile(x, n, one, K, wrow, KIND_GGUF_Q8_0, b0, b1, pf, state);                                                \
    break;
    switch (R == 1 ? 0 : (R + 1) / 2) {
    case 0: CASE(1, 1)
#if RT == 16
    case 8: CASE(8, 0) case 7: CASE(7, 0) case 6: CASE(6, 0) case 5: CASE(5, 0)
#endif
    case 4: CASE(4, 0) case 3: CASE(3, 0) case 2: CASE(2, 0) default: CASE(1, 0)
    }
#undef CASE
}

/* The threads share out groups of NG weight rows; each group passes over its rows of x in register tiles of RT
   rows (each weight row read from memory once, then from L1). Tiles keep an output's float lanes in `state`
   (blocks b0..b1 a call, so a long row could be split without changing an operation; every call covers the
   whole row). The output is the fixed-tree sum of its lanes: Q5_0 / Q8_0's 16, the K-quants' 8 of its pair's. */
void kq_linear_int8(const kx_t *xq, int T, int K, const uint8_t *w, int N, int kind, float *y, int ldy) {
    const int F = kq_family(kind), nb = K / F;
    const size_t row_bytes = (size_t)nb * kind_bytes(kind);
    int chunk = X_CHUNK_BYTES / (int)(2 * K) / RT * RT;
    if (chunk < RT) chunk = RT;
    for (int t0 = 0; t0 < T; t0 += chunk) {
        const int end = T - t0 < chunk ? T : t0 + chunk;
#pragma omp for schedule(static) nowait
        for (int g = 0; g < (N + NG - 1) / NG; g++) {
            const int n0 = g * NG, n1 = N - n0 < NG ? N : n0 + NG;
            float state[NG * RT * 16];
            for (int t = t0; t < end; t += RT) {
                const kx_t xt = kx_at(xq, t, T, K, F);
                const int R = end - t < RT ? end - t : RT;
                float *yt = y + (size_t)t * ldy;
                const int KC = F == 32 ? nb : X_L1_BYTES / (256 * ((R + 1) / 2 * 2)) + 1; /* blocks a pass */
                const size_t pf = KC < nb ? NG * row_bytes : PREFETCH_BYTES;
                for (int b0 = 0; b0 < nb; b0 += KC)
                    for (int n = n0; n < n1; n++)
                        tile_int8(&xt, R, K, w + (size_t)n * row_bytes, kind, b0, nb - b0 < KC ? nb : b0 + KC, pf,
                                  state + (n - n0) * RT * 16);
                for (int n = n0; n < n1; n++)
                    for (int r = 0; r < R; r++) {
                        const float *st = state + (n - n0) * RT * 16 + 16 * (F == 32 ? r : r / 2);
                        if (F == 32) {
                            yt[(size_t)r * ldy + n] = vf_hsum(vf_load(st));
                        } else if (r % 2 == 0) { /* hsum8's tree over each row's lanes j = 0..7 in order */
                            __m128 u = _mm_add_ps(_mm_loadu_ps(st), _mm_loadu_ps(st + 8)), v = _mm_loadu_ps(st + 4);
                            u = _mm_add_ps(u, _mm_add_ps(v, _mm_loadu_ps(st + 12))); /* A, A, B, B */
                            u = _mm_add_ps(u, _mm_movehdup_ps(u));
                            yt[(size_t)r * ldy + n] = _mm_cvtss_f32(u);
                            if (r + 1 < R) yt[(size_t)(r + 1) * ldy + n] = _mm_cvtss_f32(_mm_movehl_ps(u, u));
                        }
                    }
            }
        }
    }
}

/* x (T, K) float32, w (N, row bytes), y (T, ldy) float32 (columns 0..N). int8: x rounded to int8 blocks.
   Returns 0, or -1 when scratch memory cannot be had. */
int kq_linear(const float *x, int T, int K, const uint8_t *w, int N, int kind, int int8, float *y, int ldy,
              int threads) {
    kx_t xq = {NULL, NULL, NULL, NULL, 0};
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
