/* The memory ceiling of decoding, measured: how fast this machine reads a model file mapped the
 * way ./run maps it (MAP_POPULATE), start to end. Decoding one token reads every weight once, so
 * file bytes x decode tokens/s can be set beside this (tests/bench.py does, for make bench).
 *
 *     tests/stream FILE [THREADS]
 *         prints "SUSTAINED BEST": GB/s over all passes, and of the fastest pass
 *     tests/stream MODEL.bin THREADS --decode N
 *         decodes N tokens with run.c's forward pass, each between two passes (and after a
 *         token of its own: below), at each width the build reads weight rows in (--row-bits; a
 *         q8_0 model: its panels, printed as 0), the widths in turn token by token; prints a line
 *         per width, "BITS PASS TOKEN SHARE": the median pass and the median token in GB/s (the
 *         file's bytes over its time), and the median of the tokens' shares (a token's reads
 *         over the mean of the passes either side); its passes read the file in the order a
 *         token does (below)
 *
 * The first reads the file over and over, at least 10 times and for at least half a second:
 * SUSTAINED is all the bytes over all the time, what a decoding run (a mean over its tokens, for
 * about as long) can be set beside; BEST, the fastest single pass, catches this shared machine's
 * quiet moments and ran 20-60% above it in docs/speed.md's tables. --decode sets each token
 * beside the passes just before and after it, a few milliseconds apart: what the machine's
 * moods do to one they do to the other, so the middle half of the tokens' shares lies within a
 * few percent of their median, and settings alternated token by token compare reliably (the
 * level still moves from run to run: docs/speed.md). THREADS (default 1) read the file in 2 MB
 * chunks handed out as they come free (read_pass). */
#define _DEFAULT_SOURCE
#define MINIMIND_NO_MAIN
#include "../run.c"

/* the sum of n 64-bit words: the loads are the work, the sum keeps them from being dropped. Each
 * 4 KB of them first prefetches a line PAGES_AHEAD bytes ahead, as decoding's rows do (their
 * prefetch_page_ahead): that read files of minimind-3 and minimind2 1.06-1.23 times as fast as
 * the loads alone (a scratch program alternating the two, 30 passes each, AMD Zen 5), so the
 * loads alone were not the memory's speed. */
static uint64_t sum_words(const uint64_t *p, size_t n) {
    uint64_t s = 0;
    for (size_t i0 = 0; i0 < n; i0 += 512) {
        __builtin_prefetch((const uint8_t *)(p + i0) + PAGES_AHEAD, 0, 0);
        size_t i1 = n - i0 < 512 ? n : i0 + 512;
        #pragma omp simd reduction(+:s)
        for (size_t i = i0; i < i1; i++) s += p[i];
    }
    return s;
}

/* words w0 .. w1 - 1 of the order first .. words - 1, 0 .. first - 1 of the words at p: their sum */
static uint64_t sum_share(const uint64_t *p, size_t words, size_t first, size_t w0, size_t w1) {
    size_t at = (first + w0) % words, n = w1 - w0, tail = words - at;  /* (wrapping once at most) */
    return n <= tail ? sum_words(p + at, n) : sum_words(p + at, tail) + sum_words(p, n - tail);
}

/* One pass over the words 64-bit words at p in that order (first: where decoding's reads begin,
 * below); seconds. Threads take it in chunks of PASS_CHUNK bytes, each the next not taken as they
 * come free: on this project's machines that read a file faster than any fixed cut did. Halves of
 * the file read minimind2's f16 and f32 files 26-29% slower and minimind-3's 5-15% (one half of
 * a file can read slower than the other, whichever thread reads it), and 1 or 4 MB chunks dealt
 * out in turn 4-17% slower (docs/kernels.md). */
#define PASS_CHUNK ((size_t)2 << 20)
static uint64_t pass_sum;  /* the last pass's sum: every word once, in any order, the same sum */

static double read_pass(const uint64_t *p, size_t words, size_t first, int threads) {
    uint64_t total = 0;
    double t0 = now_seconds();
    if (threads == 1) total = sum_share(p, words, first, 0, words);  /* (no OpenMP region: as ./run) */
    else {
        size_t chunk = PASS_CHUNK / 8, chunks = (words + chunk - 1) / chunk;
        #pragma omp parallel for schedule(dynamic, 1) reduction(+:total)
        for (size_t c = 0; c < chunks; c++)
            total += sum_share(p, words, first, c * chunk, c * chunk + chunk < words ? c * chunk + chunk : words);
    }
    pass_sum = total;
    return now_seconds() - t0;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, compare_doubles);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* --decode: n tokens at each row width, alternated token by token, every token between two passes.
 * In ./run a token follows a token; here each timed token follows one untimed token of the same
 * width, decoded straight after the pass (the lead-in). A token straight after a pass read its
 * first layers slower than the rest, f16 and bf16 most: timed call by call in a scratch build
 * (minimind2 f16, one thread, AMD Zen 5), its calls read 25-29 GB/s at the first layer rising to
 * 39-46 by the ninth, where a token after a token read 37-42 at every layer; alternated token by
 * token, tokens after a token had shares 0.99-1.10 times those of tokens after a pass (median
 * 1.04; f32 at one thread 0.99-1.01), over minimind-3 and minimind2 in f32, f16 and bf16 at one
 * and two threads. */
static int decode_beside_passes(const char *path, int threads, int n) {
    threads_init(threads, false);
    Model m;
    model_load(&m, path);
    int bits[2], n_widths = kernel_row_widths(bits);
    bool q8 = m.layers[0].wq.dtype == MM_Q8_0;
    if (n_widths == 0 || q8) n_widths = 1, bits[0] = 0;  /* (one way to read: a build without the
                                                             kernels, or q8_0's panels) */
    int ctx = 1 + 2 * n * n_widths;  /* (a warm-up token, then a lead-in and a timed token each) */
    Rope rope = {.scaling = MM_ROPE_NONE, .theta = m.cfg.rope_theta};
    State s;
    state_init(&s, &m, 1, ctx, &rope, MM_F32, false);
    threads_start();
    const uint64_t *words = m.map;
    size_t n_words = m.map_size / 8;
    /* A token reads the layers in file order and then the output head, which in a tied model is
     * the embedding table at the start of the file: the passes read in that order too, the file
     * from the end of the embedding table and then its start. In file order, the pass after a
     * token read the head just read (much of it from the cache) and the token the head read a
     * file and a half before, where every other matrix is one file's reads from its last read:
     * minimind-3 f16's head read 11-26% slower than its layers, and in ./run at their speed. */
    size_t first = (size_t)(((const uint8_t *)m.embed.data - (const uint8_t *)m.map) +
                            tensor_bytes(m.embed.dtype, m.embed.rows, m.embed.cols)) / 8 % n_words;
    double bytes = (double)m.map_size;
    double *pass = xcalloc((size_t)n * n_widths + 1, sizeof(double), "passes");
    double *token = xcalloc((size_t)n * n_widths, sizeof(double), "tokens");
    double *share = xcalloc((size_t)n * n_widths, sizeof(double), "shares");
    int id = 1, pos = 0;
    const float *logits = forward(&m, &s, &id, 1, pos++, false);  /* a warm-up token */
    pass[0] = read_pass(words, n_words, first, threads);
    if (pass_sum != sum_words(words, n_words)) die("internal: a pass from word %zu missed words", first);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < n_widths; k++) {
            int w = i % 2 ? n_widths - 1 - k : k;  /* (each width first in turn) */
            if (bits[w]) kernel_set_row_bits(bits[w]);
            id = argmax(logits, (int)m.cfg.vocab_size);
            logits = forward(&m, &s, &id, 1, pos++, false);  /* the lead-in */
            id = argmax(logits, (int)m.cfg.vocab_size);
            double t0 = now_seconds();
            logits = forward(&m, &s, &id, 1, pos++, false);
            int at = i * n_widths + k;
            token[w * n + i] = now_seconds() - t0;
            pass[at + 1] = read_pass(words, n_words, first, threads);
            share[w * n + i] = (pass[at] + pass[at + 1]) / 2 / token[w * n + i];
        }
    double pass_s = median(pass, n * n_widths + 1);
    for (int w = 0; w < n_widths; w++)
        printf("%d %.2f %.2f %.3f\n", bits[w], bytes / pass_s / 1e9, bytes / median(token + w * n, n) / 1e9,
               median(share + w * n, n));
    free(pass), free(token), free(share);
    state_free(&s);
    model_free(&m);
    return 0;
}

int main(int argc, char **argv) {
    bool decode = argc == 5 && !strcmp(argv[3], "--decode");
    if (!decode && (argc < 2 || argc > 3))
        die("usage: tests/stream FILE [THREADS], or tests/stream MODEL.bin THREADS --decode N");
    int threads = argc >= 3 ? atoi(argv[2]) : 1;
    if (threads < 1 || threads > 1024) die("tests/stream: THREADS must be 1..1024, not %s", argv[2]);
    if (decode) {
        int n = atoi(argv[4]);
        if (n < 1 || n > 4096) die("tests/stream: --decode N must be 1..4096, not %s", argv[4]);
        return decode_beside_passes(argv[1], threads, n);
    }
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size < 64)
        die("tests/stream: cannot read %s (or it is under 64 bytes)", argv[1]);
    size_t words = (size_t)st.st_size / 8;
    const uint64_t *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (p == MAP_FAILED) die("tests/stream: cannot map %s", argv[1]);
#ifdef _OPENMP
    omp_set_num_threads(threads);
#endif
    double best = 0, start = now_seconds();
    int pass = 0;
    for (; pass < 10 || now_seconds() - start < 0.5; pass++) {
        double gbs = (double)words * 8 / read_pass(p, words, 0, threads) / 1e9;
        if (gbs > best) best = gbs;
    }
    printf("%.2f %.2f\n", (double)words * 8 * pass / (now_seconds() - start) / 1e9, best);
    return 0;
}
