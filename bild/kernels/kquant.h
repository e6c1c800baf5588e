/* GGUF's own block kinds (kquant.c), as blocks.c's model_forward and bild/kernels/__init__.py call them.
   Layouts are documented once, at the top of kquant.c. */

#ifndef BILD_KQUANT_H
#define BILD_KQUANT_H

#include <stdint.h>

/* Kind codes shared with __init__.py's LAYOUTS: 4 and 8 are bild's own q4_1 / q8_0 (blocks.c, fp32 scales). */
enum { KIND_Q4_1 = 4, KIND_Q8_0 = 8, KIND_GGUF_Q4_K = 20, KIND_GGUF_Q6_K = 21, KIND_GGUF_Q5_0 = 22, KIND_GGUF_Q8_0 = 23 };

static inline int kq_is_gguf(int kind) { return kind >= KIND_GGUF_Q4_K && kind <= KIND_GGUF_Q8_0; }

/* Values per block along the input dimension (256 for the K-quants, 32 otherwise): also the block of x that
   shares one int8 scale in the int8 path. */
static inline int kq_family(int kind) { return kind == KIND_GGUF_Q4_K || kind == KIND_GGUF_Q6_K ? 256 : 32; }

/* x (T, K) rounded to int8 values per block of `family` values (kquant.c: "int8 value order" and "Row pairs"):
   q8   the int8 values. Family 32: row t at t K, in order. Family 256: tile-major, in kquant.c's register tiles
        of RT rows: super-block b of row t in tile t / RT at (t / RT) K RT + (b rt + t % RT) 256, lane-major,
        rt the tile's rows (RT, or a last tile's, rounded up to a pair: no 4 KB strides over unused rows);
   u8   the same plus 128, unsigned (for the kinds whose weights go in signed);
   d    the scale xd of each block: family 32 row t's at t (K / 32); family 256 per pair of rows and super-block,
        4 floats (A, A, B, B) in the same tile-major order;
   s    family 256: xd times the sum of each 32 values (Q4_K's mins), 16 floats per pair and super-block.
   kx_alloc allocates whole tiles (an odd T's pair gets a zero row). */
typedef struct {
    int8_t *q8;
    float *d, *s;
    uint8_t *u8;
    int rt; /* kquant.c's view of one tile (kx_at): its row stride; 0 in the allocation */
} kx_t;

int kx_alloc(kx_t *x, int T, int K);
void kx_free(kx_t *x);

/* These run inside an OpenMP parallel region, shared by its team. kq_quantise ends in a barrier; the linears
   split the N output columns between the threads and do not wait (the caller puts a barrier after its last).
   y (T, ldy): column n of the weight goes to y[t * ldy + n]. */
void kq_quantise(const float *x, int T, int K, int family, kx_t *xq);
void kq_linear_int8(const kx_t *xq, int T, int K, const uint8_t *w, int N, int kind, float *y, int ldy);
void kq_linear_f32(const float *x, int T, int K, const uint8_t *w, int N, int kind, float *y, int ldy);

#endif
