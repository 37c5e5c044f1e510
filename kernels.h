/* kernels.h: what run.c and its fast kernels (kernels/) share, and what the kernels do.
 *
 * run.c computes every operation of the model with a plain loop. Three of them have fast kernels:
 * a block of tokens times a weight matrix (kernel_matmuls), attention over the KV cache
 * (kernel_attention) and SwiGLU's product (kernel_swiglu). They are built where the compiler
 * targets AVX-512, AVX2 with FMA and F16C, or NEON (KERNELS_BUILT); run.c calls each at one plug
 * point (matmuls, attention, swiglu), and runs its plain loop instead under --ref-kernels or in a
 * build without them. run.c includes the kernels' code (kernels/matmul.c, kernels/attention.c)
 * as it includes tokenizer.c: one translation unit. Only those files know instruction sets.
 *
 * What holds, whatever the instruction set and the thread count: every output element is
 * computed by one thread, in an order fixed by the shapes alone, so the results are the same bits
 * at any thread count; and they equal the plain loops' to float rounding (tests/kernel_test.c).
 *
 * Besides the kernels' interface, this header holds what both sides must agree on: the weight
 * matrix, the f16 and q8_0 number formats, the layout of the KV cache, the threads.
 */
#ifndef KERNELS_H
#define KERNELS_H

#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sched.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "model.h"

#if (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)) || \
    (defined(__aarch64__) && defined(__ARM_NEON))
#define KERNELS_BUILT 1
#else
#define KERNELS_BUILT 0
#endif

/* How far ahead a stream of weights touches each 4 KB page, one line a page: decoding's rows
 * (kernels/matmul.c, prefetch_page_ahead), and tests/stream's passes, which read the file as fast
 * as decoding's rows can */
#define PAGES_AHEAD 32768

/* a linear weight [rows, cols] as in PyTorch (out = W x), pointing into the mapped model file */
typedef struct {
    int dtype;                  /* enum mm_dtype */
    int rows, cols;
    const void *data;           /* f32/f16/bf16 values [rows, cols], or q8_0 panels (model.h) */
} Matrix;

/* one matrix of a matmuls call: out[t, r] = W[r, :] . x[t, :] */
typedef struct {
    float *out;                 /* [n_tokens, w->rows] */
    const Matrix *w;
} MatmulJob;

/* ---- numbers: f16 and bf16 (weights, and an f16 KV cache) ---- */

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {  /* zero or subnormal: man * 2^-24 */
        float v = ldexpf((float)man, -24);
        return sign ? -v : v;
    }
    bits = exp == 0x1f ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h) {  /* bf16 is the top half of an f32 */
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* f32 -> f16, rounding to nearest even (overflow to inf) */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, mag = x & 0x7fffffff;
    if (mag >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (mag > 0x7f800000 ? 0x200 : 0));  /* inf, nan */
    if (mag >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  /* rounds past 65504: inf */
    if (mag < 0x38800000) {                                    /* f16 subnormal or zero */
        float v = fabsf(f) * 16777216.0f;                      /* in units of 2^-24 */
        return (uint16_t)(sign | (uint16_t)nearbyintf(v));
    }
    uint32_t r = mag - 0x38000000;                             /* rebias 127 -> 15, in place */
    r = (r + 0xfff + ((r >> 13) & 1)) >> 13;
    return (uint16_t)(sign | r);
}

/* ---- q8_0: 32 values share a scale, q[i] = round(x[i] / d), d = max|x| / 127 ----
 * The weights are stored so (model.h); a q8_0 matrix multiplies activations quantised the same
 * way, so that each group's product is an exact integer sum times two scales. n: a multiple of
 * 32. */
static inline void quantize_q8(int8_t *q, float *scale, const float *x, int n) {
    for (int g = 0; g < n / MM_Q8_GROUP; g++) {
        const float *xg = x + (size_t)g * MM_Q8_GROUP;
        float amax = 0;
        for (int i = 0; i < MM_Q8_GROUP; i++) amax = fmaxf(amax, fabsf(xg[i]));
        float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
        for (int i = 0; i < MM_Q8_GROUP; i++)  /* (clamped: NaN and inf get a code too, not UB) */
            q[g * MM_Q8_GROUP + i] = (int8_t)nearbyintf(fminf(fmaxf(xg[i] * id, -127.0f), 127.0f));
        scale[g] = d;
    }
}

/* bytes of one q8_0 panel of 16 rows: the codes, then the f16 scales (model.h) */
static inline uint64_t q8_panel_bytes(uint64_t cols) {
    return MM_Q8_PANEL * cols + MM_Q8_PANEL * (cols / MM_Q8_GROUP) * 2;
}

/* ---- the KV cache ----
 * The keys and values of every layer and kv head, f32 or (--kv f16) f16, in pages of KV_PAGE
 * positions: page p holds positions p * KV_PAGE .. (p + 1) * KV_PAGE - 1 of all of them,
 * [n_layers][keys, values][n_kv_heads][KV_PAGE positions][head_dim]. Memory is committed as pages
 * are first written (run.c, alloc_kv), so a context costs only the pages its positions reach: the
 * first token touches one page, whatever -c is. Within a page, a head's values are rows
 * [KV_PAGE][head_dim]; its keys are transposed in blocks of KEY_BLOCK positions,
 * [KV_PAGE / KEY_BLOCK][head_dim][KEY_BLOCK]: one vector load holds dimension d of KEY_BLOCK keys,
 * so the scores of KEY_BLOCK keys are head_dim multiply-adds with no horizontal sums. */
#define KEY_BLOCK 16
#define KV_PAGE 256

typedef struct {
    void *keys, *values;        /* this layer's keys and values of kv head 0 in page 0 */
    size_t page_bytes;          /* bytes from one page to the next */
    int dtype;                  /* MM_F32 or MM_F16 */
    int n_kv_heads, group;      /* group: the query heads that read each kv head */
    int head_dim;
} KvLayer;

static inline size_t kv_elem_size(int dtype) { return dtype == MM_F16 ? 2 : 4; }

/* bytes of one kv head's keys (or values) in one page */
static inline size_t kv_head_bytes(const KvLayer *c) {
    return (size_t)KV_PAGE * c->head_dim * kv_elem_size(c->dtype);
}

/* kv head g's keys from the block that holds position pos; the positions from there to the end of
 * its page follow in order, a block after another */
static inline void *kv_keys(const KvLayer *c, int g, int pos) {
    return (uint8_t *)c->keys + (size_t)(pos / KV_PAGE) * c->page_bytes + (size_t)g * kv_head_bytes(c) +
           (size_t)(pos % KV_PAGE / KEY_BLOCK * KEY_BLOCK) * c->head_dim * kv_elem_size(c->dtype);
}
/* kv head g's value row of position pos; the rows to the end of its page follow */
static inline void *kv_values(const KvLayer *c, int g, int pos) {
    return (uint8_t *)c->values + (size_t)(pos / KV_PAGE) * c->page_bytes + (size_t)g * kv_head_bytes(c) +
           (size_t)(pos % KV_PAGE) * c->head_dim * kv_elem_size(c->dtype);
}

/* where dimension d of the key at position pos lies in the block kv_keys gives (in elements) */
static inline size_t key_in_block(int pos, int d) {
    return (size_t)d * KEY_BLOCK + (size_t)(pos % KEY_BLOCK);
}

/* ---- threads (OpenMP, when built with it) ---- */

static inline int n_threads(void) {  /* the threads a parallel region gets (--threads) */
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int team_size(void) {  /* the threads of the region this runs in (1 outside any) */
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* ---- a decoded token's team ----
 * libgomp forks and joins the threads at every parallel region, microseconds each, and a decoded
 * token makes some 40 calls of tens of microseconds (docs/kernels.md, Threads). So a single
 * token's forward pass runs inside one region (kernel_team): its first thread runs the pass, the
 * others wait for work, and the kernels hand them their parts of each call (team_work) instead of
 * forking. The waiting threads spin on one counter: a pass lasts milliseconds, and a thread that
 * slept would wake later than the work it was woken for. */
typedef void (*TeamWork)(void *arg, int id, int nth);

static struct {
    _Alignas(64) _Atomic unsigned posted;   /* work posted so far (the waiting threads watch it) */
    _Alignas(64) _Atomic unsigned finished; /* threads done with the work posted last */
    TeamWork work;                          /* the work posted last, and its argument */
    void *arg;
    bool quit;                              /* with the last post: the pass is over */
    int size;                               /* the threads of the team; 0: no team is up */
} team;

/* spin until *v equals value (until_equal) or differs from it; after a long wait, yield the CPU
 * at every turn: another process wants it when the thread waited for is not running */
static void team_spin(_Atomic unsigned *v, unsigned value, bool until_equal) {
    for (long spins = 0;; spins++) {
        unsigned now = atomic_load_explicit(v, memory_order_acquire);
        if (until_equal ? now == value : now != value) return;
        if (spins > 100000) sched_yield();
    }
}

#if KERNELS_BUILT  /* (the kernels post work; a build without them has a team that waits for none) */
/* work(arg, id, nth) on every thread of the team, the caller as id 0; back when all are done */
static void team_work(TeamWork work, void *arg) {
    atomic_store_explicit(&team.finished, 0, memory_order_relaxed);
    team.work = work, team.arg = arg;
    atomic_fetch_add_explicit(&team.posted, 1, memory_order_release);
    work(arg, 0, team.size);
    team_spin(&team.finished, (unsigned)team.size - 1, true);
}
#endif

/* body(arg) on this thread while a team of n_threads() waits for its kernels' work (no team at
 * one thread, or in a build without OpenMP) */
static void kernel_team(void (*body)(void *), void *arg) {
    if (n_threads() == 1 || team.size) {
        body(arg);
        return;
    }
    unsigned first = atomic_load(&team.posted);
    #pragma omp parallel
    {
        if (thread_id() == 0) {
            team.size = team_size();  /* (the system may give fewer threads than asked) */
            team.quit = false;
            body(arg);
            team.quit = true;
            atomic_fetch_add_explicit(&team.posted, 1, memory_order_release);
            team.size = 0;
        } else {
            for (unsigned seen = first;; seen++) {
                team_spin(&team.posted, seen, false);
                if (team.quit) break;
                team.work(team.arg, thread_id(), team_size());
                atomic_fetch_add_explicit(&team.finished, 1, memory_order_release);
            }
        }
    }
}

/* ---- the kernels ---- */

/* what matmuls hands each thread (kernels/matmul.c): the next piece of its range in the low 32
 * bits, the range's end in the high, one atomic word on a cache line of its own */
typedef struct { _Alignas(64) _Atomic uint64_t next_end; } PieceRange;

/* The kernels' scratch, for blocks of up to max_tokens tokens whose matrices have up to max_cols
 * columns, and attention with `group` query heads per kv head of head_dim: one block of memory
 * of kernel_scratch_bytes(), laid out by kernel_scratch_init. */
typedef struct {
    float *strips;              /* [threads, OP_ROWS * max_cols] f16/bf16 weight rows as f32 */
    int strip_len;
    float *xT;                  /* [max_cols, xT_width(max_tokens)] a prompt block's x, transposed */
    int8_t *xq;                 /* [max_tokens, max_cols] x quantised for q8_0 matrices */
    float *xs;                  /* [max_tokens, max_cols / 32] their scales */
    int32_t *xqsum;             /* [max_tokens, max_cols / 32] -128 x each group's sum of codes */
    PieceRange *ranges;         /* [threads] */
    float *att;                 /* [threads, att_len] attention's tiles and running sums */
    size_t att_len;
} KernelScratch;

static const char *const KERNELS;  /* the instruction set: "avx512", "avx2", "neon", ... or "none" */

static size_t kernel_scratch_bytes(int max_tokens, int max_cols, int group, int head_dim, int threads);
static void kernel_scratch_init(KernelScratch *ks, void *memory, int max_tokens, int max_cols, int group,
                                int head_dim, int threads);

/* out_j[t, :] = W_j x[t, :] for t < n_tokens, for up to KERNEL_MAX_JOBS matrices W_j of one dtype
 * and x's columns: x [n_tokens, cols], out_j [n_tokens, W_j.rows] */
#define KERNEL_MAX_JOBS 3
static void kernel_matmuls(const MatmulJob *jobs, int n_jobs, const float *x, int n_tokens,
                           KernelScratch *ks);

/* Attention of n tokens at positions pos0.. whose keys and values are in the cache c: for each
 * query head, softmax(q k^T / sqrt(head_dim)) v over positions 0 .. its own. q, out: [n,
 * n_heads * head_dim] */
static void kernel_attention(float *out, const float *q, int n, int pos0, const KvLayer *c,
                             KernelScratch *ks);

/* Decoding one token reads each f32, f16 or bf16 weight row whole, in the kernels' vectors; an
 * AVX-512 build can read it in 256-bit halves instead, the same sums in the same order (the same
 * bits), which some processors do faster (AMD Zen 4: docs/kernels.md). kernel_row_widths: the
 * widths this build has, in bits (none without the kernels); kernel_set_row_bits: one of them,
 * or 0 for the one this processor reads fastest; kernel_row_bits: the width in use. */
static int kernel_row_widths(int bits[2]);
static void kernel_set_row_bits(int bits);
static int kernel_row_bits(void);

/* gate[t, i] = silu(gate[t, i]) * up[t, i] for n rows of `hidden` */
static void kernel_swiglu(float *gate, const float *up, int n, int hidden);

#endif
