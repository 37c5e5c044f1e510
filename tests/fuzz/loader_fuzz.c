/* loader_fuzz.c: the input is a model file. model_parse checks the header, config, tokenizer
 * block and tensor table; a file it accepts must then load its tokenizer (or be refused with a
 * message), encode and decode text, run a forward pass of a block of a few tokens (the fast
 * kernels) and then of one more (the plain loops), and sample from the logits, whatever its
 * weights hold (NaN included). */
#include "fuzz.h"

static Model m;
static Tokenizer tok;
static State s;
static Sampler sp;
static uint8_t *seen;
static void *file;  /* (all static: what is allocated when die() jumps out is freed below) */

static void run_model(void) {
    model_parse(&m);
    const mm_header *h = &m.cfg;
    if (tokenizer_load(&tok, m.tokenizer, h->tokenizer_size, h->vocab_size)) return;
    static const char text[] = "Hi <|im_start|>user\n\xe4\xbd\xa0\xe5\xa5\xbd!";
    int ids[sizeof text + 1];
    ids[0] = (int)h->bos_id;
    size_t n = tokenizer_encode(&tok, (const uint8_t *)text, sizeof text - 1, ids + 1);
    if (n == (size_t)-1) return;
    for (size_t i = 0; i <= n; i++) {
        FUZZ_ASSERT(ids[i] >= 0 && (uint32_t)ids[i] < h->vocab_size);
        size_t len;
        tokenizer_decode(&tok, ids[i], &len);
    }
    Options o;
    char *argv[] = {"run", "fuzz.bin"};
    parse_args(&o, 2, argv);
    Rope rope = rope_from(h, &o);
    int ctx = h->max_seq_len < 8 ? (int)h->max_seq_len : 8, n_tok = n + 1 < 4 ? (int)n + 1 : 4;
    if (n_tok > ctx) n_tok = ctx;
    ctx = fit_context(&m, 4, ctx, true, MM_F32);
    state_init(&s, &m, 4, ctx, &rope, MM_F32, false);
    float *logits = forward(&m, &s, ids, n_tok, 0, false);
    sp = (Sampler){.vocab = (int)h->vocab_size, .temperature = 1.0f, .top_p = 0.9f, .top_k = 3,
                   .repeat_penalty = 1.1f, .rng = 42};
    sp.cand = xcalloc(h->vocab_size, sizeof *sp.cand, "sampler");
    sp.kth = xcalloc(3, sizeof(float), "sampler");
    seen = xcalloc(h->vocab_size, 1, "seen");
    int next = sample(&sp, logits, seen);
    FUZZ_ASSERT(next >= 0 && (uint32_t)next < h->vocab_size);
    reference_kernels = true;  /* the next token through run.c's plain loops (reset below) */
    if (n_tok < ctx) forward(&m, &s, &next, 1, n_tok, false);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    memset(&m, 0, sizeof m);
    memset(&tok, 0, sizeof tok);
    memset(&s, 0, sizeof s);
    memset(&sp, 0, sizeof sp);
    seen = NULL;
    file = aligned_alloc(MM_ALIGN, (size + MM_ALIGN) / MM_ALIGN * MM_ALIGN);  /* as mmap aligns */
    memcpy(file, data, size);
    m.path = "fuzz.bin";
    m.map_size = size;
    m.map = file;
    jmp_buf jump;
    fuzz_die_jump = &jump;
    if (setjmp(jump) == 0) run_model();
    else fuzz_check_die_message();
    fuzz_die_jump = NULL;
    reference_kernels = false;
    free(sp.cand);
    free(sp.kth);
    free(seen);
    state_free(&s);
    tokenizer_free(&tok);
    m.map = NULL;  /* not mapped: model_free must not munmap it */
    model_free(&m);
    free(file);
    return 0;
}
