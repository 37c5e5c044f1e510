/* llama_logits.c: llama.cpp's logits for token ids, to check a GGUF fixture with llama.cpp itself
 * (tests/gen_gguf_fixtures.py builds and runs it; it is not part of make test).
 *
 *     llama_logits MODEL.gguf OUT.f32 ID ID ...
 *
 * Runs the ids through the model in one batch and writes every position's logits, float32
 * little-endian, one row of the vocabulary per position. Built against a llama.cpp checkout:
 *     cc -O2 -I$LLAMA/include -I$LLAMA/ggml/include llama_logits.c -L$LLAMA/build/bin -lllama \
 *        -Wl,-rpath,$LLAMA/build/bin -o llama_logits */
#include <stdio.h>
#include <stdlib.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)data;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf OUT.f32 ID ID ...\n", argv[0]);
        return 2;
    }
    int n = argc - 3;
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "llama_logits: llama.cpp cannot load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(n < 64 ? 64 : n);
    cp.n_batch = cp.n_ubatch = cp.n_ctx;
    cp.n_threads = cp.n_threads_batch = 1;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "llama_logits: cannot make a context for %s\n", argv[1]);
        return 1;
    }
    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = atoi(argv[3 + i]);
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_logits: llama_decode failed\n");
        return 1;
    }
    int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE *f = fopen(argv[2], "wb");
    for (int i = 0; f && i < n; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), (size_t)vocab, f);
    if (!f || fclose(f) != 0) {
        fprintf(stderr, "llama_logits: cannot write %s\n", argv[2]);
        return 1;
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
