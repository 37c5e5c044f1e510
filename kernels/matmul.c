/* kernels/matmul.c: out = W x for a block of tokens, fast (kernel_matmuls), and SwiGLU's
 * product (kernel_swiglu). run.c's plain loop is the reference: out[t, r] = dot(W[r, :], x[t, :]).
 *
 * A block of tokens takes one of four forms, each summing every output element in an order fixed
 * by the shapes alone (never by the thread that computes it):
 *   one token (decoding)  each weight row read once, start to end, one stream through memory
 *                         (dot_row; q8_0: q8_panel_token, a panel of 16 rows at a time)
 *   2-15 tokens           register tiles of TILE_ROWS rows x TILE_TOKENS tokens over K_CHUNK
 *                         columns at a time (tile): each weight vector loaded serves every token
 *   16+ tokens (prompts)  outer-product tiles (op_tile): a row's weight broadcast into a vector of
 *                         tokens of the block's x transposed, so no horizontal sums at all
 *   q8_0, 2+ tokens       integer tiles over the file's panels (q8_tile)
 * Threads share the rows: contiguous shares, the larger calls in pieces that a thread which
 * finishes early takes from another (next_piece), prompt blocks in units handed out as threads
 * come free.
 */
#include "vector.h"

#if KERNELS_BUILT

#define K_CHUNK 512              /* columns per pass of a 2-15 token block (a multiple of 32) */
#define OP_MIN_TOKENS 16         /* blocks of this many tokens take the outer-product form */
#define XT_TOKENS 32             /* the transposed activations are padded to a multiple of this */

/* the row length of KernelScratch.xT for a block of n tokens: n padded to a multiple of XT_TOKENS */
static size_t xT_width(size_t n) { return (n + XT_TOKENS - 1) / XT_TOKENS * XT_TOKENS; }

/* ---- 2-15 tokens: dot-product tiles; one token: dot_row ---- */

/* out[t * ldo + r] (+)= w[r, :K] . x[t, :K] for r < R, t < T; w rows ldw elements apart
 * (f32/f16/bf16), x rows ldx apart; add: accumulate onto out (a later chunk of the columns) */
static ALWAYS_INLINE void tile(float *out, int ldo, int dtype, const void *w, int ldw,
                               const float *x, int ldx, int K, const int R, const int T, bool add) {
    size_t elem = dtype == MM_F32 ? 4 : 2;
    const uint8_t *wr[TILE_ROWS];
    const float *xt[TILE_TOKENS];
    for (int r = 0; r < R; r++) wr[r] = (const uint8_t *)w + (size_t)r * ldw * elem;
    for (int t = 0; t < T; t++) xt[t] = x + (size_t)t * ldx;
    vf acc[TILE_ROWS][TILE_TOKENS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = vf_zero();
    int k = 0;
    for (; k + VL <= K; k += VL) {
        vf xv[TILE_TOKENS];
        for (int t = 0; t < T; t++) xv[t] = vf_keep(vf_load(xt[t] + k));
        for (int r = 0; r < R; r++) {
            vf wv = vf_keep(load_w(dtype, wr[r], (size_t)k));
            for (int t = 0; t < T; t++) acc[r][t] = vf_fmadd(wv, xv[t], acc[r][t]);
        }
    }
    for (int t = 0; t < T; t++) {
        float sums[TILE_ROWS];  /* a full tile's four rows are summed together: fewer shuffles */
        if (R == TILE_ROWS && k == K) {  /* (no columns left over: the four sums are the outputs) */
            f4 s4 = vf_hsum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]);
            float *o = out + (size_t)t * ldo;
            f4_store(o, add ? f4_add(f4_load(o), s4) : s4);
            continue;
        }
        if (R == TILE_ROWS) f4_store(sums, vf_hsum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
        else for (int r = 0; r < R; r++) sums[r] = vf_hsum(acc[r][t]);
        for (int r = 0; r < R; r++) {
            float sum = sums[r];
            for (int kk = k; kk < K; kk++) sum += load1(dtype, wr[r], (size_t)kk) * xt[t][kk];
            out[(size_t)t * ldo + r] = add ? out[(size_t)t * ldo + r] + sum : sum;
        }
    }
}

/* The full tile as a function of its own per dtype: out of line, the register allocator keeps its
 * accumulators and pointers in registers (inlined into a large caller it spills) */
#define FULL_TILE(name, dtype)                                                                          \
    static __attribute__((noinline)) void name(float *out, int ldo, const void *w, int ldw, const float *x, \
                                               int ldx, int K, bool add) {                              \
        tile(out, ldo, dtype, w, ldw, x, ldx, K, TILE_ROWS, TILE_TOKENS, add);                           \
    }
FULL_TILE(full_tile_f32, MM_F32)
FULL_TILE(full_tile_f16, MM_F16)
FULL_TILE(full_tile_bf16, MM_BF16)
#undef FULL_TILE
static void (*const full_tile[])(float *, int, const void *, int, const float *, int, int, bool) = {
    [MM_F32] = full_tile_f32, [MM_F16] = full_tile_f16, [MM_BF16] = full_tile_bf16};

/* One line of the 4 KB page PAGES_AHEAD bytes ahead of a token's stream of weights, once a page:
 * called every `step` bytes of the stream at p, in the step that starts in a page's first `step`
 * bytes. Without it, the loads at the start of each page waited: decoding f32, f16 and bf16 ran
 * 1.25-1.42 times as fast with it at one thread and 1.10-1.29 at two (minimind-3 and minimind2
 * shapes; docs/kernels.md). q8_0's panels read no faster with it, and have none. */
static ALWAYS_INLINE void prefetch_page_ahead(const void *p, size_t step) {
    if (((uintptr_t)p & 4095) < step) prefetch_weights((const uint8_t *)p + PAGES_AHEAD);
}

/* w[:K] . x[:K] for one row when decoding a single token: the rows are read one after another, a
 * single stream through memory (four rows at a time, it is four short streams), a line of each
 * page ahead (prefetch_page_ahead) and f16 and bf16 rows line by line (prefetch_weights), with
 * four chains of FMAs so that their latency is hidden */
static ALWAYS_INLINE float dot_row(int dtype, const void *w, const float *x, int K) {
    vf acc[4] = {vf_zero(), vf_zero(), vf_zero(), vf_zero()};
    int k = 0;
    size_t elem = dtype == MM_F32 ? 4 : 2;
    for (; k + 4 * VL <= K; k += 4 * VL) {
        prefetch_page_ahead((const uint8_t *)w + k * elem, 4 * VL * elem);
        for (size_t b = 0; dtype != MM_F32 && b < 4 * VL * elem; b += 64)
            prefetch_weights((const uint8_t *)w + k * elem + HALF_ROWS_AHEAD + b);
        for (int j = 0; j < 4; j++)
            acc[j] = vf_fmadd(load_w(dtype, w, (size_t)(k + j * VL)), vf_load(x + k + j * VL), acc[j]);
    }
    for (; k + VL <= K; k += VL) acc[0] = vf_fmadd(load_w(dtype, w, (size_t)k), vf_load(x + k), acc[0]);
    float sum = vf_hsum(vf_add(vf_add(acc[0], acc[1]), vf_add(acc[2], acc[3])));
    for (; k < K; k++) sum += load1(dtype, w, (size_t)k) * x[k];
    return sum;
}

#ifdef HAVE_HALVES
/* dot_row reading the weights in half vectors (vector.h): lane i of half h of chain j sums what
 * lane 8h + i of dot_row's chain j sums, in the same order, and the halves are joined before the
 * same final sums: the same bits as dot_row */
static ALWAYS_INLINE float dot_row_halves(int dtype, const void *w, const float *x, int K) {
    enum { H = VL / 2 };
    vh lo[4] = {vh_zero(), vh_zero(), vh_zero(), vh_zero()}, hi[4] = {vh_zero(), vh_zero(), vh_zero(), vh_zero()};
    int k = 0;
    size_t elem = dtype == MM_F32 ? 4 : 2;
    for (; k + 4 * VL <= K; k += 4 * VL) {
        prefetch_page_ahead((const uint8_t *)w + k * elem, 4 * VL * elem);
        for (size_t b = 0; dtype != MM_F32 && b < 4 * VL * elem; b += 64)
            prefetch_weights((const uint8_t *)w + k * elem + HALF_ROWS_AHEAD + b);
        for (int j = 0; j < 4; j++) {
            size_t at = (size_t)(k + j * VL);
            lo[j] = vh_fmadd(load_wh(dtype, w, at), vh_load(x + at), lo[j]);
            hi[j] = vh_fmadd(load_wh(dtype, w, at + H), vh_load(x + at + H), hi[j]);
        }
    }
    for (; k + VL <= K; k += VL) {
        lo[0] = vh_fmadd(load_wh(dtype, w, (size_t)k), vh_load(x + k), lo[0]);
        hi[0] = vh_fmadd(load_wh(dtype, w, (size_t)k + H), vh_load(x + k + H), hi[0]);
    }
    vf acc[4];
    for (int j = 0; j < 4; j++) acc[j] = vf_join(lo[j], hi[j]);
    float sum = vf_hsum(vf_add(vf_add(acc[0], acc[1]), vf_add(acc[2], acc[3])));
    for (; k < K; k++) sum += load1(dtype, w, (size_t)k) * x[k];
    return sum;
}
#endif

/* decoding's rows in half vectors (kernel_set_row_bits) */
static bool rows_in_halves;

/* rows r0 .. r0+R (R <= TILE_ROWS) of out (+)= W x over kc columns, every token: w points at row r0
 * of those columns (rows ldw apart), x at the same columns of token 0 (rows ldx apart) */
static ALWAYS_INLINE void dot_tiles(float *out, int ldo, const float *x, int ldx, int n, int dtype,
                                    const void *w, int ldw, int kc, int r0, int R, bool add) {
    float *o = out + r0;
    if (n == 1) {  /* decoding: bound by reading the weights */
        size_t row_bytes = (size_t)ldw * (dtype == MM_F32 ? 4 : 2);
#ifdef HAVE_HALVES
        if (rows_in_halves) {
            for (int r = 0; r < R; r++) {
                float sum = dot_row_halves(dtype, (const uint8_t *)w + r * row_bytes, x, kc);
                o[r] = add ? o[r] + sum : sum;
            }
            return;
        }
#endif
        for (int r = 0; r < R; r++) {
            float sum = dot_row(dtype, (const uint8_t *)w + r * row_bytes, x, kc);
            o[r] = add ? o[r] + sum : sum;
        }
        return;
    }
    if (R < TILE_ROWS) {   /* the last rows of a matrix whose height is not a multiple of the tile's */
        for (int r = 0; r < R; r++)
            for (int t = 0; t < n; t++)
                tile(o + (size_t)t * ldo + r, ldo, dtype, (const uint8_t *)w + (size_t)r * ldw *
                     (dtype == MM_F32 ? 4 : 2), ldw, x + (size_t)t * ldx, ldx, kc, 1, 1, add);
        return;
    }
    int t = 0;
    for (; t + TILE_TOKENS <= n; t += TILE_TOKENS)
        full_tile[dtype](o + (size_t)t * ldo, ldo, w, ldw, x + (size_t)t * ldx, ldx, kc, add);
    /* the tokens left, in one tile of their number (a constant: its accumulators are registers) */
#define TAIL(T) tile(o + (size_t)t * ldo, ldo, dtype, w, ldw, x + (size_t)t * ldx, ldx, kc, TILE_ROWS, T, add)
    switch (n - t) {
    case 1: TAIL(1); break;
    case 2: TAIL(2); break;
#if TILE_TOKENS > 3
    case 3: TAIL(3); break;
    case 4: TAIL(4); break;
    case 5: TAIL(5); break;
#endif
    }
#undef TAIL
}

/* ---- matmul for prompt blocks: the outer-product form ----
 * OP_ROWS weight rows times OP_TOKENS tokens: for every column k, each row's weight is broadcast and
 * multiplied into a vector of VL tokens' activations, which are stored transposed for this
 * (xT[k, token], every token's x of the block). No horizontal sums: each output element is one
 * chain of FMAs over k = 0 .. K-1 in order, whatever the tile, the block or the thread. f16 and
 * bf16 weights are converted a strip of OP_ROWS rows at a time, once per prompt block. (q8_0
 * matrices have integer tiles of their own, below, for any number of tokens.) */
enum { OP_TOKENS = 2 * VL };
_Static_assert(OP_TOKENS <= XT_TOKENS, "xT holds a tile's tokens");

/* out[t * ldo + r] = w[r, :K] . x[t, :K] for r < R, t < T (T <= V VL <= OP_TOKENS): w f32 rows ldw
 * apart, xT the columns' activations ldxT apart from this tile's first token; V: vectors of tokens
 * used */
static ALWAYS_INLINE void op_tile(float *out, int ldo, const float *w, int ldw, const float *xT, int ldxT,
                                  int K, const int R, const int V, int T) {
    vf acc[OP_ROWS][2];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = vf_zero();
    for (int k = 0; k < K; k++) {
        vf xv[2];
        for (int v = 0; v < V; v++) xv[v] = vf_load(xT + (size_t)k * ldxT + v * VL);
        for (int r = 0; r < R; r++) {
            vf wv = vf_set1(w[(size_t)r * ldw + k]);
            for (int v = 0; v < V; v++) acc[r][v] = vf_fmadd(wv, xv[v], acc[r][v]);
        }
    }
    /* stored token by token, each token's R outputs at once: stored row by row, the tile wrote T
     * lines ldo floats apart R times over, and when ldo is a multiple of 512 (2 KB: minimind2's
     * 2048 FFN rows, minimind2-small's 512 q and o rows) 16 or more of those lines fall in one set
     * of the L1 cache, which holds 12: every store missed and those matrices ran at half speed */
    float acc_t[OP_ROWS][OP_TOKENS];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) vf_store(acc_t[r] + v * VL, acc[r][v]);
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) out[(size_t)t * ldo + r] = acc_t[r][t];
}

/* the full tile out of line: its accumulators stay in registers */
static __attribute__((noinline)) void op_tile_full(float *out, int ldo, const float *w, int ldw,
                                                   const float *xT, int ldxT, int K, int T) {
    op_tile(out, ldo, w, ldw, xT, ldxT, K, OP_ROWS, 2, T);
}

/* rows r0 .. r1 of out = W x for the n tokens whose x is in xT ([W.cols, ldxT]); strip: room for
 * OP_ROWS rows of f32 */
static void op_rows(float *out, const Matrix *w, const float *xT, int ldxT, int n, int r0, int r1,
                    float *strip) {
    int cols = w->cols;
    for (int r = r0; r < r1; r += OP_ROWS) {
        int R = r1 - r < OP_ROWS ? r1 - r : OP_ROWS;
        const float *rows = (const float *)w->data + (size_t)r * cols;
        if (w->dtype != MM_F32) {  /* the strip's rows converted once, used by every token */
            for (int i = 0; i < R; i++) {
                float *dst = strip + (size_t)i * cols;
                const void *src = (const uint16_t *)w->data + (size_t)(r + i) * cols;
                int c = 0;
                for (; c + VL <= cols; c += VL) vf_store(dst + c, load_w(w->dtype, src, (size_t)c));
                for (; c < cols; c++) dst[c] = load1(w->dtype, src, (size_t)c);
            }
            rows = strip;
        }
        for (int t = 0; t < n; t += OP_TOKENS) {
            int T = n - t < OP_TOKENS ? n - t : OP_TOKENS;
            float *o = out + (size_t)t * w->rows + r;
            const float *xt = xT + t;
            if (R == OP_ROWS && T > VL) { op_tile_full(o, w->rows, rows, cols, xt, ldxT, cols, T); continue; }
            /* the last rows of a matrix (not a multiple of OP_ROWS), or a last run of at most VL
             * tokens: tiles of 4 rows, then of 1 */
            int i = 0;
            for (; i + 4 <= R; i += 4) {
                if (T > VL) op_tile(o + i, w->rows, rows + (size_t)i * cols, cols, xt, ldxT, cols, 4, 2, T);
                else op_tile(o + i, w->rows, rows + (size_t)i * cols, cols, xt, ldxT, cols, 4, 1, T);
            }
            for (; i < R; i++) {
                if (T > VL) op_tile(o + i, w->rows, rows + (size_t)i * cols, cols, xt, ldxT, cols, 1, 2, T);
                else op_tile(o + i, w->rows, rows + (size_t)i * cols, cols, xt, ldxT, cols, 1, 1, T);
            }
        }
    }
}

/* ---- q8_0 matrices: integer tiles ---- */

/* Lanes are weight rows. A panel stores 4 consecutive columns of its 16 rows in 64 bytes
 * (model.h), so one vector load holds 4 weight bytes of each of Q8_LANES rows; one token's 4
 * activation codes at those columns are broadcast, and each lane sums its 4 byte products into
 * its int32 (qi_dot4). After each group of 32 columns the exact int32 sums are scaled by their
 * two scales (the row's, the token's) and added in f32: the terms of run.c's dot_q8 in its order
 * (an FMA rounds once where it rounds twice). A tile is Q8_TILE_ROWS = 2 vectors of rows x up to
 * Q8_TILE_TOKENS tokens; one token takes a panel at a time (q8_panel_token), in the same order; no
 * horizontal sums anywhere. */


/* out[t * ldo + r] = W[r0 + r] . x[t] for r < R (<= Q8_TILE_ROWS), t < T; r0: a multiple of
 * Q8_TILE_ROWS; xq, xs, xqsum: the codes, scales and minus 128 x the group sums of the tile's first
 * token (rows cols, groups, groups apart) */
static ALWAYS_INLINE void q8_tile(float *out, int ldo, const Matrix *w, int r0, int R, const int8_t *xq,
                                  const float *xs, const int32_t *xqsum, const int T) {
    int cols = w->cols, groups = cols / MM_Q8_GROUP;
    size_t panel_bytes = q8_panel_bytes((uint64_t)cols);
    const uint8_t *code[2];
    const uint16_t *scale[2];
    for (int v = 0; v < 2; v++) {  /* vector v: Q8_LANES rows from row r0 + v Q8_LANES, in their panel */
        int row = r0 + v * Q8_LANES;
        if (row >= r0 + R) row = r0;  /* past the matrix: read real memory, store nothing */
        const uint8_t *panel = (const uint8_t *)w->data + (size_t)(row / MM_Q8_PANEL) * panel_bytes;
        code[v] = panel + 4 * (row % MM_Q8_PANEL);
        scale[v] = (const uint16_t *)(panel + (size_t)MM_Q8_PANEL * cols) + row % MM_Q8_PANEL;
    }
    qf acc[2][Q8_TILE_TOKENS];
    for (int t = 0; t < T; t++) acc[0][t] = acc[1][t] = qf_zero();
    for (int g = 0; g < groups; g++) {
        qi isum[2][Q8_TILE_TOKENS];
        for (int t = 0; t < T; t++)
            isum[0][t] = isum[1][t] = qi_set1(Q8_VNNI ? xqsum[(size_t)t * groups + g] : 0);
        #pragma GCC unroll 8
        for (int j = 0; j < MM_Q8_GROUP / 4; j++) {
            size_t at = ((size_t)g * MM_Q8_GROUP / 4 + j) * 4 * MM_Q8_PANEL;
            prefetch_weights(code[0] + at + WEIGHTS_AHEAD);
            if (Q8_TILE_ROWS > MM_Q8_PANEL)
                prefetch_weights(code[1] + at + WEIGHTS_AHEAD); /* (else the same 64 bytes) */
            qi w0 = qi_load(code[0] + at), w1 = qi_load(code[1] + at);
            qi u0 = qi_unsigned(w0), u1 = qi_unsigned(w1);
            for (int t = 0; t < T; t++) {
                int32_t x4;
                memcpy(&x4, xq + (size_t)t * cols + g * MM_Q8_GROUP + 4 * j, 4);
                qi xb = qi_set1(x4);
                isum[0][t] = qi_dot4(isum[0][t], w0, u0, xb);
                isum[1][t] = qi_dot4(isum[1][t], w1, u1, xb);
            }
        }
        qf s0 = qf_scales(scale[0] + (size_t)g * MM_Q8_PANEL),
           s1 = qf_scales(scale[1] + (size_t)g * MM_Q8_PANEL);
        for (int t = 0; t < T; t++) {
            qf sx = qf_set1(xs[(size_t)t * groups + g]);
            acc[0][t] = qf_fmadd_i(isum[0][t], qf_mul(s0, sx), acc[0][t]);
            acc[1][t] = qf_fmadd_i(isum[1][t], qf_mul(s1, sx), acc[1][t]);
        }
    }
    for (int t = 0; t < T; t++) {
        float *o = out + (size_t)t * ldo;
        if (R == Q8_TILE_ROWS) {
            qf_store(o, acc[0][t]);
            qf_store(o + Q8_LANES, acc[1][t]);
        } else {  /* the last rows of a matrix */
            float part[Q8_TILE_ROWS];
            qf_store(part, acc[0][t]);
            qf_store(part + Q8_LANES, acc[1][t]);
            memcpy(o, part, (size_t)R * sizeof(float));
        }
    }
}

static __attribute__((noinline)) void q8_tile_full(float *out, int ldo, const Matrix *w, int r0, int R,
                                                   const int8_t *xq, const float *xs, const int32_t *xqsum) {
    q8_tile(out, ldo, w, r0, R, xq, xs, xqsum, Q8_TILE_TOKENS);
}

/* One token (decoding): out[r] = W[r0 + r] . x for r < R (<= MM_Q8_PANEL); r0: a multiple of
 * MM_Q8_PANEL. The sum is q8_tile's, in the same order (so the same bits), but the panel is read
 * in its memory order, all its codes and then all its scales: one stream (rows of more than
 * Q8_SUMS_GROUPS groups take turns of that many groups' codes, then their scales). Each group's
 * integer sums wait in `sums` (in L1) until the scales come by. (On AVX-512 q8_tile's 32 rows
 * are two panels, four streams at once, which decoded minimind2's shape 15% slower; prefetching
 * ahead here was slower too: docs/kernels.md.) */
#define Q8_PANEL_VECS (MM_Q8_PANEL / Q8_LANES)
#define Q8_SUMS_GROUPS 128       /* groups of integer sums held at once (8 KB): longer rows take turns */
static ALWAYS_INLINE void q8_panel_token(float *out, const Matrix *w, int r0, int R, const int8_t *xq,
                                         const float *xs, const int32_t *xqsum) {
    int cols = w->cols, groups = cols / MM_Q8_GROUP;
    const uint8_t *panel =
        (const uint8_t *)w->data + (size_t)(r0 / MM_Q8_PANEL) * q8_panel_bytes((uint64_t)cols);
    const uint16_t *scale = (const uint16_t *)(panel + (size_t)MM_Q8_PANEL * cols);
    qi sums[Q8_SUMS_GROUPS][Q8_PANEL_VECS];  /* [group][vector of Q8_LANES rows] */
    qf acc[Q8_PANEL_VECS];
    for (int v = 0; v < Q8_PANEL_VECS; v++) acc[v] = qf_zero();
    for (int g0 = 0; g0 < groups; g0 += Q8_SUMS_GROUPS) {
        int g1 = g0 + Q8_SUMS_GROUPS < groups ? g0 + Q8_SUMS_GROUPS : groups;
        for (int g = g0; g < g1; g++) {
            qi isum[Q8_PANEL_VECS];
            for (int v = 0; v < Q8_PANEL_VECS; v++) isum[v] = qi_set1(Q8_VNNI ? xqsum[g] : 0);
            #pragma GCC unroll 8
            for (int j = 0; j < MM_Q8_GROUP / 4; j++) {
                const uint8_t *at = panel + ((size_t)g * MM_Q8_GROUP / 4 + j) * 4 * MM_Q8_PANEL;
                int32_t x4;
                memcpy(&x4, xq + g * MM_Q8_GROUP + 4 * j, 4);
                qi xb = qi_set1(x4);
                for (int v = 0; v < Q8_PANEL_VECS; v++) {
                    qi wv = qi_load(at + 4 * Q8_LANES * v);
                    isum[v] = qi_dot4(isum[v], wv, qi_unsigned(wv), xb);
                }
            }
            for (int v = 0; v < Q8_PANEL_VECS; v++) sums[g - g0][v] = isum[v];
        }
        for (int g = g0; g < g1; g++) {
            qf sx = qf_set1(xs[g]);
            for (int v = 0; v < Q8_PANEL_VECS; v++)
                acc[v] =
                    qf_fmadd_i(sums[g - g0][v],
                               qf_mul(qf_scales(scale + (size_t)g * MM_Q8_PANEL + v * Q8_LANES), sx), acc[v]);
        }
    }
    float part[MM_Q8_PANEL];
    for (int v = 0; v < Q8_PANEL_VECS; v++) qf_store(part + v * Q8_LANES, acc[v]);
    memcpy(out, part, (size_t)R * sizeof(float));
}

/* rows r0 .. r1 (r0 a multiple of Q8_BLOCK_ROWS) of out = W x for the n tokens whose codes are in
 * xq, xs, xqsum: tile by tile, each tile over every token; one token panel by panel */
static void q8_rows(float *out, const Matrix *w, const int8_t *xq, const float *xs, const int32_t *xqsum,
                    int n, int r0, int r1) {
    int cols = w->cols, groups = cols / MM_Q8_GROUP;
    if (n == 1) {
        for (int r = r0; r < r1; r += MM_Q8_PANEL)
            q8_panel_token(out + r, w, r, r1 - r < MM_Q8_PANEL ? r1 - r : MM_Q8_PANEL, xq, xs, xqsum);
        return;
    }
    for (int r = r0; r < r1; r += Q8_TILE_ROWS) {
        int R = r1 - r < Q8_TILE_ROWS ? r1 - r : Q8_TILE_ROWS, t = 0;
        for (; t + Q8_TILE_TOKENS <= n; t += Q8_TILE_TOKENS)
            q8_tile_full(out + (size_t)t * w->rows + r, w->rows, w, r, R, xq + (size_t)t * cols,
                         xs + (size_t)t * groups, xqsum + (size_t)t * groups);
        /* the tokens left, in one tile of their number (a constant: its sums stay in registers) */
#define TAIL(T) q8_tile(out + (size_t)t * w->rows + r, w->rows, w, r, R, xq + (size_t)t * cols, \
                        xs + (size_t)t * groups, xqsum + (size_t)t * groups, T)
        switch (n - t) {
        case 1: TAIL(1); break;
#if Q8_TILE_TOKENS > 2
        case 2: TAIL(2); break;
#endif
#if Q8_TILE_TOKENS > 3
        case 3: TAIL(3); break;
        case 4: TAIL(4); break;
        case 5: TAIL(5); break;
#endif
        }
#undef TAIL
    }
}

/* ---- sharing the rows between threads ---- */

/* How kernel_matmuls shares out the rows of its matrices outside prompt blocks: numbered through
 * the matrices in order, in blocks of block_rows (TILE_ROWS, or Q8_BLOCK_ROWS), each thread has a
 * contiguous share of the blocks. When the call's weights come to STEAL_MIN_BYTES or more a
 * thread, the blocks are cut into pieces of at most PIECE_BYTES of weights (or one block, if that
 * is more), and a thread that has done its own pieces takes pieces that another has not begun
 * (next_piece): two halves of a matrix need not read at one speed, and a fixed share would keep
 * the faster thread waiting. Smaller calls keep fixed shares: passing the ranges' cache lines
 * between the cores costs about a microsecond a call, about what stealing wins back there
 * (docs/kernels.md, Threads). */
#define PIECE_BYTES 65536
#define STEAL_MIN_BYTES (256 << 10)

typedef struct {
    bool q8, prompt;              /* q8_0 matrices; a prompt block (units handed out dynamically) */
    int block_rows, first_block[KERNEL_MAX_JOBS], blocks;  /* first_block[j]: matrix j's first block */
    bool steal;                   /* handed out in pieces, with stealing */
    int piece_blocks, n_pieces;   /* blocks a piece, pieces in all */
    int n_ranges;                 /* threads whose ranges of pieces are set (n_threads(): the
                                     team may be smaller, and the others take what it leaves) */
} RowShares;

static uint64_t piece_range(uint32_t next, uint32_t end) { return (uint64_t)end << 32 | next; }

static RowShares row_shares(const MatmulJob *jobs, int n_jobs, int n_tokens, int nth) {
    RowShares sh = {.q8 = jobs[0].w->dtype == MM_Q8_0, .prompt = n_tokens >= OP_MIN_TOKENS, .n_ranges = nth};
    sh.block_rows = sh.q8 ? Q8_BLOCK_ROWS : TILE_ROWS;
    for (int j = 0; j < n_jobs; j++) {
        sh.first_block[j] = sh.blocks;
        sh.blocks += (jobs[j].w->rows + sh.block_rows - 1) / sh.block_rows;
    }
    uint64_t cols = (uint64_t)jobs[0].w->cols, row_bytes = sh.q8 ? q8_panel_bytes(cols) / MM_Q8_PANEL
                                                            : cols * (jobs[0].w->dtype == MM_F32 ? 4 : 2);
    uint64_t block_bytes = row_bytes * (uint64_t)sh.block_rows;
    sh.steal = !sh.prompt && nth > 1 && block_bytes * (uint64_t)sh.blocks >= (uint64_t)STEAL_MIN_BYTES * nth;
    sh.piece_blocks = block_bytes >= PIECE_BYTES ? 1 : (int)(PIECE_BYTES / block_bytes);
    sh.n_pieces = (sh.blocks + sh.piece_blocks - 1) / sh.piece_blocks;
    return sh;
}

/* The next piece for thread id, or -1 when none is left. Each thread starts with a contiguous
 * range of pieces, about its fixed share, and takes them in order, one stream through memory;
 * once they are done it takes the last piece left in another thread's range. When the cores run
 * at one speed little moves; when one is slower (other tenants of a shared machine), the other
 * does more of the work instead of waiting for it at the end of the region. One word holds a
 * range's next and end, so that its owner (from the front) and a thief (from the back) never both
 * take the last piece. */
static int next_piece(PieceRange *ranges, int n_ranges, int id) {
    for (int k = 0; k < n_ranges; k++) {
        _Atomic uint64_t *r = &ranges[(id + k) % n_ranges].next_end;
        bool own = k == 0;
        uint64_t v = atomic_load(r);
        for (;;) {
            uint32_t next = (uint32_t)v, end = (uint32_t)(v >> 32);
            if (next >= end) break;
            if (atomic_compare_exchange_weak(r, &v,
                                             own ? piece_range(next + 1, end) : piece_range(next, end - 1)))
                return (int)(own ? next : end - 1);
        }
    }
    return -1;
}

/* the job (matrix) that block b of a call (RowShares' numbering) lies in, and *r0 its first row */
static ALWAYS_INLINE int block_job(const RowShares *sh, int n_jobs, int b, int *r0) {
    int j = n_jobs - 1;
    while (b < sh->first_block[j]) j--;
    *r0 = (b - sh->first_block[j]) * sh->block_rows;
    return j;
}

/* blocks b0 .. b1 of a call (RowShares' numbering), columns k0 .. in chunks of `chunk` */
static ALWAYS_INLINE void matmul_blocks(const MatmulJob *jobs, int n_jobs, const float *x, int n,
                                        const KernelScratch *ks, const RowShares *sh, int b0, int b1,
                                        int chunk) {
    int cols = jobs[0].w->cols, r0;
    if (n == 1 && b0 < b1 && (jobs[0].w->dtype == MM_F16 || jobs[0].w->dtype == MM_BF16)) {
        /* a token's f16 and bf16 rows prefetch HALF_ROWS_AHEAD (dot_row): the range's first bytes,
         * which no row before it prefetched, before its first row */
        int j = block_job(sh, n_jobs, b0, &r0);
        const uint8_t *start = (const uint8_t *)jobs[j].w->data + (size_t)r0 * cols * 2;
        for (size_t b = 0; b < HALF_ROWS_AHEAD; b += 64) prefetch_weights(start + b);
    }
    for (int k0 = 0; k0 < cols; k0 += chunk)
        for (int b = b0; b < b1; b++) {
            int j = block_job(sh, n_jobs, b, &r0);
            const Matrix *w = jobs[j].w;
            int R = w->rows - r0 < sh->block_rows ? w->rows - r0 : sh->block_rows;
            if (sh->q8) {
                q8_rows(jobs[j].out, w, ks->xq, ks->xs, ks->xqsum, n, r0, r0 + R);
                continue;
            }
            int kc = cols - k0 < chunk ? cols - k0 : chunk;
            const uint8_t *w0 =
                (const uint8_t *)w->data + ((size_t)r0 * cols + k0) * (w->dtype == MM_F32 ? 4 : 2);
            /* one instance per dtype, so that the weight loads are decided at compile time */
            if (w->dtype == MM_F32)
                dot_tiles(jobs[j].out, w->rows, x + k0, cols, n, MM_F32, w0, cols, kc, r0, R, k0 > 0);
            else if (w->dtype == MM_F16)
                dot_tiles(jobs[j].out, w->rows, x + k0, cols, n, MM_F16, w0, cols, kc, r0, R, k0 > 0);
            else dot_tiles(jobs[j].out, w->rows, x + k0, cols, n, MM_BF16, w0, cols, kc, r0, R, k0 > 0);
        }
}

/* thread id's part (of nth) of a kernel_matmuls call */
static void matmul_share(const MatmulJob *jobs, int n_jobs, const float *x, int n, KernelScratch *ks,
                         const RowShares *sh, int id, int nth) {
    if (sh->prompt) {  /* units of a few tiles, handed out as threads come free */
        int ldxT = (int)xT_width((size_t)n), unit_rows = 4 * (sh->q8 ? Q8_TILE_ROWS : OP_ROWS);
        int first_unit[KERNEL_MAX_JOBS], units = 0;
        for (int j = 0; j < n_jobs; j++)
            first_unit[j] = units, units += (jobs[j].w->rows + unit_rows - 1) / unit_rows;
        float *strip = ks->strips + (size_t)id * ks->strip_len;
        #pragma omp for schedule(dynamic, 1) nowait
        for (int u = 0; u < units; u++) {
            int j = n_jobs - 1;
            while (u < first_unit[j]) j--;
            int r0 = (u - first_unit[j]) * unit_rows, rows = jobs[j].w->rows;
            int r1 = r0 + unit_rows < rows ? r0 + unit_rows : rows;
            if (sh->q8) q8_rows(jobs[j].out, jobs[j].w, ks->xq, ks->xs, ks->xqsum, n, r0, r1);
            else op_rows(jobs[j].out, jobs[j].w, ks->xT, ldxT, n, r0, r1, strip);
        }
        return;
    }
    /* 2-15 tokens of f32 activations take the columns K_CHUNK at a time, all of a share's (or a
     * piece's) rows for each chunk: every token's chunk of x stays in the L2 cache while the
     * weights stream past it once. One token reads whole rows, in order. */
    int chunk = !sh->q8 && n > 1 ? K_CHUNK : jobs[0].w->cols;
    if (!sh->steal) {
        matmul_blocks(jobs, n_jobs, x, n, ks, sh, (int)((long)sh->blocks * id / nth),
                      (int)((long)sh->blocks * (id + 1) / nth), chunk);
        return;
    }
    for (int p; (p = next_piece(ks->ranges, sh->n_ranges, id)) >= 0;) {
        int b0 = p * sh->piece_blocks,
            b1 = b0 + sh->piece_blocks < sh->blocks ? b0 + sh->piece_blocks : sh->blocks;
        matmul_blocks(jobs, n_jobs, x, n, ks, sh, b0, b1, chunk);
    }
}

/* a kernel_matmuls call, as the team's threads take it (team_work) */
typedef struct {
    const MatmulJob *jobs;
    int n_jobs;
    const float *x;
    int n;
    KernelScratch *ks;
    const RowShares *sh;
} MatmulCall;

static void matmul_work(void *arg, int id, int nth) {
    const MatmulCall *c = arg;
    matmul_share(c->jobs, c->n_jobs, c->x, c->n, c->ks, c->sh, id, nth);
}

/* the codes of token t's activations for the q8_0 tiles: ks->xq and ks->xs and, where the tiles
 * multiply w + 128 (Q8_VNNI), minus 128 x each group's sum of codes (ks->xqsum) */
static void quantize_token(KernelScratch *ks, const float *x, int t, int cols) {
    int groups = cols / MM_Q8_GROUP;
    int8_t *xq = ks->xq + (size_t)t * cols;
    quantize_q8_fast(xq, ks->xs + (size_t)t * groups, x + (size_t)t * cols, cols);
    for (int g = 0; Q8_VNNI && g < groups; g++) {
        int32_t sum = 0;
        for (int i = 0; i < MM_Q8_GROUP; i++) sum += xq[g * MM_Q8_GROUP + i];
        ks->xqsum[(size_t)t * groups + g] = -128 * sum;
    }
}

/* The matrices of one call read the same x (q, k, v; gate, up): one parallel region over all
 * their rows, so one fork and join of the threads, and x quantised (q8_0) or transposed (prompt
 * blocks) once for all. At one thread nothing enters OpenMP, nor does a few tokens' quantisation
 * at any count: libgomp forks and joins a region even for one thread or a false if clause, about
 * a microsecond each, and a decoded token passes some 80 calls. */
static void kernel_matmuls(const MatmulJob *jobs, int n_jobs, const float *x, int n_tokens,
                           KernelScratch *ks) {
    int cols = jobs[0].w->cols, nth = n_threads();
    RowShares sh = row_shares(jobs, n_jobs, n_tokens, nth);
    if (sh.q8 && !sh.prompt)
        for (int t = 0; t < n_tokens; t++) quantize_token(ks, x, t, cols);
    else if (sh.q8) {
        #pragma omp parallel for
        for (int t = 0; t < n_tokens; t++) quantize_token(ks, x, t, cols);
    } else if (sh.prompt) {
        int ldxT = (int)xT_width((size_t)n_tokens);
        #pragma omp parallel for
        for (int k = 0; k < cols; k++)
            for (int t = 0; t < ldxT; t++)
                ks->xT[(size_t)k * ldxT + t] = t < n_tokens ? x[(size_t)t * cols + k] : 0.0f;
    }
    for (int t = 0; sh.steal && t < nth; t++)
        atomic_store(&ks->ranges[t].next_end, piece_range((uint32_t)((long)sh.n_pieces * t / nth),
                                                          (uint32_t)((long)sh.n_pieces * (t + 1) / nth)));
    if (nth == 1) {
        matmul_share(jobs, n_jobs, x, n_tokens, ks, &sh, 0, 1);
        return;
    }
    if (team.size > 1 && !sh.prompt) {  /* a decoded token's team is waiting (kernels.h) */
        MatmulCall call = {jobs, n_jobs, x, n_tokens, ks, &sh};
        team_work(matmul_work, &call);
        return;
    }
    #pragma omp parallel
    matmul_share(jobs, n_jobs, x, n_tokens, ks, &sh, thread_id(), team_size());
}

/* ---- SwiGLU's product ---- */

static void swiglu_row(float *gate, const float *up, int n) {
    int i = 0;
    for (; i + VL <= n; i += VL) {  /* exp(-x) clamped to [e^-87, e^89]: silu is then x or -0 */
        vf x = vf_load(gate + i),
           e = vf_exp(vf_min(vf_max(vf_sub(vf_zero(), x), vf_set1(-87.0f)), vf_set1(89.0f)));
        vf_store(gate + i, vf_mul(vf_div(x, vf_add(vf_set1(1.0f), e)), vf_load(up + i)));
    }
    for (; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

static void kernel_swiglu(float *gate, const float *up, int n, int hidden) {
    if (n == 1) {  /* (no parallel region for one row: see kernel_matmuls) */
        swiglu_row(gate, up, hidden);
        return;
    }
    #pragma omp parallel for
    for (int t = 0; t < n; t++) swiglu_row(gate + (size_t)t * hidden, up + (size_t)t * hidden, hidden);
}

static int kernel_row_widths(int bits[2]) {
    bits[0] = VL * 32;
#ifdef HAVE_HALVES
    bits[1] = VL * 16;
    return 2;
#else
    return 1;
#endif
}

/* whole vectors, but 256-bit halves of them on AMD Zen 4 (docs/kernels.md has the measurements) */
static void kernel_set_row_bits(int bits) {
#ifdef HAVE_HALVES
    rows_in_halves = bits == 0 ? amd_zen4() : bits == VL * 16;
#else
    (void)bits;
#endif
}

static int kernel_row_bits(void) { return rows_in_halves ? VL * 16 : VL * 32; }

#else  /* a build without the kernels: run.c never calls these */
static int kernel_row_widths(int bits[2]) {
    (void)bits;
    return 0;
}
static void kernel_set_row_bits(int bits) { (void)bits; }
static int kernel_row_bits(void) { return 0; }
static void kernel_matmuls(const MatmulJob *jobs, int n_jobs, const float *x, int n_tokens,
                           KernelScratch *ks) {
    (void)jobs, (void)n_jobs, (void)x, (void)n_tokens, (void)ks;
    abort();
}
static void kernel_swiglu(float *gate, const float *up, int n, int hidden) {
    (void)gate, (void)up, (void)n, (void)hidden;
    abort();
}
#endif

/* ---- the kernels' scratch (kernels.h): one block of memory, each buffer on a cache line ---- */

#if KERNELS_BUILT
static const char *const KERNELS = KERNELS_NAME;
#else
static const char *const KERNELS = "none";
#endif

/* KernelScratch's buffers, in order: their bytes for these shapes (whole cache lines; none in a
 * build without the kernels) and the lengths kept in the struct */
enum { N_SCRATCH = 7 };
static void scratch_layout(size_t bytes[N_SCRATCH], int *strip_len, size_t *att_len, int max_tokens,
                           int max_cols, int group, int head_dim, int threads) {
    memset(bytes, 0, N_SCRATCH * sizeof *bytes);
    *strip_len = 0, *att_len = 0;
#if KERNELS_BUILT
    size_t T = (size_t)max_tokens, cols = (size_t)max_cols, groups = cols / MM_Q8_GROUP + 1;
    *strip_len = OP_ROWS * max_cols;
    *att_len = attention_buf_len(group, head_dim);
    bytes[0] = (size_t)threads * (size_t)*strip_len * sizeof(float);  /* strips */
    bytes[1] = cols * xT_width(T) * sizeof(float);                     /* xT */
    bytes[2] = T * cols;                                               /* xq */
    bytes[3] = T * groups * sizeof(float);                             /* xs */
    bytes[4] = T * groups * sizeof(int32_t);                           /* xqsum */
    bytes[5] = (size_t)threads * sizeof(PieceRange);                   /* ranges */
    bytes[6] = (size_t)threads * *att_len * sizeof(float);             /* att */
    for (int i = 0; i < N_SCRATCH; i++) bytes[i] = (bytes[i] + 63) / 64 * 64;
#else
    (void)max_tokens, (void)max_cols, (void)group, (void)head_dim, (void)threads;
#endif
}

static size_t kernel_scratch_bytes(int max_tokens, int max_cols, int group, int head_dim, int threads) {
    size_t bytes[N_SCRATCH], total = 0, att_len;
    int strip_len;
    scratch_layout(bytes, &strip_len, &att_len, max_tokens, max_cols, group, head_dim, threads);
    for (int i = 0; i < N_SCRATCH; i++) total += bytes[i];
    return total;
}

/* memory: kernel_scratch_bytes() zeroed bytes, on a cache line */
static void kernel_scratch_init(KernelScratch *ks, void *memory, int max_tokens, int max_cols, int group,
                                int head_dim, int threads) {
    size_t bytes[N_SCRATCH], att_len;
    int strip_len;
    scratch_layout(bytes, &strip_len, &att_len, max_tokens, max_cols, group, head_dim, threads);
    uint8_t *p = memory, *at[N_SCRATCH];
    for (int i = 0; i < N_SCRATCH; i++) at[i] = p, p += bytes[i];
    *ks = (KernelScratch){.strips = (float *)at[0], .strip_len = strip_len, .xT = (float *)at[1],
                          .xq = (int8_t *)at[2], .xs = (float *)at[3], .xqsum = (int32_t *)at[4],
                          .ranges = (PieceRange *)at[5], .att = (float *)at[6], .att_len = att_len};
}
