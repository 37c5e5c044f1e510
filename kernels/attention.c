/* kernels/attention.c: attention over the KV cache, fast (kernel_attention); and the kernels'
 * scratch. run.c's plain loop is the reference: for each token and query head, the scores
 * q . k_t / sqrt(head_dim) for every position t up to its own, their softmax, and the sum of the
 * values weighted by it.
 *
 * Here all the query heads that share a kv head go together, for a run of up to ATT_TOKENS tokens,
 * over the keys in tiles of KV_TILE positions. Each key and value row is read once for every query
 * that sees it (not once per query head), the scores of a tile are a small matrix product, and the
 * softmax runs online: a running max and sum per query, the partial output rescaled when the max
 * grows, so the scores never outgrow a tile (flash attention).
 */
#include "vector.h"

#if KERNELS_BUILT

#define KV_TILE 128     /* key positions per tile (a multiple of KEY_BLOCK) */
#define ATT_TOKENS 16   /* tokens per unit of attention work (with all heads of one kv head) */
#define KV_AHEAD 64     /* the caches are prefetched this many positions ahead */
_Static_assert(KV_TILE % KEY_BLOCK == 0 && KV_AHEAD % KEY_BLOCK == 0 && KV_PAGE % KV_TILE == 0,
               "tiles and prefetches are whole key blocks, and a tile lies in one page of the cache");

/* S[j * ldS + t] = q_j . k_t * scale for j < J queries (rows of hd from q) and the B blocks of
 * KEY_BLOCK keys from kb (each [hd][KEY_BLOCK], `block` bytes; J B <= SCORE_QUERIES): lanes are
 * keys, each q_j[d] broadcast, every score one chain of FMAs over d in order. The n_ahead blocks
 * from `ahead` are prefetched, 64-byte line d of each while d runs. */
static ALWAYS_INLINE void scores_tile(float *S, int ldS, const float *q, const void *kb, size_t block,
                                      int kv_dtype, int hd, float scale, const void *ahead, int n_ahead,
                                      const int J, const int B) {
    enum { U = KEY_BLOCK / VL };  /* vectors per block row */
    vf acc[SCORE_QUERIES][U];     /* [j * B + b][u] */
    for (int i = 0; i < J * B; i++)
        for (int u = 0; u < U; u++) acc[i][u] = vf_zero();
    for (int d = 0; d < hd; d++) {
        if ((size_t)d * 64 < block)
            for (int b = 0; b < n_ahead; b++) prefetch((const uint8_t *)ahead + b * block + (size_t)d * 64);
        for (int b = 0; b < B; b++)
            for (int u = 0; u < U; u++) {
                vf k = vf_keep(load_w(kv_dtype, (const uint8_t *)kb + b * block,
                                      (size_t)d * KEY_BLOCK + (size_t)u * VL));
                for (int j = 0; j < J; j++)
                    acc[j * B + b][u] = vf_fmadd(vf_set1(q[(size_t)j * hd + d]), k, acc[j * B + b][u]);
            }
    }
    for (int j = 0; j < J; j++)
        for (int b = 0; b < B; b++)
            for (int u = 0; u < U; u++)
                vf_store(S + (size_t)j * ldS + b * KEY_BLOCK + u * VL,
                         vf_mul(acc[j * B + b][u], vf_set1(scale)));
}

/* the blocks [b0, b1) of keys from k for J queries, B blocks per tile (the last ones one by one),
 * prefetching KV_AHEAD positions ahead those of the first prefetch_blocks */
static ALWAYS_INLINE void scores_blocks(float *S, int ldS, const float *q, const void *k, int kv_dtype,
                                        int hd, int b0, int b1, int prefetch_blocks, float scale, const int J,
                                        const int B) {
    size_t block = (size_t)hd * KEY_BLOCK * kv_elem_size(kv_dtype);
    for (int b = b0; b < b1;) {
        int n = b1 - b >= B ? B : 1, a = b + KV_AHEAD / KEY_BLOCK;
        int n_ahead = prefetch_blocks - a;  /* of the n blocks at a, those that may be prefetched */
        n_ahead = n_ahead < 0 ? 0 : n_ahead > n ? n : n_ahead;
        const uint8_t *kb = (const uint8_t *)k + (size_t)b * block,
                      *ahead = n_ahead ? (const uint8_t *)k + (size_t)a * block : kb;
        if (n == B)
            scores_tile(S + (size_t)b * KEY_BLOCK, ldS, q, kb, block, kv_dtype, hd, scale, ahead, n_ahead, J,
                        B);
        else
            scores_tile(S + (size_t)b * KEY_BLOCK, ldS, q, kb, block, kv_dtype, hd, scale, ahead, n_ahead, J,
                        1);
        b += n;
    }
}

/* every block of keys that holds one of the first n_keys (the scores past n_keys are computed too,
 * from the cache's zeros or older positions, and never read); n_prefetch: the positions from k on
 * that the cache holds and may be prefetched (0: none). A token's queries are a kv head's group of
 * heads (2 or 4 in MiniMind): with fewer than SCORE_QUERIES, a tile takes several blocks at once,
 * so that 8 or more chains of FMAs hide each other's latency (not 2 or 4). And the cache is prefetched
 * KV_AHEAD positions ahead: without it, each tile's keys and values waited on memory (the layer's
 * weights, read in between, had pushed them out of every cache). */
static ALWAYS_INLINE void scores_of_queries(float *S, int ldS, const float *q, int nq, const void *k,
                                                int kv_dtype, int hd, int n_keys, int n_prefetch,
                                                float scale) {
    int blocks = (n_keys + KEY_BLOCK - 1) / KEY_BLOCK,
        prefetch_blocks = (n_prefetch + KEY_BLOCK - 1) / KEY_BLOCK;
/* CALL(J) for J = n, a constant in each case (n < SCORE_QUERIES): the tiles' registers need it */
#if SCORE_QUERIES > 4
#define BY_QUERIES(n, CALL) \
    switch (n) {            \
    case 1: CALL(1); break; \
    case 2: CALL(2); break; \
    case 3: CALL(3); break; \
    case 4: CALL(4); break; \
    case 5: CALL(5); break; \
    case 6: CALL(6); break; \
    case 7: CALL(7); break; \
    }
#else
#define BY_QUERIES(n, CALL) \
    switch (n) {            \
    case 1: CALL(1); break; \
    case 2: CALL(2); break; \
    case 3: CALL(3); break; \
    }
#endif
    if (nq < SCORE_QUERIES) {
#define FEW(J) \
    scores_blocks(S, ldS, q, k, kv_dtype, hd, 0, blocks, prefetch_blocks, scale, J, SCORE_QUERIES / J)
        BY_QUERIES(nq, FEW)
#undef FEW
        return;
    }
    for (int b = 0; b < blocks; b++) {  /* a block at a time, read once for all the queries */
        int j = 0;
#define QUERIES(J) scores_blocks(S + (size_t)j * ldS, ldS, q + (size_t)j * hd, k, kv_dtype, hd, b, b + 1, \
                                j ? 0 : prefetch_blocks, scale, J, 1)  /* (the first queries prefetch) */
        for (; j + SCORE_QUERIES <= nq; j += SCORE_QUERIES) QUERIES(SCORE_QUERIES);
        BY_QUERIES(nq - j, QUERIES)  /* the queries left, in one tile */
#undef QUERIES
    }
#undef BY_QUERIES
}

/* the largest of m and x[0..n) (the same value in any order: max is exact) */
static float max_of(const float *x, int n, float m) {
    int i = 0;
    if (n >= VL) {
        vf acc = vf_set1(m);
        for (; i + VL <= n; i += VL) acc = vf_max(acc, vf_load(x + i));
        m = vf_hmax(acc);
    }
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* x[i] = exp(x[i] - m) for i < n (every x[i] <= m); returns their sum */
static float exp_shifted(float *x, int n, float m) {
    float sum = 0;
    int i = 0;
    vf acc = vf_zero();
    for (; i + VL <= n; i += VL) {
        vf y = vf_exp(vf_max(vf_sub(vf_load(x + i), vf_set1(m)), vf_set1(-87.0f)));
        vf_store(x + i, y);
        acc = vf_add(acc, y);
    }
    sum = vf_hsum(acc);
    for (; i < n; i++) { x[i] = expf(x[i] - m); sum += x[i]; }
    return sum;
}

/* O[r, 0..C VL) += sum over t < nt of P[r, t] v_t[0..C VL) for r < R: C vectors of columns of R
 * rows in registers, the columns of row t + KV_AHEAD prefetched while that is one of n_prefetch */
static ALWAYS_INLINE void pv_tile(float *O, int ldo, const float *P, const void *v, int kv_dtype, int hd,
                                  int nt, int n_prefetch, const int R, const int C) {
    size_t elem = kv_elem_size(kv_dtype);
    vf acc[4][PV_VECS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = vf_load(O + (size_t)r * ldo + VL * c);
    for (int t = 0; t < nt; t++) {
        const uint8_t *vt = (const uint8_t *)v + (size_t)t * hd * elem;
        if (t + KV_AHEAD < n_prefetch)
            for (size_t b = 0; b < C * VL * elem; b += 64) prefetch(vt + (size_t)KV_AHEAD * hd * elem + b);
        vf vc[PV_VECS];
        for (int c = 0; c < C; c++) vc[c] = vf_keep(load_w(kv_dtype, vt, (size_t)c * VL));
        for (int r = 0; r < R; r++) {
            vf p = vf_set1(P[(size_t)r * KV_TILE + t]);
            for (int c = 0; c < C; c++) acc[r][c] = vf_fmadd(p, vc[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) vf_store(O + (size_t)r * ldo + VL * c, acc[r][c]);
}

/* pv_tile for R rows and C vectors known only at run time: one instance each (registers need
 * constants) */
static void pv_tiles(float *O, int ldo, const float *P, const void *v, int kv_dtype, int hd, int nt,
                     int n_prefetch, int R, int C) {
#define PV(DT, RR, CC) pv_tile(O, ldo, P, v, DT, hd, nt, n_prefetch, RR, CC)
#define PV_ROWS(DT, CC) switch (R) { case 1: PV(DT, 1, CC); break; case 2: PV(DT, 2, CC); break; \
                                     case 3: PV(DT, 3, CC); break; default: PV(DT, 4, CC); break; }
#if PV_VECS > 2
#define PV_COLS(DT) switch (C) { case 1: PV_ROWS(DT, 1) break; case 2: PV_ROWS(DT, 2) break; \
                                 case 3: PV_ROWS(DT, 3) break; case 4: PV_ROWS(DT, 4) break; \
                                 case 5: PV_ROWS(DT, 5) break; default: PV_ROWS(DT, 6) break; }
#else
#define PV_COLS(DT) switch (C) { case 1: PV_ROWS(DT, 1) break; default: PV_ROWS(DT, 2) break; }
#endif
    if (kv_dtype == MM_F32) PV_COLS(MM_F32)
    else PV_COLS(MM_F16)
#undef PV_COLS
#undef PV_ROWS
#undef PV
}

/* O[r, :] += sum over t < nt of P[r, t] v_t for rows r < nr (P rows KV_TILE apart, O rows hd
 * apart): up to 4 rows x PV_VECS vectors of columns of O in registers over all t, any columns left
 * one by one; v_t: the cache rows from v, of which n_prefetch may be prefetched (0: none) */
static void attention_pv(float *O, const float *P, int nr, const void *v, int kv_dtype, int hd, int nt,
                         int n_prefetch) {
    int d = 0;
    size_t elem = kv_elem_size(kv_dtype);
    for (int C; d + VL <= hd; d += C * VL) {
        C = (hd - d) / VL < PV_VECS ? (hd - d) / VL : PV_VECS;
        for (int r0 = 0; r0 < nr; r0 += 4)  /* (the first rows prefetch) */
            pv_tiles(O + (size_t)r0 * hd + d, hd, P + (size_t)r0 * KV_TILE,
                     (const uint8_t *)v + (size_t)d * elem, kv_dtype, hd, nt, r0 ? 0 : n_prefetch,
                     nr - r0 < 4 ? nr - r0 : 4, C);
    }
    for (int t = 0; d < hd && t < nt; t++) {
        const uint8_t *vt = (const uint8_t *)v + (size_t)t * hd * elem;
        for (int r = 0; r < nr; r++) {
            float p = P[(size_t)r * KV_TILE + t], *o = O + (size_t)r * hd;
            for (int c = d; c < hd; c++) o[c] += p * load1(kv_dtype, vt, (size_t)c);
        }
    }
}

/* S[j * ldS + t] = q_j . k_t * scale for queries j < nq (rows of head_dim from q) and keys
 * t < n_keys (from k, the start of a block of KEY_BLOCK keys, of which n_prefetch may be
 * prefetched, 0: none; S rows hold whole blocks) */
static void attention_scores(float *S, int ldS, const float *q, int nq, const void *k, int kv_dtype,
                             int hd, int n_keys, int n_prefetch, float scale) {
    if (kv_dtype == MM_F32) scores_of_queries(S, ldS, q, nq, k, MM_F32, hd, n_keys, n_prefetch, scale);
    else scores_of_queries(S, ldS, q, nq, k, MM_F16, hd, n_keys, n_prefetch, scale);
}

/* scratch of one attention_group: scores S [group ATT_TOKENS, KV_TILE], outputs O [group
 * ATT_TOKENS, head_dim], running max and sum [group ATT_TOKENS] each */
static size_t attention_buf_len(int group, int hd) {
    size_t nq = (size_t)ATT_TOKENS * group;
    return nq * KV_TILE + nq * hd + 2 * nq;
}

/* Tokens pos0 .. pos0+n-1 (n <= ATT_TOKENS), the query heads of kv head g: from q into out (rows
 * [n, n_heads * head_dim], this group's heads at g * group * head_dim); buf: [attention_buf_len] */
static void attention_group(float *out, const float *q, int n, int pos0, const KvLayer *c, int g,
                            float *buf) {
    int group = c->group, hd = c->head_dim, q_dim = c->n_kv_heads * group * hd, nq = n * group;
    float *S = buf, *O = S + (size_t)nq * KV_TILE, *mx = O + (size_t)nq * hd, *sum = mx + nq;
    float scale = 1.0f / sqrtf((float)hd);
    for (int r = 0; r < nq; r++) mx[r] = -INFINITY, sum[r] = 0;
    memset(O, 0, sizeof(float) * (size_t)nq * hd);
    int last = pos0 + n - 1;
    for (int t0 = 0; t0 <= last; t0 += KV_TILE) {
        int nt = last + 1 - t0 < KV_TILE ? last + 1 - t0 : KV_TILE;
        /* the positions from t0 on, to the end of its page: the run's first token prefetches them */
        int page_end = (t0 / KV_PAGE + 1) * KV_PAGE;
        int n_prefetch = (last + 1 < page_end ? last + 1 : page_end) - t0;
        /* position t0 of either cache (the start of a key block; the tile lies in one page) */
        const uint8_t *k = kv_keys(c, g, t0), *v = kv_values(c, g, t0);
        if (t0 + KV_TILE == page_end && page_end <= last) {  /* the next page's first positions */
            size_t bytes = (size_t)KV_AHEAD * hd * kv_elem_size(c->dtype);
            const uint8_t *nk = kv_keys(c, g, page_end), *nv = kv_values(c, g, page_end);
            for (size_t b = 0; b < bytes; b += 64) {
                prefetch(nk + b);
                prefetch(nv + b);
            }
        }
        for (int i = 0; i < n; i++) {  /* token i sees keys up to its own position */
            int see = pos0 + i - t0 + 1 < nt ? pos0 + i - t0 + 1 : nt;
            if (see <= 0) continue;
            const float *q_i = q + (size_t)i * q_dim + (size_t)g * group * hd;
            float *Si = S + (size_t)i * group * KV_TILE;
            attention_scores(Si, KV_TILE, q_i, group, k, c->dtype, hd, see, i ? 0 : n_prefetch, scale);
            for (int j = 0; j < group; j++) {  /* online softmax: rescale what came before */
                int r = i * group + j;
                float *sr = Si + (size_t)j * KV_TILE, m = max_of(sr, see, mx[r]);
                float corr = expf(mx[r] - m);
                sum[r] = sum[r] * corr + exp_shifted(sr, see, m);
                mx[r] = m;
                if (corr != 1.0f)
                    for (int d = 0; d < hd; d++) O[(size_t)r * hd + d] *= corr;
            }
        }
        for (int i = 0; i < n; i++) {  /* O += P . V, each token's heads together over its keys */
            int see = pos0 + i - t0 + 1 < nt ? pos0 + i - t0 + 1 : nt;
            if (see > 0)
                attention_pv(O + (size_t)i * group * hd, S + (size_t)i * group * KV_TILE, group, v, c->dtype,
                             hd, see, i ? 0 : n_prefetch);
        }
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < group; j++) {
            int r = i * group + j;
            float inv = 1.0f / sum[r], *o = out + (size_t)i * q_dim + ((size_t)g * group + j) * hd;
            for (int d = 0; d < hd; d++) o[d] = O[(size_t)r * hd + d] * inv;
        }
}

/* unit u of a kernel_attention call (below), on thread id */
static void attention_unit(float *out, const float *q, int n, int pos0, const KvLayer *c, KernelScratch *ks,
                           int u, int id) {
    int q_dim = c->n_kv_heads * c->group * c->head_dim;
    int t0 = u / c->n_kv_heads * ATT_TOKENS, len = n - t0 < ATT_TOKENS ? n - t0 : ATT_TOKENS;
    attention_group(out + (size_t)t0 * q_dim, q + (size_t)t0 * q_dim, len, pos0 + t0, c, u % c->n_kv_heads,
                    ks->att + (size_t)id * ks->att_len);
}

/* a kernel_attention call as a decoded token's team takes it (team_work): units as threads come
 * free */
typedef struct {
    float *out;
    const float *q;
    int n, pos0;
    const KvLayer *c;
    KernelScratch *ks;
    int units;
    _Atomic int next;           /* the next unit not taken */
} AttentionCall;

static void attention_work(void *arg, int id, int nth) {
    AttentionCall *a = arg;
    (void)nth;
    for (int u; (u = atomic_fetch_add(&a->next, 1)) < a->units;)
        attention_unit(a->out, a->q, a->n, a->pos0, a->c, a->ks, u, id);
}

/* Units of work: one kv head with its query heads, for a run of up to ATT_TOKENS tokens; handed
 * out as threads come free (a plain loop at one thread: see kernel_matmuls) */
static void kernel_attention(float *out, const float *q, int n, int pos0, const KvLayer *c,
                             KernelScratch *ks) {
    int units = (n + ATT_TOKENS - 1) / ATT_TOKENS * c->n_kv_heads;
    if (n_threads() == 1)
        for (int u = 0; u < units; u++) attention_unit(out, q, n, pos0, c, ks, u, 0);
    else if (team.size > 1) {  /* a decoded token's team is waiting (kernels.h) */
        AttentionCall call = {out, q, n, pos0, c, ks, units, 0};
        team_work(attention_work, &call);
    } else {
        #pragma omp parallel for schedule(dynamic, 1)
        for (int u = 0; u < units; u++) attention_unit(out, q, n, pos0, c, ks, u, thread_id());
    }
}

#else  /* a build without the kernels: run.c never calls this */
static void kernel_attention(float *out, const float *q, int n, int pos0, const KvLayer *c,
                             KernelScratch *ks) {
    (void)out, (void)q, (void)n, (void)pos0, (void)c, (void)ks;
    abort();
}
#endif
