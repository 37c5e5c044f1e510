/* tokenizer_test.c: drives tokenizer.c for tests/run_tests.py, many cases per process.
 *
 *   tokenizer_test MODEL.bin encode CASES     ids of each string, one line per string
 *   tokenizer_test MODEL.bin chat CASES       each conversation rendered by the model's template
 *   tokenizer_test MODEL.bin roundtrip N SEED N random byte strings: bytes of encode == input,
 *                                             and streaming decode == one-shot lossy decode
 *   tokenizer_test MODEL.bin speed MB         encoding speed on MB of mixed text (for make bench)
 *
 * CASES files are little-endian binary, written by run_tests.py:
 *   encode: uint32 n, then n times (uint32 len, bytes)
 *   chat:   uint32 n, then n times (uint8 add_generation_prompt, uint8 think, uint32 len, the
 *           messages as JSON, uint32 len, the tools as JSON or nothing), read by tokenizer.c's
 *           JSON reader as run's --messages and --tools are
 * chat writes, per case, uint32 len then the rendered bytes (or an error's text, len | 1 << 31).
 */
#define _POSIX_C_SOURCE 200809L
#include <time.h>

#include "../tokenizer.c"

static void die(const char *msg, const char *arg) {
    fprintf(stderr, "tokenizer_test: error: %s %s\n", msg, arg ? arg : "");
    exit(1);
}

static uint8_t *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) die("cannot read", path);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* a reader over a CASES file that refuses to run past its end */
typedef struct { const uint8_t *p; size_t left; } Reader;

static uint32_t get_u32(Reader *r) {
    if (r->left < 4) die("truncated cases file", NULL);
    uint32_t v = read_u32(r->p);
    r->p += 4; r->left -= 4;
    return v;
}

static const uint8_t *get_bytes(Reader *r, uint32_t n) {
    if (r->left < n) die("truncated cases file", NULL);
    const uint8_t *p = r->p;
    r->p += n; r->left -= n;
    return p;
}

/* Python's bytes.decode("utf-8", "replace") in C, one shot: the reference for the stream */
static size_t lossy(const uint8_t *s, size_t n, uint8_t *out) {
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        bool complete;
        uint32_t cp;
        size_t k = utf8_prefix(s + i, n - i, &complete, &cp);
        if (complete) { memcpy(out + o, s + i, k); o += k; i += k; continue; }
        memcpy(out + o, REPLACEMENT, 3);
        o += 3;
        i += k ? k : 1;
    }
    return o;
}

static uint64_t rng_state = 1;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (uint32_t)rng_state;
}

/* random bytes, biased towards what tokenizers get wrong: UTF-8 fragments, spaces, specials */
static size_t random_text(uint8_t *buf, size_t cap, const Tokenizer *t) {
    static const char *bits[] = {" ",
                                 "  ",
                                 "\n",
                                 "\t",
                                 "'s",
                                 "'LL",
                                 "a",
                                 "Z",
                                 "7",
                                 "!",
                                 "你",
                                 "é",
                                 "\xe2\x80\xa8",
                                 "\xc2\x85",
                                 "\xef\xbb\xbf",
                                 "\xf0\x9f\x91\x8d",
                                 "\xe3\x80\x80"};
    size_t n = 0, len = rnd() % cap;
    while (n < len) {
        uint32_t kind = rnd() % 8;
        const uint8_t *src;
        size_t k;
        if (kind == 0) { buf[n++] = (uint8_t)rnd(); continue; }
        if (kind == 1 && t->n_added) {
            int id = t->added[rnd() % (uint32_t)t->n_added];
            src = t->token[id];
            k = t->token_len[id];
            if (rnd() % 3 == 0) k = k > 1 ? k - 1 : k;  /* a near miss */
        } else {
            src = (const uint8_t *)bits[rnd() % (sizeof bits / sizeof bits[0])];
            k = strlen((const char *)src);
            if (rnd() % 5 == 0 && k > 1) k--;  /* a broken character */
        }
        if (n + k > cap) break;
        memcpy(buf + n, src, k);
        n += k;
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc < 4) die("usage: tokenizer_test MODEL.bin encode|chat|roundtrip|speed ...", NULL);
    size_t size;
    uint8_t *file = slurp(argv[1], &size);
    mm_header h;
    if (size < sizeof h) die("model file too short:", argv[1]);
    memcpy(&h, file, sizeof h);
    if (h.magic != MM_MAGIC || h.tokenizer_offset > size || h.tokenizer_size > size - h.tokenizer_offset)
        die("not a valid model file:", argv[1]);
    Tokenizer t;
    const char *err = tokenizer_load(&t, file + h.tokenizer_offset, h.tokenizer_size, h.vocab_size);
    if (err) die(err, argv[1]);
    const char *what = argv[2];

    if (!strcmp(what, "encode") || !strcmp(what, "chat")) {
        size_t len;
        uint8_t *cases = slurp(argv[3], &len);
        Reader r = {cases, len};
        uint32_t n = get_u32(&r);
        for (uint32_t c = 0; c < n; c++) {
            if (!strcmp(what, "encode")) {
                uint32_t tl = get_u32(&r);
                const uint8_t *text = get_bytes(&r, tl);
                int *ids = malloc(sizeof(int) * (tl + 1));
                size_t count = tokenizer_encode(&t, text, tl, ids);
                for (size_t i = 0; i < count; i++) printf(i ? " %d" : "%d", ids[i]);
                putchar('\n');
                free(ids);
                continue;
            }
            const uint8_t *flags = get_bytes(&r, 2);
            uint32_t ml = get_u32(&r);
            const char *messages = (const char *)get_bytes(&r, ml);
            uint32_t tl = get_u32(&r);
            const char *tools_json = (const char *)get_bytes(&r, tl);
            ChatMessage *msgs = NULL;
            int n_msgs = 0, n_tools = 0;
            char **tools = NULL;
            const char *err = chat_parse_messages(messages, ml, &msgs, &n_msgs, tl ? NULL : &tools, &n_tools);
            if (!err && tl) err = chat_parse_tools(tools_json, tl, &tools, &n_tools);
            if (!err) err = chat_check((int)h.chat_template, msgs, n_msgs, n_tools);
            char *out = err ? strdup(err) : chat_render((int)h.chat_template, msgs, n_msgs, tools, n_tools, flags[0], flags[1]);
            uint32_t ol = (uint32_t)strlen(out) | (err ? 1u << 31 : 0);
            fwrite(&ol, 4, 1, stdout);
            fwrite(out, 1, strlen(out), stdout);
            free(out);
            for (int i = 0; i < n_msgs; i++) chat_message_free(&msgs[i]);
            for (int i = 0; i < n_tools; i++) free(tools[i]);
            free(msgs);
            free(tools);
        }
        free(cases);
    } else if (!strcmp(what, "roundtrip") && argc == 5) {
        int n = atoi(argv[3]);
        rng_state = (uint64_t)atoll(argv[4]) * 2654435761u + 1;
        enum { CAP = 600 };
        uint8_t text[CAP], back[CAP], ref[3 * CAP], streamed[3 * CAP];
        int ids[CAP];
        for (int c = 0; c < n; c++) {
            size_t len = random_text(text, CAP, &t), count = tokenizer_encode(&t, text, len, ids), at = 0;
            for (size_t i = 0; i < count; i++) {
                memcpy(back + at, t.token[ids[i]], t.token_len[ids[i]]);
                at += t.token_len[ids[i]];
            }
            if (at != len || memcmp(back, text, len) != 0) {
                printf("FAIL case %d: %zu bytes in, %zu bytes back\n", c, len, at);
                return 1;
            }
            /* the stream, fed token by token, prints what a one-shot lossy decode prints */
            FILE *mem = fmemopen(streamed, sizeof streamed, "w");
            Utf8Stream st = {0};
            for (size_t i = 0; i < count; i++)
                utf8_stream_put(&st, t.token[ids[i]], t.token_len[ids[i]], mem);
            utf8_stream_flush(&st, mem);
            long got = ftell(mem);
            fclose(mem);
            size_t want = lossy(text, len, ref);
            if ((size_t)got != want || memcmp(streamed, ref, want) != 0) {
                printf("FAIL case %d: streamed %ld bytes, lossy decode %zu\n", c, got, want);
                return 1;
            }
        }
        printf("ok %d\n", n);
    } else if (!strcmp(what, "speed")) {
        size_t mb = (size_t)atoi(argv[3]), len = mb << 20, n = 0;
        static const char *sample = "The quick brown fox, 'd jumped over 12 lazy dogs! 你好，世界。\n  ";
        uint8_t *text = malloc(len);
        while (n < len) {
            size_t k = strlen(sample);
            k = k < len - n ? k : len - n;
            memcpy(text + n, sample, k);
            n += k;
        }
        int *ids = malloc(sizeof(int) * len);
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        size_t count = tokenizer_encode(&t, text, len, ids);
        clock_gettime(CLOCK_MONOTONIC, &b);
        double s = (double)(b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
        printf("%.2f MB/s (%zu bytes, %zu tokens, %.3f s)\n", len / s / 1e6, len, count, s);
        free(text); free(ids);
    } else {
        die("unknown command", what);
    }
    tokenizer_free(&t);
    free(file);
    return 0;
}
