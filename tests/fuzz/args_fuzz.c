/* args_fuzz.c: the input is a command line after `run model.bin`, arguments separated by NUL
 * bytes. parse_args accepts it or refuses it with one line; an accepted one then goes through
 * what main does with flags before any file is read: the RoPE settings against a small model's
 * header, --ids (not @FILE: the fuzzer does not read files), and the memory check for -c and
 * --batch. The model path is always given (without one, parse_args prints the whole usage to
 * stderr before its error, thousands of times a second), and inputs holding -h, --help or
 * --version are skipped (they print and exit 0 by design). */
#include "fuzz.h"

enum { MAX_ARGS = 64 };

static const mm_header header = {.magic = MM_MAGIC,
                                 .version = MM_VERSION,
                                 .header_size = sizeof(mm_header),
                                 .generation = MM_GEN_MINIMIND3,
                                 .flags = MM_FLAG_QK_NORM | MM_FLAG_TIED_EMBED,
                                 .dim = 64,
                                 .n_layers = 2,
                                 .n_heads = 4,
                                 .n_kv_heads = 2,
                                 .head_dim = 24,
                                 .hidden_dim = 128,
                                 .vocab_size = 320,
                                 .max_seq_len = 32768,
                                 .rms_eps = 1e-6f,
                                 .rope_theta = 1e6f,
                                 .chat_template = MM_CHAT_MINIMIND3};

static void run_args(int argc, char **argv) {
    Options o;
    parse_args(&o, argc, argv);
    Model m = {.cfg = header, .path = "model.bin"};
    Rope rope = rope_from(&m.cfg, &o);
    int ctx = o.ctx ? o.ctx : (int)header.max_seq_len;
    float inv_freq[12];
    rope_inv_freq(inv_freq, &rope, (int)header.head_dim, (int)header.max_seq_len, ctx);
    if (o.ids_arg && o.ids_arg[0] != '@') {
        int n;
        free(parse_ids(o.ids_arg, &n, header.vocab_size));
    }
    fit_context(&m, o.batch < ctx ? o.batch : ctx, ctx, o.ctx != 0, !strcmp(o.kv, "f16") ? MM_F16 : MM_F32);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = 0;
    char *argv[MAX_ARGS + 1] = {"run", "model.bin"};
    int argc = 2;
    for (char *p = text; p <= text + size && argc < MAX_ARGS; p += strlen(p) + 1) {
        if (!strcmp(p, "-h") || !strcmp(p, "--help") || !strcmp(p, "--version")) {
            free(text);
            return 0;
        }
        argv[argc++] = p;
    }
    argv[argc] = NULL;
    jmp_buf jump;
    fuzz_die_jump = &jump;
    if (setjmp(jump) == 0) run_args(argc, argv);
    else fuzz_check_die_message();
    fuzz_die_jump = NULL;
    free(text);
    return 0;
}
