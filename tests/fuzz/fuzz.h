/* fuzz.h: what every fuzz target shares. A target includes run.c whole (as tests/kernel_test.c
 * does) with MINIMIND_FUZZ, under which die() keeps its message and longjmps back here instead
 * of exiting: a clean refusal is an ordinary outcome, a crash or a sanitizer report is a bug.
 * Built by `make fuzz` with clang -fsanitize=fuzzer,address,undefined. */
#define MINIMIND_NO_MAIN
#define MINIMIND_FUZZ
#include "../../run.c"

/* A property of the code under test does not hold: report it as a crash, with the reason. */
#define FUZZ_ASSERT(cond) do { if (!(cond)) { fprintf(stderr, "fuzz: %s:%d: %s\n", __FILE__, __LINE__, #cond); abort(); } } while (0)

/* After die(): its message names the problem on one line. */
static void fuzz_check_die_message(void) {
    FUZZ_ASSERT(fuzz_die_message[0] != 0);
    FUZZ_ASSERT(strchr(fuzz_die_message, '\n') == NULL);
    fuzz_die_message[0] = 0;
}

/* The model file whose tokenizer the text targets use (make fuzz runs from the top folder). */
static void fuzz_load_tokenizer(Model *m, Tokenizer *tok) {
    const char *path = getenv("MINIMIND_FUZZ_MODEL");
    model_load(m, path ? path : "demo/model.bin");
    const char *err = tokenizer_load(tok, m->tokenizer, m->cfg.tokenizer_size, m->cfg.vocab_size);
    if (err) die("%s: %s", m->path, err);
}
