/* kernel_test.c: every fast kernel (kernels/) against run.c's plain loop at its plug point, on
 * random inputs of awkward sizes (rows, columns and token counts that are not multiples of the
 * vector width, the register tile or the q8_0 group), with 1 and 2 threads.
 *
 *   kernel_test            one line per check: "PASS name (detail)" or "FAIL name: detail"
 *
 * tests/run_tests.py runs it (the normal, sanitizer, AVX2, AVX-VNNI and NEON builds). The
 * quantiser's check is trivial on NEON, which quantises with the plain quantize_q8.
 */
#define MINIMIND_NO_MAIN
#include "../run.c"
#if !KERNELS_BUILT
#error "kernel_test needs the fast kernels: build it for AVX2, AVX-512 or NEON"
#endif

static int failures = 0;
static uint64_t rng = 0x9E3779B97F4A7C15ull;

static float frand(void) { return random_f32(&rng) * 2.0f - 1.0f; }

static void check(bool ok, const char *name, const char *fmt, ...) {
    char detail[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    printf(ok ? "PASS %s (%s)\n" : "FAIL %s: %s\n", name, detail);
    failures += !ok;
}

static void set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

/* A random [rows, cols] matrix stored as dtype; *dense gets the f32 values it stands for. */
static Matrix random_matrix(int dtype, int rows, int cols, void **storage) {
    size_t n = (size_t)rows * cols;
    float *f = xcalloc(n, sizeof(float), "test");
    for (size_t i = 0; i < n; i++) f[i] = frand();
    Matrix w = {.dtype = dtype, .rows = rows, .cols = cols};
    if (dtype == MM_F32) {
        w.data = *storage = f;
        return w;
    }
    if (dtype == MM_Q8_0) {  /* quantised by rows, then laid out in panels as export.py does */
        int groups = cols / MM_Q8_GROUP;
        int8_t *codes = xcalloc(n, 1, "test");
        float *scales = xcalloc(n / MM_Q8_GROUP, sizeof(float), "test");
        quantize_q8(codes, scales, f, (int)n);  /* rows are whole groups */
        size_t panel_bytes = q8_panel_bytes((uint64_t)cols);
        uint8_t *q = xcalloc(tensor_bytes(MM_Q8_0, (uint64_t)rows, (uint64_t)cols), 1, "test");
        for (int r = 0; r < rows; r++) {
            uint8_t *panel = q + (size_t)(r / MM_Q8_PANEL) * panel_bytes;
            int i = r % MM_Q8_PANEL;
            for (int c = 0; c < cols; c++)
                panel[(size_t)(c / 4) * 4 * MM_Q8_PANEL + 4 * i + c % 4] =
                    (uint8_t)codes[(size_t)r * cols + c];
            for (int g = 0; g < groups; g++) {
                uint16_t h = f32_to_f16(scales[(size_t)r * groups + g]);
                memcpy(panel + (size_t)MM_Q8_PANEL * cols + 2 * ((size_t)g * MM_Q8_PANEL + i), &h, 2);
            }
        }
        free(codes);
        free(scales);
        w.data = *storage = q;
    } else {
        uint16_t *h = xcalloc(n, 2, "test");
        for (size_t i = 0; i < n; i++) {
            uint32_t bits;
            memcpy(&bits, &f[i], 4);
            h[i] = dtype == MM_F16 ? f32_to_f16(f[i]) : (uint16_t)(bits >> 16);
        }
        w.data = *storage = h;
    }
    free(f);
    return w;
}

/* a run state as run.c makes it (state_init), for blocks of n tokens of x with `cols` columns,
 * or for attention with n_kv_heads x group heads of head_dim over ctx positions; sized for two
 * threads */
static State test_state(int n, int cols, int n_kv_heads, int group, int hd, int ctx, int kv_dtype, Model *m) {
    *m = (Model){.cfg = {.dim = (uint32_t)cols, .n_layers = 1, .n_heads = (uint32_t)(n_kv_heads * group),
                         .n_kv_heads = (uint32_t)n_kv_heads, .head_dim = (uint32_t)hd, .hidden_dim = 1,
                         .vocab_size = 1, .max_seq_len = (uint32_t)ctx}};
    Rope rope = {.scaling = MM_ROPE_NONE, .theta = 10000.0f};
    State s;
    set_threads(2);
    state_init(&s, m, n, ctx, &rope, kv_dtype, false);
    return s;
}

/* fast vs reference matmul: each element within 1e-5 of the sum of |w x| (f32 rounding of a
 * different summation order); 1 and 2 threads bit-identical */
static void test_matmul(int dtype, int rows, int cols, int n, bool in_pieces) {
    void *storage;
    Matrix w = random_matrix(dtype, rows, cols, &storage);
    float *x = xcalloc((size_t)n * cols, sizeof(float), "test");
    for (size_t i = 0; i < (size_t)n * cols; i++) x[i] = frand();
    size_t out_n = (size_t)n * rows;
    float *ref = xcalloc(out_n, sizeof(float), "test"), *fast = xcalloc(out_n, sizeof(float), "test");
    float *fast2 = xcalloc(out_n, sizeof(float), "test");
    Model m;
    State s = test_state(n > 1 ? n : 2, cols, 1, 1, 2, 16, MM_F32, &m);  /* (2: the tile of 2 below) */
    set_threads(1);
    reference_kernels = true;
    matmul(&s, ref, x, &w, n);
    reference_kernels = false;
    matmul(&s, fast, x, &w, n);
    set_threads(2);
    matmul(&s, fast2, x, &w, n);
    double worst = 0;
    float *buf = xcalloc(2 * (size_t)cols, sizeof(float), "test"); /* matrix_row: a q8_0 row takes 1.3 cols */
    for (int t = 0; t < n; t++)
        for (int r = 0; r < rows; r++) {
            const float *row = matrix_row(&w, r, buf);
            double mag = 1e-30;
            for (int c = 0; c < cols; c++) mag += fabs((double)row[c] * x[(size_t)t * cols + c]);
            double e = fabs((double)fast[(size_t)t * rows + r] - ref[(size_t)t * rows + r]) / mag;
            worst = e > worst ? e : worst;
        }
    char name[128];
    RowShares shares = row_shares(&(MatmulJob){fast2, &w}, 1, n, n_threads());  /* (at 2 threads) */
    snprintf(name, sizeof name, "matmul %s %dx%d, %d token%s%s%s", dtype_name((uint32_t)dtype), rows, cols, n,
             n > 1 ? "s" : "", dtype == MM_Q8_0 && n >= OP_MIN_TOKENS ? " (prompt tiles)" : "",
             n < OP_MIN_TOKENS && shares.steal ? " (in pieces)" : "");
    if (in_pieces) check(shares.steal, name, "2 threads take it in pieces");
    check(worst < 1e-5, name, "max error %.1e of sum|w x|", worst);
    snprintf(name + strlen(name), sizeof name - strlen(name), ", threads 1 == 2");
    check(memcmp(fast, fast2, out_n * sizeof(float)) == 0, name, "bit-identical");
    int widths[2];
    if (dtype != MM_Q8_0 && n == 1 && kernel_row_widths(widths) == 2) {  /* rows in halves == whole */
        kernel_set_row_bits(widths[1]);
        matmul(&s, fast2, x, &w, 1);
        kernel_set_row_bits(widths[0]);
        snprintf(name, sizeof name, "matmul %s %dx%d, 1 token: rows in %d-bit halves == %d-bit vectors",
                 dtype_name((uint32_t)dtype), rows, cols, widths[1], widths[0]);
        check(memcmp(fast, fast2, (size_t)rows * sizeof(float)) == 0, name, "bit-identical");
    }
    if (dtype == MM_Q8_0 && n == 1) {  /* one token by panels == the same token in a 2-token tile */
        float *x2 = xcalloc(2 * (size_t)cols, sizeof(float), "test"),
              *out2 = xcalloc(2 * (size_t)rows, sizeof(float), "test");
        memcpy(x2, x, (size_t)cols * sizeof(float));
        memcpy(x2 + cols, x, (size_t)cols * sizeof(float));
        matmul(&s, out2, x2, &w, 2);
        snprintf(name, sizeof name, "matmul q8_0 %dx%d, 1 token == that token in a tile of 2", rows, cols);
        check(memcmp(fast, out2, (size_t)rows * sizeof(float)) == 0, name, "bit-identical");
        free(x2); free(out2);
    }
    free(storage); free(x); free(ref); free(fast); free(fast2); free(buf);
    state_free(&s);
}

/* next_piece: three threads' ranges of 10 pieces (3, 3, 4), taken by threads 0 and 1 only (a team
 * smaller than the ranges set), in an interleaving drawn at random: every piece is taken once, by
 * its owner from the front of its range, or by another thread whose own range is empty from the
 * back of the owner's */
static void test_next_piece(void) {
    PieceRange ranges[3];
    int taken[10] = {0}, n_taken = 0, bad = 0;
    for (int t = 0; t < 3; t++)
        atomic_store(&ranges[t].next_end, piece_range((uint32_t)(10 * t / 3), (uint32_t)(10 * (t + 1) / 3)));
    for (bool done[2] = {false, false}; !done[0] || !done[1];) {
        int id = random_f32(&rng) < 0.5f ? 0 : 1;
        if (done[id]) id = 1 - id;
        uint32_t next[3], end[3];
        for (int t = 0; t < 3; t++) {
            uint64_t v = atomic_load(&ranges[t].next_end);
            next[t] = (uint32_t)v, end[t] = (uint32_t)(v >> 32);
        }
        int p = next_piece(ranges, 3, id);
        if (p < 0) {
            done[id] = true;
            continue;
        }
        if (p >= 10) {
            bad++;
            continue;
        }
        taken[p]++, n_taken++;
        int owner = p < 3 ? 0 : p < 6 ? 1 : 2;
        if (owner == id) bad += (uint32_t)p != next[id];
        else bad += (uint32_t)p != end[owner] - 1 || next[id] < end[id];
    }
    for (int p = 0; p < 10; p++) bad += taken[p] != 1;
    check(bad == 0 && n_taken == 10, "next_piece: 10 pieces in 3 ranges, 2 threads",
          "%d pieces taken, %d wrong", n_taken, bad);
}

/* next_piece with two threads at once on one range: thread 0 owns all 2000 pieces and takes them
 * from the front while thread 1, its own range empty, takes them from the back, every take on the
 * same word; 200 rounds, each piece taken once */
static void test_next_piece_threads(void) {
#ifdef _OPENMP
    enum { ROUNDS = 200, N = 2000 };
    static _Atomic int taken[N];
    int bad = 0;
    for (int round = 0; round < ROUNDS; round++) {
        PieceRange ranges[2];
        atomic_store(&ranges[0].next_end, piece_range(0, N));
        atomic_store(&ranges[1].next_end, piece_range(N, N));
        for (int p = 0; p < N; p++) atomic_store(&taken[p], 0);
        #pragma omp parallel num_threads(2) reduction(+:bad)
        {
            #pragma omp barrier
            for (int p; (p = next_piece(ranges, 2, omp_get_thread_num())) >= 0;) {
                if (p < N) atomic_fetch_add(&taken[p], 1);
                else bad++;
                for (volatile int spin = 0; spin < 20; spin++) {} /* a piece's work, so the threads overlap */
            }
        }
        for (int p = 0; p < N; p++) bad += atomic_load(&taken[p]) != 1;
    }
    check(bad == 0, "next_piece: 2 threads at once on one range, 200 x 2000 pieces",
          "%d pieces not taken exactly once", bad);
#endif
}

/* the fast quantiser gives the reference's codes and scales exactly */
static void test_quantize(int n) {
    float *x = xcalloc((size_t)n, sizeof(float), "test");
    for (int i = 0; i < n; i++) x[i] = frand() * (i % 7 == 0 ? 100.0f : 1.0f);
    for (int i = 0; i < MM_Q8_GROUP && i < n; i++) x[i] = 0;  /* an all-zero group */
    if (n > 40) x[40] = 0.5f * x[41];                       /* near a rounding midpoint */
    int8_t *qa = xcalloc((size_t)n, 1, "test"), *qb = xcalloc((size_t)n, 1, "test");
    float *sa = xcalloc((size_t)n / MM_Q8_GROUP + 1, 4, "test"),
          *sb = xcalloc((size_t)n / MM_Q8_GROUP + 1, 4, "test");
    quantize_q8(qa, sa, x, n);
    quantize_q8_fast(qb, sb, x, n);
    char name[64];
    snprintf(name, sizeof name, "quantize_q8 of %d values", n);
    bool same = !memcmp(qa, qb, (size_t)n) && !memcmp(sa, sb, sizeof(float) * (size_t)(n / MM_Q8_GROUP));
    check(same, name, same ? "codes and scales identical" : "differ");
    free(x); free(qa); free(qb); free(sa); free(sb);
}

/* kernel_attention (flash attention) vs attention_head's plain loop, per query head, f32 and f16
 * caches; 1 and 2 threads bit-identical */
static void test_attention(int kv_dtype, int n_kv_heads, int group, int hd, int pos0, int n) {
    int q_dim = n_kv_heads * group * hd;
    Model m;
    State s = test_state(n, q_dim, n_kv_heads, group, hd, pos0 + n, kv_dtype, &m);
    KvLayer c = kv_layer(&s, &m.cfg, 0);
    float *k = xcalloc((size_t)hd, sizeof(float), "test"), *v = xcalloc((size_t)hd, sizeof(float), "test");
    for (int g = 0; g < n_kv_heads; g++)
        for (int t = 0; t < pos0 + n; t++) {
            for (int i = 0; i < hd; i++) k[i] = 3.0f * frand(), v[i] = frand();  /* peaked softmaxes too */
            cache_store(&c, g, t, k, v);
        }
    for (size_t i = 0; i < (size_t)n * q_dim; i++) s.q[i] = frand();
    size_t bytes = (size_t)n * q_dim * sizeof(float);
    float *ref = xcalloc(bytes, 1, "test"), *fast = xcalloc(bytes, 1, "test");
    set_threads(1);
    reference_kernels = true;
    attention(&s, &c, n, pos0);
    memcpy(ref, s.att_out, bytes);
    reference_kernels = false;
    attention(&s, &c, n, pos0);
    memcpy(fast, s.att_out, bytes);
    set_threads(2);
    attention(&s, &c, n, pos0);
    double worst = 0;
    for (size_t i = 0; i < (size_t)n * q_dim; i++) {
        double e = fabs((double)fast[i] - ref[i]);
        worst = e > worst ? e : worst;
    }
    char name[128];
    snprintf(name, sizeof name, "attention %s cache, %d kv heads x %d, head_dim %d, %d tokens from %d",
             kv_dtype == MM_F16 ? "f16" : "f32", n_kv_heads, group, hd, n, pos0);
    check(worst < 1e-5, name, "max error %.1e (values in [-1, 1])", worst);
    snprintf(name + strlen(name), sizeof name - strlen(name), ", threads 1 == 2");
    check(memcmp(fast, s.att_out, bytes) == 0, name, "bit-identical");
    free(k); free(v); free(ref); free(fast);
    state_free(&s);
}

/* the vectorised SwiGLU product (its polynomial exp) against silu with libm's expf, over the whole
 * range where exp overflows or underflows too; n not a multiple of the vector width */
static void test_swiglu(int n) {
    float *g = xcalloc((size_t)n, sizeof(float), "test"), *up = xcalloc((size_t)n, sizeof(float), "test");
    float *ref = xcalloc((size_t)n, sizeof(float), "test");
    for (int i = 0; i < n; i++) g[i] = frand() * (i % 3 == 0 ? 120.0f : 8.0f), up[i] = frand();
    g[0] = 0.0f, g[1] = -1e30f, g[2] = 1e30f, g[3] = -87.5f, g[4] = 88.5f;
    memcpy(ref, g, (size_t)n * sizeof(float));
    reference_kernels = true;
    swiglu(ref, up, 1, n);
    reference_kernels = false;
    swiglu(g, up, 1, n);
    double worst = 0;
    for (int i = 0; i < n; i++) {
        double e = fabs((double)g[i] - ref[i]) / (fabs((double)ref[i]) + 1e-24);  /* 0 where both underflow */
        worst = e > worst ? e : worst;
    }
    char name[64];
    snprintf(name, sizeof name, "swiglu of %d values in [-120, 120] and beyond", n);
    check(worst < 1e-6, name, "max relative error %.1e", worst);
    free(g); free(up); free(ref);
}

/* f32_to_f16 inverts f16_to_f32 on every finite half, and rounds to nearest even in between */
static void test_f16(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7c00) == 0x7c00) continue;  /* inf and nan */
        if (f32_to_f16(f16_to_f32((uint16_t)h)) != h) bad++;
        uint16_t next = (uint16_t)(h + 1);
        if ((h & 0x7fff) == 0x7bff || (h & 0x8000) != (next & 0x8000)) continue;
        float lo = f16_to_f32((uint16_t)h), hi = f16_to_f32(next), mid = 0.5f * (lo + hi);
        uint16_t even = (h & 1) ? next : (uint16_t)h;
        if (f32_to_f16(mid) != even) bad++;                             /* a tie: to even */
        if (f32_to_f16(nextafterf(mid, lo)) != h) bad++;               /* just below: down */
        if (f32_to_f16(nextafterf(mid, hi)) != next) bad++;            /* just above: up */
    }
    check(bad == 0 && f32_to_f16(1e6f) == 0x7c00 && f32_to_f16(-1e6f) == 0xfc00, "f32_to_f16 rounding",
          "%d mismatches over every half", bad);
}

int main(void) {
    kernel_set_row_bits(0);
    printf("kernels: %s\n", kernels_line());
    /* up to 15 tokens: the dot-product tiles; from 16: the outer-product tiles (rows and tokens
     * past a whole tile of 12 x 32, and a last run of at most 16 tokens) */
    static const int f_shapes[][3] = {{1, 1, 1}, {3, 7, 2}, {5, 33, 3}, {13, 100, 4}, {37, 515, 7},
                                      {8, 64, 1}, {64, 512, 64}, {4, 24, 6}, {37, 515, 17}, {13, 100, 33},
                                      {5, 33, 16}, {26, 64, 45}, {7, 515, 1}, {3, 100, 1}};
    static const int q_shapes[][3] = {{1, 32, 1}, {3, 96, 2}, {5, 160, 3}, {13, 544, 1}, {37, 96, 4},
                                      {9, 64, 7}, {64, 512, 64}, {9, 1408, 2}, {37, 96, 20}, {13, 544, 48},
                                      {70, 2432, 23}, {33, 160, 16}, {100, 96, 31},
                                      /* one token: a part panel, sums held in two turns (over 128 groups) */
                                      {70, 2432, 1}, {21, 4160, 1}};
    for (int dt = MM_F32; dt <= MM_BF16; dt++)
        for (size_t i = 0; i < sizeof f_shapes / sizeof f_shapes[0]; i++)
            test_matmul(dt, f_shapes[i][0], f_shapes[i][1], f_shapes[i][2], false);
    for (size_t i = 0; i < sizeof q_shapes / sizeof q_shapes[0]; i++)
        test_matmul(MM_Q8_0, q_shapes[i][0], q_shapes[i][1], q_shapes[i][2], false);
    /* 256 KB of weights a thread or more (4-8 MB here, many pieces): decoding's two threads take
     * pieces (RowShares), one token and a few */
    for (int dt = MM_F32; dt <= MM_Q8_0; dt++) {
        int rows = dt == MM_Q8_0 ? 4000 : 2100, cols = dt == MM_Q8_0 ? 1056 : 1000;
        test_matmul(dt, rows, cols, 1, true);
        test_matmul(dt, rows, cols, dt == MM_Q8_0 ? 5 : 3, true);
    }
    test_next_piece();
    test_next_piece_threads();
    test_swiglu(1000);
    test_quantize(32);
    test_quantize(2432);
    static const int a_cases[][5] = {{1, 1, 2, 0, 1},
                                     {2, 4, 64, 0, 5},
                                     {2, 4, 64, 300, 1},
                                     {4, 2, 96, 130, 16},
                                     {1, 3, 24, 0, 37},
                                     {2, 5, 6, 127, 3},
                                     {1, 8, 64, 1000, 2},
                                     /* decoding: several key blocks per tile with a block or two left,
                                      * value columns in one pass, or one and a plain tail */
                                     {2, 2, 96, 517, 1},
                                     {1, 3, 112, 260, 2},
                                     {1, 7, 40, 200, 1},
                                     {1, 1, 64, 200, 1}};
    for (int kv = 0; kv < 2; kv++)
        for (size_t i = 0; i < sizeof a_cases / sizeof a_cases[0]; i++)
            test_attention(kv ? MM_F16 : MM_F32, a_cases[i][0], a_cases[i][1], a_cases[i][2], a_cases[i][3],
                           a_cases[i][4]);
    test_f16();
    return failures ? 1 : 0;
}
