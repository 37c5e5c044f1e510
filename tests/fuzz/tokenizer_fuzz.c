/* tokenizer_fuzz.c: the input is text, any bytes. Encoding gives at most one token per byte,
 * every id inside the vocab, and decoding the ids gives the input back byte for byte; the
 * streaming printer writes valid UTF-8 whatever the bytes. Tokenizer: demo/model.bin's (or
 * $MINIMIND_FUZZ_MODEL's). */
#include "fuzz.h"

static Model m;
static Tokenizer tok;

/* the bytes of out are valid UTF-8 */
static bool valid_utf8(const uint8_t *b, size_t n) {
    for (size_t i = 0; i < n;) {
        bool complete;
        uint32_t cp;
        size_t k = utf8_prefix(b + i, n - i, &complete, &cp);
        if (!complete) return false;
        i += k;
    }
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!tok.n_vocab) fuzz_load_tokenizer(&m, &tok);
    int *ids = malloc((size + 1) * sizeof(int));
    size_t n = tokenizer_encode(&tok, data, size, ids);
    FUZZ_ASSERT(n != (size_t)-1 && n <= size);
    uint8_t *back = malloc(size + 1);
    char *streamed = NULL;
    size_t at = 0, streamed_len = 0;
    FILE *out = open_memstream(&streamed, &streamed_len);
    Utf8Stream st = {0};
    for (size_t i = 0; i < n; i++) {
        FUZZ_ASSERT(ids[i] >= 0 && (uint32_t)ids[i] < tok.n_vocab);
        size_t len;
        const uint8_t *b = tokenizer_decode(&tok, ids[i], &len);
        FUZZ_ASSERT(len <= size - at);
        memcpy(back + at, b, len);
        at += len;
        utf8_stream_put(&st, b, len, out);
    }
    utf8_stream_flush(&st, out);
    fclose(out);
    FUZZ_ASSERT(at == size && memcmp(back, data, size) == 0);  /* decode(encode(x)) == x */
    FUZZ_ASSERT(valid_utf8((const uint8_t *)streamed, streamed_len));
    FUZZ_ASSERT(streamed_len >= size / 4);  /* nothing is dropped: each byte is itself or a U+FFFD */
    free(streamed);
    free(back);
    free(ids);
    return 0;
}
