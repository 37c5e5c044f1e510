/* run.c: inference for MiniMind models (MiniMind2 and minimind-3, dense and MoE) in one file.
 *
 * Read top to bottom: the model file and its loader, the run state, the building blocks
 * (rmsnorm, matmul, rope, attention, swiglu, moe), the forward pass (a plain single-token
 * reference and the batched path used for prompts), the modes, and main.
 * The maths follows MiniMind's model/model_minimind.py; the layout of a model file is model.h.
 */
#define _POSIX_C_SOURCE 200809L  /* mmap, clock_gettime */
#define _DEFAULT_SOURCE          /* MAP_POPULATE (Linux) */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "model.h"
#include "tokenizer.c"  /* one translation unit: tokenizer.c exports tokenizer_*, utf8_*, chat_* */

_Static_assert(sizeof(mm_header) == 256, "mm_header must be 256 bytes");
_Static_assert(offsetof(mm_header, tokenizer_offset) == 128, "mm_header layout");
_Static_assert(sizeof(mm_tensor_entry) == 104, "mm_tensor_entry must be 104 bytes");

/* Every weight is read for every token, so the model's pages are mapped in at load (Linux), not
 * one page fault at a time during the first prompt */
#ifdef MAP_POPULATE
#define MAP_POPULATE_IF_ANY MAP_POPULATE
#else
#define MAP_POPULATE_IF_ANY 0
#endif

#ifdef MINIMIND_FUZZ
/* The fuzz targets (tests/fuzz/) build with MINIMIND_FUZZ: die() keeps its message and jumps
 * back to the target, which checks that it is one line, instead of exiting (libFuzzer would
 * count an exit as a failure). Production builds never see this. */
#include <setjmp.h>
static jmp_buf *fuzz_die_jump;
static char fuzz_die_message[4096];
#endif

/* The one-line error, then exit(1). Messages quote file names, flags and file contents: their
 * control bytes are escaped (\n, \xNN), so that the error stays one line whatever they hold. */
static void die(const char *fmt, ...) {
    char msg[1024], line[4 * sizeof msg];  /* (long quoted values are cut short) */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)msg; *p; p++) {
        if (*p >= 0x20 && *p != 0x7F) line[n++] = (char)*p;
        else n += (size_t)sprintf(line + n, *p == '\n' ? "\\n" : "\\x%02x", *p);
    }
    line[n] = 0;
#ifdef MINIMIND_FUZZ
    if (fuzz_die_jump) {
        memcpy(fuzz_die_message, line, n + 1);
        longjmp(*fuzz_die_jump, 1);
    }
#endif
    fprintf(stderr, "run: error: %s\n", line);
    exit(1);
}

/* n x size zeroed bytes that start on a 64-byte boundary, a cache line: a vector load of the
 * activations never straddles two lines (calloc's large blocks start 16 bytes past a page, so
 * every 64-byte load did: f32 decoding ran some 5-10% slower) */
#define CACHE_LINE 64
static void *xcalloc(size_t n, size_t size, const char *what) {
    n = n ? n : 1, size = size ? size : 1;
    if (n > (SIZE_MAX - CACHE_LINE) / size) die("out of memory allocating %s (%zu x %zu bytes)", what, n, size);
    size_t bytes = (n * size + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE;  /* aligned_alloc's rule */
    void *p = aligned_alloc(CACHE_LINE, bytes);
    if (!p) die("out of memory allocating %s (%zu x %zu bytes)", what, n, size);
    return memset(p, 0, bytes);
}

/* The KV cache: anonymous memory whose zero pages are mapped in when a position is first
 * written, a page fault per 4 KB (some 3000 for one 512-token prompt of minimind-3, and on a
 * virtual machine that was a quarter of its prefill time). Where the kernel offers 2 MB pages on
 * request, ask; the start is 2 MB-aligned, so a kv head's first positions take one such page,
 * not parts of two. Returns the start; *map, *map_bytes: what to munmap. */
#define HUGE_PAGE ((size_t)2 << 20)
static void *alloc_kv(size_t bytes, void **map, size_t *map_bytes) {
    *map_bytes = bytes + HUGE_PAGE;
    *map = mmap(NULL, *map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (*map == MAP_FAILED) die("out of memory allocating the KV cache (%zu bytes)", bytes);
    uint8_t *start = (uint8_t *)(((uintptr_t)*map + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
#ifdef MADV_HUGEPAGE
    (void)madvise(start, bytes / HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE);  /* only advice: may be refused */
#endif
    return start;
}

/* the threads a parallel region gets (--threads) */
static int n_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* the threads of the region this runs in (1 outside any) */
static int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* ============================================================================================
 * The model: config from the header, weights pointing into the mapped file
 * ============================================================================================ */

typedef struct {
    int dtype;                  /* enum mm_dtype */
    int rows, cols;             /* a linear weight [out, in], as in PyTorch */
    const void *data;           /* f32/f16/bf16 values [rows, cols], or q8_0 panels (model.h) */
} Matrix;

typedef struct {
    Matrix gate, up, down;      /* gate, up: [ffn, dim]; down: [dim, ffn] */
} FFN;

typedef struct {
    const float *input_norm;    /* [dim] */
    const float *post_norm;     /* [dim] */
    const float *q_norm, *k_norm; /* [head_dim] (minimind-3), else NULL */
    Matrix wq;                  /* [n_heads * head_dim, dim] */
    Matrix wk, wv;              /* [n_kv_heads * head_dim, dim] */
    Matrix wo;                  /* [dim, n_heads * head_dim] */
    Matrix router;              /* [n_experts, dim] (MoE only) */
    FFN *ffn;                   /* dense: 1; MoE: n_experts routed, then n_shared_experts */
} Layer;

typedef struct {
    mm_header cfg;              /* a copy of the file's header */
    Matrix embed;               /* [vocab, dim] */
    Matrix head;                /* [vocab, dim]: the embedding itself when tied */
    const float *final_norm;    /* [dim] */
    Layer *layers;              /* [n_layers] */
    const uint8_t *tokenizer;   /* the tokenizer block (model.h), tokenizer_size bytes */
    const char *path;
    void *map;
    size_t map_size;
    bool *tensor_used;          /* while loading: which tensor table entries were asked for */
} Model;

static const char *dtype_name(uint32_t dt) {
    static const char *names[] = {"f32", "f16", "bf16", "q8_0"};
    return dt < 4 ? names[dt] : "unknown";
}

/* bytes of one q8_0 panel of 16 rows: the codes, then the f16 scales (model.h) */
static uint64_t q8_panel_bytes(uint64_t cols) {
    return MM_Q8_PANEL * cols + MM_Q8_PANEL * (cols / MM_Q8_GROUP) * 2;
}

/* bytes of a [rows, cols] tensor in a dtype; 0 when it cannot be stored that way */
static uint64_t tensor_bytes(uint32_t dtype, uint64_t rows, uint64_t cols) {
    uint64_t n = rows * cols;
    switch (dtype) {
    case MM_F32: return n * 4;
    case MM_F16: case MM_BF16: return n * 2;
    case MM_Q8_0: return cols % MM_Q8_GROUP ? 0 : (rows + MM_Q8_PANEL - 1) / MM_Q8_PANEL * q8_panel_bytes(cols);
    default: return 0;
    }
}

/* The loader's table: find a tensor by name, check its shape, dtype and extent, mark it used. */
typedef struct {
    Model *m;
    const mm_tensor_entry *table;
    bool *used;                 /* m->tensor_used */
} Loader;

static const mm_tensor_entry *find_tensor(Loader *ld, const char *name, uint32_t rows, uint32_t cols,
                                          bool matrix) {
    const mm_header *h = &ld->m->cfg;
    const mm_tensor_entry *found = NULL;
    for (uint32_t i = 0; i < h->n_tensors; i++) {
        if (strncmp(ld->table[i].name, name, MM_NAME_LEN) != 0) continue;
        if (found) die("%s: tensor %s appears twice in the tensor table", ld->m->path, name);
        found = &ld->table[i];
        ld->used[i] = true;
    }
    if (!found) die("%s: missing tensor %s", ld->m->path, name);
    const mm_tensor_entry *e = found;
    uint32_t want_dims = matrix ? 2 : 1;
    if (e->n_dims != want_dims || e->shape[0] != rows || (matrix && e->shape[1] != cols))
        die("%s: tensor %s has %u dims [%u, %u], expected [%u%s%.0u]", ld->m->path, name, e->n_dims,
            e->shape[0], e->n_dims > 1 ? e->shape[1] : 0, rows, matrix ? ", " : "", matrix ? cols : 0);
    if (e->dtype == MM_Q8_0 && h->version < 2)
        die("%s: tensor %s is q8_0 in the row layout of model file version %u; this build reads q8_0 "
            "panels (version %u): re-export with this export.py", ld->m->path, name, h->version, MM_VERSION);
    if (!matrix && e->dtype != MM_F32)
        die("%s: tensor %s has dtype %s, expected f32 (norm weights stay f32)", ld->m->path, name,
            dtype_name(e->dtype));
    uint64_t want = tensor_bytes(e->dtype, rows, matrix ? cols : 1);
    if (want == 0)
        die("%s: tensor %s has unsupported dtype %u (%s) for shape [%u, %u]", ld->m->path, name,
            e->dtype, dtype_name(e->dtype), rows, cols);
    if (e->size != want)
        die("%s: tensor %s has %llu bytes, its shape and dtype need %llu", ld->m->path, name,
            (unsigned long long)e->size, (unsigned long long)want);
    if (e->offset % MM_ALIGN || e->offset > h->file_size || e->size > h->file_size - e->offset)
        die("%s: tensor %s at offset %llu (+%llu bytes) lies outside the %llu-byte file or is not "
            "%u-aligned", ld->m->path, name, (unsigned long long)e->offset,
            (unsigned long long)e->size, (unsigned long long)h->file_size, MM_ALIGN);
    return e;
}

static const float *load_vector(Loader *ld, const char *name, uint32_t n) {
    const mm_tensor_entry *e = find_tensor(ld, name, n, 0, false);
    return (const float *)((const uint8_t *)ld->m->map + e->offset);
}

static Matrix load_matrix(Loader *ld, const char *name, uint32_t rows, uint32_t cols) {
    const mm_tensor_entry *e = find_tensor(ld, name, rows, cols, true);
    const uint8_t *p = (const uint8_t *)ld->m->map + e->offset;
    return (Matrix){.dtype = (int)e->dtype, .rows = (int)rows, .cols = (int)cols, .data = p};
}

static FFN load_ffn(Loader *ld, const char *prefix, uint32_t dim, uint32_t hidden) {
    char name[MM_NAME_LEN + 32];
    FFN f;
    snprintf(name, sizeof name, "%sgate_proj.weight", prefix);
    f.gate = load_matrix(ld, name, hidden, dim);
    snprintf(name, sizeof name, "%sup_proj.weight", prefix);
    f.up = load_matrix(ld, name, hidden, dim);
    snprintf(name, sizeof name, "%sdown_proj.weight", prefix);
    f.down = load_matrix(ld, name, dim, hidden);
    return f;
}

/* Check the header's numbers before anything trusts them. */
static void check_config(const Model *m) {
    const mm_header *h = &m->cfg;
    const char *p = m->path;
#define REQUIRE(cond, ...) do { if (!(cond)) die(__VA_ARGS__); } while (0)
    REQUIRE(h->dim >= 1 && h->dim <= 65536, "%s: header field dim = %u, expected 1..65536", p, h->dim);
    REQUIRE(h->n_layers >= 1 && h->n_layers <= 1024, "%s: header field n_layers = %u, expected 1..1024", p, h->n_layers);
    REQUIRE(h->n_heads >= 1 && h->n_heads <= 1024, "%s: header field n_heads = %u, expected 1..1024", p, h->n_heads);
    REQUIRE(h->n_kv_heads >= 1 && h->n_heads % h->n_kv_heads == 0,
            "%s: header field n_kv_heads = %u, expected a divisor of n_heads %u", p, h->n_kv_heads, h->n_heads);
    REQUIRE(h->head_dim >= 2 && h->head_dim <= 4096 && h->head_dim % 2 == 0,
            "%s: header field head_dim = %u, expected an even number 2..4096", p, h->head_dim);
    REQUIRE(h->vocab_size >= 1 && h->vocab_size <= (1u << 24), "%s: header field vocab_size = %u, expected 1..16777216", p, h->vocab_size);
    REQUIRE(h->max_seq_len >= 1 && h->max_seq_len <= (1u << 24), "%s: header field max_seq_len = %u, expected 1..16777216", p, h->max_seq_len);
    REQUIRE(h->generation == MM_GEN_MINIMIND2 || h->generation == MM_GEN_MINIMIND3,
            "%s: header field generation = %u, expected 2 (MiniMind2) or 3 (minimind-3)", p, h->generation);
    REQUIRE((h->flags & ~(uint32_t)(MM_FLAG_QK_NORM | MM_FLAG_TIED_EMBED | MM_FLAG_MOE)) == 0,
            "%s: header field flags = 0x%x has unknown bits", p, h->flags);
    REQUIRE(isfinite(h->rms_eps) && h->rms_eps > 0 && h->rms_eps < 1, "%s: header field rms_eps = %g, expected 0 < eps < 1", p, h->rms_eps);
    REQUIRE(isfinite(h->rope_theta) && h->rope_theta > 1, "%s: header field rope_theta = %g, expected > 1", p, h->rope_theta);
    if (h->flags & MM_FLAG_MOE) {
        REQUIRE(h->n_experts >= 1 && h->n_experts <= 1024, "%s: header field n_experts = %u, expected 1..1024", p, h->n_experts);
        REQUIRE(h->n_experts_per_tok >= 1 && h->n_experts_per_tok <= h->n_experts,
                "%s: header field n_experts_per_tok = %u, expected 1..%u", p, h->n_experts_per_tok, h->n_experts);
        REQUIRE(h->n_shared_experts <= 1024, "%s: header field n_shared_experts = %u, expected 0..1024", p, h->n_shared_experts);
        REQUIRE(h->moe_hidden_dim >= 1 && h->moe_hidden_dim <= (1u << 20), "%s: header field moe_hidden_dim = %u, expected 1..1048576", p, h->moe_hidden_dim);
        REQUIRE(h->moe_norm <= MM_MOE_NORM_ALWAYS, "%s: header field moe_norm = %u, expected 0..2", p, h->moe_norm);
    } else {
        REQUIRE(h->hidden_dim >= 1 && h->hidden_dim <= (1u << 20), "%s: header field hidden_dim = %u, expected 1..1048576", p, h->hidden_dim);
    }
    REQUIRE(h->rope_scaling <= MM_ROPE_YARN, "%s: header field rope_scaling = %u, expected 0..2", p, h->rope_scaling);
    REQUIRE(h->chat_template <= MM_CHAT_MINIMIND3, "%s: header field chat_template = %u, expected 0..3", p, h->chat_template);
    REQUIRE(h->bos_id < h->vocab_size && h->eos_id < h->vocab_size && h->pad_id < h->vocab_size,
            "%s: bos/eos/pad ids %u/%u/%u outside the vocab of %u", p, h->bos_id, h->eos_id, h->pad_id, h->vocab_size);
    REQUIRE((uint64_t)h->n_heads * h->head_dim <= (1u << 20), "%s: n_heads x head_dim too large", p);
#undef REQUIRE
}

/* Check the model file's bytes (m->map, m->map_size bytes) and point the weights into them.
 * Every number is checked before it is used: the file may come from anyone. */
static void model_parse(Model *m) {
    const char *path = m->path;
    uint64_t size = m->map_size;
    if (size < sizeof(mm_header))
        die("%s: file is %llu bytes, too short for the %zu-byte header (truncated?)", path,
            (unsigned long long)size, sizeof(mm_header));
    memcpy(&m->cfg, m->map, sizeof(mm_header));
    mm_header *h = &m->cfg;

    if (h->magic != MM_MAGIC)
        die("%s: not a minimind.c model file (magic 0x%08x, expected 0x%08x \"MMND\"; convert "
            "checkpoints with export.py)", path, h->magic, MM_MAGIC);
    if (h->version != MM_VERSION && h->version != 1)  /* version 1 differs only in q8_0 tensors */
        die("%s: model file version %u, this build reads version %u (re-export with this "
            "export.py)", path, h->version, MM_VERSION);
    if (h->header_size != sizeof(mm_header))
        die("%s: header_size %u, expected %zu", path, h->header_size, sizeof(mm_header));
    if (h->file_size != size)
        die("%s: file is %llu bytes but its header says %llu (truncated or corrupt)", path,
            (unsigned long long)size, (unsigned long long)h->file_size);
    check_config(m);
    if (h->tokenizer_offset < sizeof(mm_header) || h->tokenizer_offset > size ||
        h->tokenizer_size > size - h->tokenizer_offset)
        die("%s: tokenizer block (offset %llu, %llu bytes) lies outside the %llu-byte file", path,
            (unsigned long long)h->tokenizer_offset, (unsigned long long)h->tokenizer_size,
            (unsigned long long)size);
    m->tokenizer = (const uint8_t *)m->map + h->tokenizer_offset;
    if (h->n_tensors == 0 || h->n_tensors > 1000000 || h->tensor_table_offset % 8 ||
        h->tensor_table_offset > size ||
        (uint64_t)h->n_tensors * sizeof(mm_tensor_entry) > size - h->tensor_table_offset)
        die("%s: tensor table (offset %llu, %u entries) lies outside the %llu-byte file", path,
            (unsigned long long)h->tensor_table_offset, h->n_tensors, (unsigned long long)size);

    Loader ld = {.m = m, .table = (const mm_tensor_entry *)((const uint8_t *)m->map + h->tensor_table_offset),
                 .used = m->tensor_used = xcalloc(h->n_tensors, sizeof(bool), "tensor table marks")};
    uint32_t dim = h->dim, hd = h->head_dim, q_dim = h->n_heads * hd, kv_dim = h->n_kv_heads * hd;
    bool moe = h->flags & MM_FLAG_MOE;
    uint32_t n_ffn = moe ? h->n_experts + h->n_shared_experts : 1;
    char name[MM_NAME_LEN + 32];

    m->embed = load_matrix(&ld, "model.embed_tokens.weight", h->vocab_size, dim);
    m->layers = xcalloc(h->n_layers, sizeof(Layer), "layers");
    for (uint32_t l = 0; l < h->n_layers; l++) {
        Layer *L = &m->layers[l];
#define NAME(fmt, ...) (snprintf(name, sizeof name, "model.layers.%u." fmt, l, __VA_ARGS__), name)
        L->input_norm = load_vector(&ld, NAME("%s", "input_layernorm.weight"), dim);
        L->wq = load_matrix(&ld, NAME("%s", "self_attn.q_proj.weight"), q_dim, dim);
        L->wk = load_matrix(&ld, NAME("%s", "self_attn.k_proj.weight"), kv_dim, dim);
        L->wv = load_matrix(&ld, NAME("%s", "self_attn.v_proj.weight"), kv_dim, dim);
        L->wo = load_matrix(&ld, NAME("%s", "self_attn.o_proj.weight"), dim, q_dim);
        if (h->flags & MM_FLAG_QK_NORM) {
            L->q_norm = load_vector(&ld, NAME("%s", "self_attn.q_norm.weight"), hd);
            L->k_norm = load_vector(&ld, NAME("%s", "self_attn.k_norm.weight"), hd);
        }
        L->post_norm = load_vector(&ld, NAME("%s", "post_attention_layernorm.weight"), dim);
        L->ffn = xcalloc(n_ffn, sizeof(FFN), "feed-forward weights");
        if (moe) {
            L->router = load_matrix(&ld, NAME("%s", "mlp.gate.weight"), h->n_experts, dim);
            for (uint32_t e = 0; e < n_ffn; e++) {
                if (e < h->n_experts) NAME("mlp.experts.%u.", e);
                else NAME("mlp.shared_experts.%u.", e - h->n_experts);
                L->ffn[e] = load_ffn(&ld, name, dim, h->moe_hidden_dim);
            }
        } else {
            L->ffn[0] = load_ffn(&ld, NAME("%s", "mlp."), dim, h->hidden_dim);
        }
#undef NAME
    }
    m->final_norm = load_vector(&ld, "model.norm.weight", dim);
    m->head = (h->flags & MM_FLAG_TIED_EMBED) ? m->embed
                                              : load_matrix(&ld, "lm_head.weight", h->vocab_size, dim);
    for (uint32_t i = 0; i < h->n_tensors; i++)
        if (!ld.used[i])
            die("%s: unknown tensor %.*s in the tensor table", path, MM_NAME_LEN, ld.table[i].name);
    free(m->tensor_used);
    m->tensor_used = NULL;
}

static void model_load(Model *m, const char *path) {
    memset(m, 0, sizeof *m);
    m->path = path;
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("%s: cannot open model file (%s)", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("%s: not a regular file", path);
    m->map_size = (size_t)st.st_size;
    if (m->map_size > 0) {  /* (an empty file cannot be mapped; model_parse says it is too short) */
        m->map = mmap(NULL, m->map_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE_IF_ANY, fd, 0);
        if (m->map == MAP_FAILED) die("%s: mmap failed (%s)", path, strerror(errno));
    }
    close(fd);
    model_parse(m);
}

/* (also after a failed model_parse: every pointer is NULL or allocated) */
static void model_free(Model *m) {
    if (m->layers)
        for (uint32_t l = 0; l < m->cfg.n_layers; l++) free(m->layers[l].ffn);
    free(m->layers);
    free(m->tensor_used);
    if (m->map) munmap(m->map, m->map_size);
}

/* ============================================================================================
 * RoPE settings: the file's config.json values, then the command line's
 * ============================================================================================ */

typedef struct {
    int scaling;                /* enum mm_rope_scaling */
    float theta;                /* rope_theta, or --rope-base */
    float factor;               /* s: linear divides positions by it, YaRN slows low frequencies */
    int orig_ctx;               /* YaRN: original_max_position_embeddings */
    float beta_fast, beta_slow; /* YaRN: ramp ends, in rotations over orig_ctx */
    float attn_factor;          /* YaRN: multiplies cos and sin */
} Rope;

/* inv_freq[i] for i < head_dim/2, computed in fp32 exactly as upstream does. */
static void rope_inv_freq(float *inv_freq, const Rope *r, int head_dim, int max_seq_len) {
    int half = head_dim / 2;
    for (int i = 0; i < half; i++)
        inv_freq[i] = 1.0f / powf(r->theta, (float)(2 * i) / (float)head_dim);
    if (r->scaling == MM_ROPE_LINEAR) {
        for (int i = 0; i < half; i++) inv_freq[i] /= r->factor;
    } else if (r->scaling == MM_ROPE_YARN && (double)max_seq_len / r->orig_ctx > 1.0) {
        /* the pair index at which a frequency makes b rotations over the original context */
        double ln_theta = log((double)r->theta);
#define DIM_OF(b) (head_dim * log(r->orig_ctx / ((b) * 2 * 3.14159265358979323846)) / (2 * ln_theta))
        double low = fmax(floor(DIM_OF((double)r->beta_fast)), 0.0);
        double high = fmin(ceil(DIM_OF((double)r->beta_slow)), (double)(half - 1));
#undef DIM_OF
        float span = (float)fmax(high - low, 0.001);
        for (int i = 0; i < half; i++) {
            float ramp = ((float)i - (float)low) / span;
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            inv_freq[i] = inv_freq[i] * ((1.0f - ramp) + ramp / r->factor);
        }
    }
}

/* ============================================================================================
 * The run state: activations for a block of tokens, and the KV cache
 * ============================================================================================ */

#define ROW_BLOCK 4              /* weight rows per unit of matmul work (the fast path's tile) */
#define PANEL_ROWS 12            /* weight rows a prompt block's tile converts to f32 at once */
#define XT_TOKENS 32             /* the transposed activations are padded to a multiple of this */

/* the row length of xT (State) for a block of n tokens: n padded to a multiple of XT_TOKENS */
static size_t xT_width(size_t n) { return (n + XT_TOKENS - 1) / XT_TOKENS * XT_TOKENS; }
#define KEY_BLOCK 16             /* key positions stored transposed together (the score kernel's lanes) */

/* what is left of a thread's range of pieces of a matmuls call (next_piece): the next piece in the
 * low 32 bits, the end in the high, one word so that its owner (taking from the front) and
 * another thread (from the back) never both take the last piece; a cache line of its own */
typedef struct { _Alignas(64) _Atomic uint64_t next_end; } PieceRange;

typedef struct {
    int max_tokens;             /* tokens per forward call (the prefill block) */
    int ctx;                    /* KV cache length in positions */
    float *x;                   /* [max_tokens, dim] residual stream */
    float *xb;                  /* [max_tokens, dim] normed input of a sublayer */
    float *q;                   /* [max_tokens, n_heads * head_dim] */
    float *att_out;             /* [max_tokens, n_heads * head_dim] attention output */
    float *delta;               /* [max_tokens, dim] sublayer output before the residual add */
    float *hb, *hb2;            /* [max_tokens, ffn] SwiGLU gate and up */
    float *moe_in, *moe_out;    /* [max_tokens, dim] rows routed to one expert */
    int *moe_rows;              /* [max_tokens] which rows those are */
    float *moe_w;               /* [max_tokens] and the weight each gives the expert */
    float *router;              /* [max_tokens, n_experts] router probabilities */
    int *top_idx;               /* [max_tokens, top_k] chosen experts */
    float *top_w;               /* [max_tokens, top_k] their weights */
    float *cos, *sin;           /* [max_tokens, head_dim/2] rotation of each token's position */
    float *inv_freq;            /* [head_dim/2] */
    float attn_factor;
    float *scores;              /* [threads, ctx] attention scores, one row per thread */
    float *row_buf;             /* [threads, PANEL_ROWS * max cols] weight rows converted to f32
                                   (or a q8_0 row's codes and scales, for the reference) */
    float *xT;                  /* [max cols, max_tokens rounded up to XT_TOKENS] a block's x transposed */
    int row_buf_len;
    int8_t *xq;                 /* [max_tokens, max cols] activations quantised for q8_0 matrices */
    float *xs;                  /* [max_tokens, max cols / 32] their scales */
    int32_t *xqsum;             /* [max_tokens, max cols / 32] -128 x the sum of each group's codes */
    float *logits;              /* [max_tokens, vocab] */
    int kv_dtype;               /* MM_F32, or MM_F16 (--kv f16) */
    int kv_len;                 /* ctx rounded up to a multiple of KEY_BLOCK */
    void *kv_map;               /* the mapping that holds both caches (alloc_kv) */
    size_t kv_map_bytes;
    void *key_cache;            /* [n_layers, n_kv_heads, kv_len / KEY_BLOCK, head_dim, KEY_BLOCK] of
                                   kv_dtype: each kv head's keys one run of memory, KEY_BLOCK
                                   positions side by side (see key_store) */
    void *value_cache;          /* [n_layers, n_kv_heads, kv_len, head_dim] of kv_dtype */
    float *k_new, *v_new;       /* [max_tokens, n_kv_heads * head_dim] the block's k, v before caching */
    float *att_buf;             /* [threads, att_buf_len] attention scratch (attention_group) */
    size_t att_buf_len;
    PieceRange *piece_ranges;   /* [threads] each thread's pieces of a matmuls call (next_piece) */
} State;

static size_t attention_buf_len(int group, int hd);

static void state_init(State *s, const Model *m, int max_tokens, int ctx, const Rope *rope, int kv_dtype) {
    const mm_header *h = &m->cfg;
    size_t dim = h->dim, q_dim = (size_t)h->n_heads * h->head_dim, kv_dim = (size_t)h->n_kv_heads * h->head_dim;
    size_t ffn = h->flags & MM_FLAG_MOE ? h->moe_hidden_dim : h->hidden_dim;
    size_t T = (size_t)max_tokens, nt = (size_t)n_threads();
    memset(s, 0, sizeof *s);
    s->max_tokens = max_tokens;
    s->ctx = ctx;
    s->x = xcalloc(T * dim, sizeof(float), "activations");
    s->xb = xcalloc(T * dim, sizeof(float), "activations");
    s->delta = xcalloc(T * dim, sizeof(float), "activations");
    s->q = xcalloc(T * q_dim, sizeof(float), "activations");
    s->att_out = xcalloc(T * q_dim, sizeof(float), "activations");
    s->hb = xcalloc(T * ffn, sizeof(float), "activations");
    s->hb2 = xcalloc(T * ffn, sizeof(float), "activations");
    if (h->flags & MM_FLAG_MOE) {
        s->moe_in = xcalloc(T * dim, sizeof(float), "activations");
        s->moe_out = xcalloc(T * dim, sizeof(float), "activations");
        s->moe_rows = xcalloc(T, sizeof(int), "activations");
        s->moe_w = xcalloc(T, sizeof(float), "activations");
        s->router = xcalloc(T * h->n_experts, sizeof(float), "activations");
        s->top_idx = xcalloc(T * h->n_experts_per_tok, sizeof(int), "activations");
        s->top_w = xcalloc(T * h->n_experts_per_tok, sizeof(float), "activations");
    }
    s->cos = xcalloc(T * h->head_dim / 2, sizeof(float), "rope table");
    s->sin = xcalloc(T * h->head_dim / 2, sizeof(float), "rope table");
    s->inv_freq = xcalloc(h->head_dim / 2, sizeof(float), "rope table");
    rope_inv_freq(s->inv_freq, rope, (int)h->head_dim, (int)h->max_seq_len);
    s->attn_factor = rope->scaling == MM_ROPE_YARN ? rope->attn_factor : 1.0f;
    s->scores = xcalloc(nt * (size_t)ctx, sizeof(float), "attention scores");
    size_t max_cols = dim > q_dim ? dim : q_dim;
    if (ffn > max_cols) max_cols = ffn;
    s->row_buf_len = PANEL_ROWS * (int)max_cols;
    s->row_buf = xcalloc(nt * (size_t)s->row_buf_len, sizeof(float), "weight row buffer");
    s->xT = xcalloc(max_cols * xT_width(T), sizeof(float), "activations");
    s->xq = xcalloc(T * max_cols, 1, "quantised activations");
    s->xs = xcalloc(T * max_cols / MM_Q8_GROUP + 1, sizeof(float), "quantised activations");
    s->xqsum = xcalloc(T * max_cols / MM_Q8_GROUP + 1, sizeof(int32_t), "quantised activations");
    s->logits = xcalloc(T * h->vocab_size, sizeof(float), "logits");
    /* mapped, not written: memory is only committed for the positions used (alloc_kv) */
    s->kv_dtype = kv_dtype;
    s->kv_len = (ctx + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK;
    size_t kv_elem = kv_dtype == MM_F16 ? 2 : 4, kv_n = (size_t)h->n_layers * (size_t)s->kv_len * kv_dim;
    size_t cache_bytes = (kv_n * kv_elem + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;  /* keys, then values */
    s->key_cache = alloc_kv(2 * cache_bytes, &s->kv_map, &s->kv_map_bytes);
    s->value_cache = (uint8_t *)s->key_cache + cache_bytes;
    s->k_new = xcalloc(T * kv_dim, sizeof(float), "activations");
    s->v_new = xcalloc(T * kv_dim, sizeof(float), "activations");
    s->att_buf_len = attention_buf_len((int)(h->n_heads / h->n_kv_heads), (int)h->head_dim);
    s->att_buf = xcalloc(nt * s->att_buf_len, sizeof(float), "attention scratch");
    s->piece_ranges = xcalloc(nt, sizeof(PieceRange), "thread work ranges");
}

static void state_free(State *s) {
    void *bufs[] = {s->x, s->xb, s->delta, s->q, s->att_out, s->hb, s->hb2, s->moe_in, s->moe_out,
                    s->moe_rows, s->moe_w, s->router, s->top_idx, s->top_w, s->cos, s->sin, s->inv_freq,
                    s->scores, s->row_buf, s->xT, s->xq, s->xs, s->xqsum, s->logits, s->k_new, s->v_new, s->att_buf,
                    s->piece_ranges};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    munmap(s->kv_map, s->kv_map_bytes);
}

/* Bytes that state_init (and main's token buffers) allocate for max_tokens and ctx: the KV
 * cache, which grows with the context, and the per-token activations and logits. */
static uint64_t state_bytes(const mm_header *h, int max_tokens, int ctx, int kv_dtype, uint64_t *kv_bytes) {
    uint64_t dim = h->dim, q_dim = (uint64_t)h->n_heads * h->head_dim, kv_dim = (uint64_t)h->n_kv_heads * h->head_dim;
    uint64_t ffn = h->flags & MM_FLAG_MOE ? h->moe_hidden_dim : h->hidden_dim;
    uint64_t T = (uint64_t)max_tokens, nt = (uint64_t)n_threads(), cols = dim;
    if (q_dim > cols) cols = q_dim;
    if (ffn > cols) cols = ffn;
    uint64_t kv_len = ((uint64_t)ctx + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK;
    *kv_bytes = 2 * (uint64_t)h->n_layers * kv_len * kv_dim * (kv_dtype == MM_F16 ? 2 : 4);
    uint64_t per_token = 4 * (5 * dim + 2 * q_dim + 2 * ffn + 2 * kv_dim + h->head_dim + h->vocab_size +
                              h->n_experts + 2 * (uint64_t)h->n_experts_per_tok + 2) + cols + cols / 4;
    uint64_t xT = 4 * cols * xT_width(T);
    return *kv_bytes + T * per_token + xT + (uint64_t)ctx * 4 * (nt + 1) + nt * 4 * PANEL_ROWS * cols +
           (uint64_t)h->vocab_size * 16;
}

/* Refuse, before allocating, a state that cannot fit: this machine's memory, or the address
 * space that RLIMIT_AS leaves beside the mapped model file. (Calloc'ed pages are only committed
 * when used, so without this a huge -c would start and be killed part way.) */
static void check_memory(const Model *m, int max_tokens, int ctx, int kv_dtype) {
    uint64_t kv, need = state_bytes(&m->cfg, max_tokens, ctx, kv_dtype, &kv);
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    uint64_t have = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : UINT64_MAX;
    const char *what = "memory";
    struct rlimit rl;
    if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        uint64_t left = rl.rlim_cur > m->map_size ? (uint64_t)rl.rlim_cur - m->map_size : 0;
        if (left < have) have = left, what = "address space (ulimit -v) beside the model file";
    }
    if (need > have)
        die("a context of %d positions needs %llu bytes (KV cache %llu, activations %llu), more than the "
            "%llu bytes of %s; use a smaller -c%s", ctx, (unsigned long long)need, (unsigned long long)kv,
            (unsigned long long)(need - kv), (unsigned long long)have, what, kv_dtype == MM_F16 ? "" : " or --kv f16");
}

/* ============================================================================================
 * Building blocks
 * ============================================================================================ */

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        float v = ldexpf((float)man, -24);
        return sign ? -v : v;
    }
    bits = exp == 0x1f ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Row r of a q8_0 matrix gathered from its panel: codes [cols], scales [cols / 32] */
static void q8_row(const Matrix *w, int r, int8_t *codes, float *scales) {
    int cols = w->cols, i = r % MM_Q8_PANEL;
    const uint8_t *panel = (const uint8_t *)w->data + (size_t)(r / MM_Q8_PANEL) * q8_panel_bytes((uint64_t)cols);
    for (int c = 0; c < cols; c++) codes[c] = (int8_t)panel[(size_t)(c / 4) * 4 * MM_Q8_PANEL + 4 * i + c % 4];
    const uint8_t *half = panel + (size_t)MM_Q8_PANEL * cols;
    for (int g = 0; g < cols / MM_Q8_GROUP; g++) {
        uint16_t h;
        memcpy(&h, half + 2 * ((size_t)g * MM_Q8_PANEL + i), 2);
        scales[g] = f16_to_f32(h);
    }
}

/* Row r of a weight matrix as f32: a pointer into the file for f32, else converted into buf. */
static const float *matrix_row(const Matrix *w, int r, float *buf) {
    size_t at = (size_t)r * w->cols;
    switch (w->dtype) {
    case MM_F32: return (const float *)w->data + at;
    case MM_F16: {
        const uint16_t *p = (const uint16_t *)w->data + at;
        for (int c = 0; c < w->cols; c++) buf[c] = f16_to_f32(p[c]);
        return buf;
    }
    case MM_BF16: {
        const uint16_t *p = (const uint16_t *)w->data + at;
        for (int c = 0; c < w->cols; c++) buf[c] = bf16_to_f32(p[c]);
        return buf;
    }
    default: { /* MM_Q8_0: buf holds the codes (cols bytes), the scales, then the values */
        int8_t *codes = (int8_t *)buf;
        float *scales = buf + w->cols / 4, *values = scales + w->cols / MM_Q8_GROUP;
        q8_row(w, r, codes, scales);
        for (int c = 0; c < w->cols; c++) values[c] = scales[c / MM_Q8_GROUP] * (float)codes[c];
        return values;
    }
    }
}

static float dot(const float *a, const float *b, int n) {
    float sum = 0;
    #pragma omp simd reduction(+:sum)  /* vector lanes of partial sums (-fopenmp-simd) */
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* ---- q8_0 activations: x quantised per group of 32 like the weights, so that a q8_0 matrix
 * times a vector is integer dot products per group and two scales ---- */

/* q[i] = round(x[i] / d) with d = max|x| / 127 over each group of 32; n is a multiple of 32 */
static void quantize_q8_ref(int8_t *q, float *scale, const float *x, int n) {
    for (int g = 0; g < n / MM_Q8_GROUP; g++) {
        const float *xg = x + (size_t)g * MM_Q8_GROUP;
        float amax = 0;
        for (int i = 0; i < MM_Q8_GROUP; i++) amax = fmaxf(amax, fabsf(xg[i]));
        float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
        for (int i = 0; i < MM_Q8_GROUP; i++) q[g * MM_Q8_GROUP + i] = (int8_t)nearbyintf(xg[i] * id);
        scale[g] = d;
    }
}

/* w . x for a q8_0 weight row and a q8_0 activation row: exact int32 per group, then scales */
static float dot_q8_ref(const int8_t *w, const float *w_scale, const int8_t *x, const float *x_scale, int n) {
    float sum = 0;
    for (int g = 0; g < n / MM_Q8_GROUP; g++) {
        int32_t isum = 0;
        for (int i = 0; i < MM_Q8_GROUP; i++) isum += (int32_t)w[g * MM_Q8_GROUP + i] * x[g * MM_Q8_GROUP + i];
        sum += (float)isum * (w_scale[g] * x_scale[g]);
    }
    return sum;
}

/* ---- matmul, the plain reference: out[t, r] = W[r, :] . x[t, :] for rows r0..r1, every token.
 * x: [n, W.cols], out: [n, W.rows]. Each weight row is converted once for the whole block. ---- */
static void matmul_rows_ref(float *out, const float *x, const Matrix *w, int n, int r0, int r1, float *buf) {
    for (int r = r0; r < r1; r++) {
        const float *row = matrix_row(w, r, buf);
        for (int t = 0; t < n; t++) out[(size_t)t * w->rows + r] = dot(row, x + (size_t)t * w->cols, w->cols);
    }
}

/* the same for q8_0 weights with activations already quantised: xq [n, cols], xs [n, cols/32];
 * buf: room for a row's codes and scales */
static void matmul_rows_q8_ref(float *out, const int8_t *xq, const float *xs, const Matrix *w, int n,
                               int r0, int r1, float *buf) {
    int cols = w->cols, groups = cols / MM_Q8_GROUP;
    int8_t *codes = (int8_t *)buf;
    float *scales = buf + cols / 4;
    for (int r = r0; r < r1; r++) {
        q8_row(w, r, codes, scales);
        for (int t = 0; t < n; t++)
            out[(size_t)t * w->rows + r] = dot_q8_ref(codes, scales, xq + (size_t)t * cols, xs + (size_t)t * groups, cols);
    }
}

/* ---- matmul, the fast path (x86-64: AVX-512 where the compiler targets it, else AVX2 + FMA +
 * F16C; aarch64: NEON, with the dot-product instructions where the compiler targets them; other
 * machines use the reference) ----
 * A register tile of TILE_ROWS weight rows x TILE_TOKENS tokens: each weight vector loaded is
 * used for every token of the tile, each activation vector for every row. Every output element
 * is its own chain of VL-lane FMAs over each K_CHUNK of columns, a fixed horizontal sum per chunk,
 * and the chunks added in order, so its value does not depend on the tile shape or the thread
 * that computes it. (One token, and prompt blocks of OP_MIN_TOKENS or more, take the other two
 * forms below: each is its own fixed order too, so results never depend on the thread count.) */
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* The vector layer: the few operations the kernels use, on a vector of VL floats (vf), and f4, a
 * vector of 4 (a tile's four row sums). The kernels below are written once over it; only this
 * block knows the instruction set. Each also sets the tile shapes its register count allows:
 * TILE_TOKENS (the dot-product tiles of 2-15 tokens, TILE_ROWS x TILE_TOKENS accumulators),
 * OP_ROWS (prompt tiles, OP_ROWS x 2 vectors), SCORE_QUERIES (attention scores, SCORE_QUERIES x
 * KEY_BLOCK / VL) and PV_VECS (attention P.V, 4 x PV_VECS). The tile dispatches below are written
 * for the values used (asserted after the block). */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_SIMD 1
typedef __m128 f4;
static ALWAYS_INLINE f4 f4_load(const float *p) { return _mm_loadu_ps(p); }
static ALWAYS_INLINE void f4_store(float *p, f4 v) { _mm_storeu_ps(p, v); }
static ALWAYS_INLINE f4 f4_add(f4 a, f4 b) { return _mm_add_ps(a, b); }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KERNELS "avx512"
#define HAVE_AVX512 1
enum { VL = 16, TILE_ROWS = ROW_BLOCK };  /* vf_hsum4 sums a tile of four rows */
#define TILE_TOKENS 6       /* 24 of the 32 registers accumulate */
#define OP_ROWS PANEL_ROWS  /* 24 accumulators + 2 activation vectors + 1 broadcast of 32 registers */
#define SCORE_QUERIES 8     /* attention scores: 8 queries x 16 keys, 8 accumulators */
#define PV_VECS 6           /* 4 rows x 6 vectors: 24 accumulators, head_dim 96 in one pass over the values */
typedef __m512 vf;
static ALWAYS_INLINE vf vf_zero(void) { return _mm512_setzero_ps(); }
static ALWAYS_INLINE vf vf_set1(float a) { return _mm512_set1_ps(a); }
static ALWAYS_INLINE vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static ALWAYS_INLINE void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
static ALWAYS_INLINE vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static ALWAYS_INLINE vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static ALWAYS_INLINE vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static ALWAYS_INLINE vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
static ALWAYS_INLINE vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }
static ALWAYS_INLINE vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static ALWAYS_INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }    /* a b + c */
static ALWAYS_INLINE vf vf_fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  /* c - a b */
static ALWAYS_INLINE float vf_hsum(vf v) { return _mm512_reduce_add_ps(v); }
static ALWAYS_INLINE float vf_hmax(vf v) { return _mm512_reduce_max_ps(v); }
static ALWAYS_INLINE f4 vf_hsum4(vf a, vf b, vf c, vf d) {  /* [sum a, sum b, sum c, sum d] */
    vf ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  /* a b a b per 128 bits */
    vf cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    vf abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                            _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
static ALWAYS_INLINE vf vf_round(vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static ALWAYS_INLINE vf vf_exp2i(vf k) {  /* 2^k for whole k in [-126, 127]: k + 127 in the exponent */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23));
}
static ALWAYS_INLINE vf vf_load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static ALWAYS_INLINE vf vf_load_bf16(const uint16_t *p) {  /* bf16 is the top half of an f32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#else
#ifdef __AVXVNNI__
#define KERNELS "avx2-vnni"  /* (q8_0 tiles by AVX-VNNI) */
#else
#define KERNELS "avx2"
#endif
enum { VL = 8, TILE_ROWS = ROW_BLOCK };
#define TILE_TOKENS 3       /* 12 of the 16 registers accumulate */
#define OP_ROWS 6           /* 12 + 2 + 1 of 16 */
#define SCORE_QUERIES 4     /* 4 queries x 16 keys: 8 accumulators */
#define PV_VECS 2           /* 4 x 2 of 16 registers */
typedef __m256 vf;
static ALWAYS_INLINE vf vf_zero(void) { return _mm256_setzero_ps(); }
static ALWAYS_INLINE vf vf_set1(float a) { return _mm256_set1_ps(a); }
static ALWAYS_INLINE vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static ALWAYS_INLINE void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
static ALWAYS_INLINE vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static ALWAYS_INLINE vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static ALWAYS_INLINE vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static ALWAYS_INLINE vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
static ALWAYS_INLINE vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
static ALWAYS_INLINE vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static ALWAYS_INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static ALWAYS_INLINE vf vf_fnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static ALWAYS_INLINE float vf_hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static ALWAYS_INLINE float vf_hmax(vf v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static ALWAYS_INLINE f4 vf_hsum4(vf a, vf b, vf c, vf d) {
    vf ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    vf cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    vf abcd = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))),
                            _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
static ALWAYS_INLINE vf vf_round(vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static ALWAYS_INLINE vf vf_exp2i(vf k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
}
static ALWAYS_INLINE vf vf_load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static ALWAYS_INLINE vf vf_load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define HAVE_SIMD 1
#define HAVE_NEON 1
#ifdef __ARM_FEATURE_DOTPROD
#define KERNELS "neon-dotprod"
#else
#define KERNELS "neon"
#endif
enum { VL = 4, TILE_ROWS = ROW_BLOCK };
#define TILE_TOKENS 6       /* 24 of the 32 registers accumulate */
#define OP_ROWS PANEL_ROWS  /* 24 + 2 + 1 of 32 */
#define SCORE_QUERIES 4     /* 4 queries x 16 keys: 16 accumulators */
#define PV_VECS 6           /* 4 x 6: 24 accumulators */
typedef float32x4_t vf;
typedef float32x4_t f4;
static ALWAYS_INLINE f4 f4_load(const float *p) { return vld1q_f32(p); }
static ALWAYS_INLINE void f4_store(float *p, f4 v) { vst1q_f32(p, v); }
static ALWAYS_INLINE f4 f4_add(f4 a, f4 b) { return vaddq_f32(a, b); }
static ALWAYS_INLINE vf vf_zero(void) { return vdupq_n_f32(0.0f); }
static ALWAYS_INLINE vf vf_set1(float a) { return vdupq_n_f32(a); }
static ALWAYS_INLINE vf vf_load(const float *p) { return vld1q_f32(p); }
static ALWAYS_INLINE void vf_store(float *p, vf v) { vst1q_f32(p, v); }
static ALWAYS_INLINE vf vf_add(vf a, vf b) { return vaddq_f32(a, b); }
static ALWAYS_INLINE vf vf_sub(vf a, vf b) { return vsubq_f32(a, b); }
static ALWAYS_INLINE vf vf_mul(vf a, vf b) { return vmulq_f32(a, b); }
static ALWAYS_INLINE vf vf_div(vf a, vf b) { return vdivq_f32(a, b); }
static ALWAYS_INLINE vf vf_min(vf a, vf b) { return vminq_f32(a, b); }
static ALWAYS_INLINE vf vf_max(vf a, vf b) { return vmaxq_f32(a, b); }
static ALWAYS_INLINE vf vf_fmadd(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static ALWAYS_INLINE vf vf_fnmadd(vf a, vf b, vf c) { return vfmsq_f32(c, a, b); }
static ALWAYS_INLINE float vf_hsum(vf v) { return vaddvq_f32(v); }
static ALWAYS_INLINE float vf_hmax(vf v) { return vmaxvq_f32(v); }
static ALWAYS_INLINE f4 vf_hsum4(vf a, vf b, vf c, vf d) { return vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d)); }
static ALWAYS_INLINE vf vf_round(vf v) { return vrndnq_f32(v); }  /* to nearest, ties to even */
static ALWAYS_INLINE vf vf_exp2i(vf k) {
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(k), vdupq_n_s32(127)), 23));
}
static ALWAYS_INLINE vf vf_load_f16(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
static ALWAYS_INLINE vf vf_load_bf16(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
#endif

#ifdef HAVE_SIMD

_Static_assert(TILE_ROWS == 4, "the tile epilogue sums four rows at once (vf_hsum4)");
_Static_assert((TILE_TOKENS == 3 || TILE_TOKENS == 6) && (SCORE_QUERIES == 4 || SCORE_QUERIES == 8) &&
               (PV_VECS == 2 || PV_VECS == 6), "the switches of matmul_block, BY_QUERIES and pv_tiles cover these");

/* v, as a value the compiler must keep in a register: a vector loaded once for several FMAs is
 * otherwise often folded into each of them as a memory operand, which loads it again every time */
static ALWAYS_INLINE vf vf_keep(vf v) {
#ifdef HAVE_NEON
    __asm__("" : "+w"(v));  /* (a SIMD register) */
#else
    __asm__("" : "+v"(v));
#endif
    return v;
}

/* a hint to bring the cache line at p in before it is read (never a fault, whatever p) */
static ALWAYS_INLINE void prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

/* the same for weights, which a token reads once each, start to end: dot_row (decoding f32, f16
 * and bf16) and q8_tile (q8_0 prompt blocks) prefetch WEIGHTS_AHEAD bytes ahead of their loads, with
 * the non-temporal hint, which keeps the stream from evicting the rest of the caches. The
 * hardware prefetcher alone left decoding short of the memory's speed, and a plain prefetch
 * (above) made f32 rows slower. One thread, alternated runs of ./run MODEL -m bench -n 128 -c 600
 * in one spell each (only the ratios carry over: this machine's speed moves 15-25% between
 * spells), none / plain 2 KB / this: minimind-3 f32 125 / 104 / 136 tokens/s (10 runs each);
 * minimind2 f16 107 / - / 159 (8); minimind2-small q8_0, decoded by q8_tile then (now by
 * q8_panel_token, which reads better without), 1090 / 1180 (plain 3 KB) / - (8) and - / 1355
 * (plain 3 KB) / 1484 (8); minimind-3 f16 within noise. */
#define WEIGHTS_AHEAD 2048
static ALWAYS_INLINE void prefetch_weights(const void *p) { __builtin_prefetch(p, 0, 0); }

/* exp(r) for r in [-87, 88.7], within 2 ulp of expf (and inf for r in [88.7, 89]): r = k ln2 + f with k = round(r / ln2) and f in
 * [-ln2/2, ln2/2] (ln2 in two parts, so f is exact), exp(f) by its Taylor polynomial, times 2^k */
static ALWAYS_INLINE vf vf_exp(vf r) {
    static const float c[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                               1.6666665459e-1f, 5.0000001201e-1f};  /* exp(f) - 1 - f, over f^2 */
    vf k = vf_round(vf_mul(r, vf_set1(1.44269504f)));
    vf f = vf_fnmadd(k, vf_set1(-2.12194440e-4f), vf_fnmadd(k, vf_set1(0.693359375f), r));
    vf y = vf_set1(c[0]);
    for (int j = 1; j < 6; j++) y = vf_fmadd(y, f, vf_set1(c[j]));
    return vf_mul(vf_fmadd(y, vf_mul(f, f), vf_add(f, vf_set1(1.0f))), vf_exp2i(k));
}

/* VL weights from element i of p, as f32 */
static ALWAYS_INLINE vf load_w(int dtype, const void *p, size_t i) {
    if (dtype == MM_F32) return vf_load((const float *)p + i);
    if (dtype == MM_F16) return vf_load_f16((const uint16_t *)p + i);
    return vf_load_bf16((const uint16_t *)p + i);
}

static ALWAYS_INLINE float load1(int dtype, const void *p, size_t i) {
    if (dtype == MM_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return dtype == MM_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

/* out[t * ldo + r] (+)= w[r, :K] . x[t, :K] for r < R, t < T; w rows ldw elements apart (f32/f16/bf16),
 * x rows ldx apart; add: accumulate onto out (a later chunk of the columns) */
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

/* w[:K] . x[:K] for one row when decoding a single token: the rows are read one after another, a
 * single stream through memory (four rows at a time, it is four short streams), prefetched ahead
 * (prefetch_weights), with four chains of FMAs so that their latency is hidden */
static ALWAYS_INLINE float dot_row(int dtype, const void *w, const float *x, int K) {
    vf acc[4] = {vf_zero(), vf_zero(), vf_zero(), vf_zero()};
    int k = 0;
    size_t elem = dtype == MM_F32 ? 4 : 2;
    for (; k + 4 * VL <= K; k += 4 * VL) {
        for (size_t b = 0; b < 4 * VL * elem; b += 64) prefetch_weights((const uint8_t *)w + k * elem + WEIGHTS_AHEAD + b);
        for (int j = 0; j < 4; j++) acc[j] = vf_fmadd(load_w(dtype, w, (size_t)(k + j * VL)), vf_load(x + k + j * VL), acc[j]);
    }
    for (; k + VL <= K; k += VL) acc[0] = vf_fmadd(load_w(dtype, w, (size_t)k), vf_load(x + k), acc[0]);
    float sum = vf_hsum(vf_add(vf_add(acc[0], acc[1]), vf_add(acc[2], acc[3])));
    for (; k < K; k++) sum += load1(dtype, w, (size_t)k) * x[k];
    return sum;
}

/* rows r0 .. r0+R (R <= TILE_ROWS) of out (+)= W x over kc columns, every token: w points at row r0
 * of those columns (rows ldw apart), x at the same columns of token 0 (rows ldx apart) */
static ALWAYS_INLINE void matmul_block_simd(float *out, int ldo, const float *x, int ldx, int n, int dtype,
                                            const void *w, int ldw, int kc, int r0, int R, bool add) {
    float *o = out + r0;
    if (n == 1) {  /* decoding: bound by reading the weights */
        for (int r = 0; r < R; r++) {
            float sum = dot_row(dtype, (const uint8_t *)w + (size_t)r * ldw * (dtype == MM_F32 ? 4 : 2), x, kc);
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
 * bf16 weights are converted a panel of OP_ROWS rows at a time, once per prompt block. (q8_0
 * matrices have integer tiles of their own, below, for any number of tokens.) */
enum { OP_TOKENS = 2 * VL };
_Static_assert(OP_ROWS <= PANEL_ROWS && OP_TOKENS <= XT_TOKENS, "the panel and xT buffers hold a tile");

/* out[t * ldo + r] = w[r, :K] . x[t, :K] for r < R, t < T (T <= V VL <= OP_TOKENS): w f32 rows ldw
 * apart, xT the columns' activations ldxT apart from this tile's first token; V: vectors of tokens
 * used */
static ALWAYS_INLINE void op_tile(float *out, int ldo, const float *w, int ldw, const float *xT, int ldxT, int K,
                                  const int R, const int V, int T) {
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
static __attribute__((noinline)) void op_tile_full(float *out, int ldo, const float *w, int ldw, const float *xT,
                                                   int ldxT, int K, int T) {
    op_tile(out, ldo, w, ldw, xT, ldxT, K, OP_ROWS, 2, T);
}

/* rows r0 .. r1 of out = W x for the n tokens whose x is in xT ([W.cols, ldxT]) */
static void op_rows(float *out, const Matrix *w, const float *xT, int ldxT, int n, int r0, int r1, float *buf) {
    int cols = w->cols;
    for (int r = r0; r < r1; r += OP_ROWS) {
        int R = r1 - r < OP_ROWS ? r1 - r : OP_ROWS;
        const float *panel = (const float *)w->data + (size_t)r * cols;
        if (w->dtype != MM_F32) {  /* the panel's rows converted once, used by every token */
            for (int i = 0; i < R; i++) {
                float *dst = buf + (size_t)i * cols;
                const void *src = (const uint16_t *)w->data + (size_t)(r + i) * cols;
                int c = 0;
                for (; c + VL <= cols; c += VL) vf_store(dst + c, load_w(w->dtype, src, (size_t)c));
                for (; c < cols; c++) dst[c] = load1(w->dtype, src, (size_t)c);
            }
            panel = buf;
        }
        for (int t = 0; t < n; t += OP_TOKENS) {
            int T = n - t < OP_TOKENS ? n - t : OP_TOKENS;
            float *o = out + (size_t)t * w->rows + r;
            const float *xt = xT + t;
            if (R == OP_ROWS && T > VL) { op_tile_full(o, w->rows, panel, cols, xt, ldxT, cols, T); continue; }
            /* the last rows (a thread's share ends on a multiple of 4, a matrix maybe not), or a
             * last run of at most VL tokens: tiles of 4 rows, then of 1 */
            int i = 0;
            for (; i + 4 <= R; i += 4) {
                if (T > VL) op_tile(o + i, w->rows, panel + (size_t)i * cols, cols, xt, ldxT, cols, 4, 2, T);
                else op_tile(o + i, w->rows, panel + (size_t)i * cols, cols, xt, ldxT, cols, 4, 1, T);
            }
            for (; i < R; i++) {
                if (T > VL) op_tile(o + i, w->rows, panel + (size_t)i * cols, cols, xt, ldxT, cols, 1, 2, T);
                else op_tile(o + i, w->rows, panel + (size_t)i * cols, cols, xt, ldxT, cols, 1, 1, T);
            }
        }
    }
}

#ifdef __AVX2__
/* the q8_0 activations of n rows of x (the fast twin of quantize_q8_ref: the same codes); AVX2, which
 * an AVX-512 machine runs too (NEON builds run the reference: it is a small part of a matmul's time) */
static void quantize_q8_avx2(int8_t *q, float *scale, const float *x, int n) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    for (int g = 0; g < n / MM_Q8_GROUP; g++) {
        const float *xg = x + (size_t)g * MM_Q8_GROUP;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(xg + 8 * j);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign_bit, v[j]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float d = _mm_cvtss_f32(m4) / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
        __m256i i32[4];
        for (int j = 0; j < 4; j++) i32[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(id)));
        /* 32-bit -> 8-bit packs work within 128-bit lanes: put the bytes back in order */
        __m256i i16a = _mm256_packs_epi32(i32[0], i32[1]), i16b = _mm256_packs_epi32(i32[2], i32[3]);
        __m256i i8 = _mm256_packs_epi16(i16a, i16b);
        i8 = _mm256_permutevar8x32_epi32(i8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + (size_t)g * MM_Q8_GROUP), i8);
        scale[g] = d;
    }
}
#endif

/* ---- q8_0 matmul: integer tiles over the panels of the file (one token: panel by panel) ----
 * Lanes are weight rows. A panel stores 4 consecutive columns of its 16 rows in 64 bytes
 * (model.h), so one vector load holds 4 weight bytes of each of Q8_LANES rows; one token's 4
 * activation codes at those columns are broadcast, and each lane sums its 4 byte products into its
 * int32. After each group of 32 columns the exact int32 sums are scaled by their two scales (the
 * row's, the token's) and added in f32: the terms of dot_q8_ref in its order (an FMA rounds once
 * where it rounds twice). A tile is Q8_TILE_ROWS = 2 vectors of rows x up to Q8_TILE_TOKENS tokens;
 * a token decoding takes a panel at a time (q8_panel_token), in the same order; no horizontal sums
 * anywhere.
 * The byte products need one unsigned operand. AVX-512 VNNI: vpdpbusd on the weights + 128 (an
 * xor), which adds 128 x the token's sum of the group's codes to every lane: each int32 sum starts
 * at minus that (xqsum); AVX-VNNI, in AVX2 builds for the machines that have it, the same on 256
 * bits. Plain AVX2: maddubs on |w| and x with w's sign (the sign trick: |w| <= 128 and
 * |x| <= 127, so the pairs never saturate), then madd sums the pairs. NEON multiplies signed bytes:
 * sdot where the machine has it (ARMv8.2's dot product), else smull into 16 bits and two pairwise
 * sums. */
#if defined(HAVE_AVX512) && defined(__AVX512VNNI__)
#define Q8_VNNI 1
#define Q8_LANES 16       /* rows per vector */
#define Q8_TILE_TOKENS 6  /* of 32 registers: 12 int32 sums, 12 f32 sums, 2 x 2 weights */
typedef __m512i qi;
typedef __m512 qf;
static ALWAYS_INLINE qi qi_load(const uint8_t *p) { return _mm512_loadu_si512(p); }
static ALWAYS_INLINE qi qi_set1(int32_t a) { return _mm512_set1_epi32(a); }
static ALWAYS_INLINE qi qi_unsigned(qi w) { return _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80)); }
/* acc + the 4 byte products of each lane: wu = qi_unsigned(w) */
static ALWAYS_INLINE qi qi_dot4(qi acc, qi w, qi wu, qi x4) { (void)w; return _mm512_dpbusd_epi32(acc, wu, x4); }
static ALWAYS_INLINE qf qf_scales(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static ALWAYS_INLINE qf qf_set1(float a) { return _mm512_set1_ps(a); }
static ALWAYS_INLINE qf qf_zero(void) { return _mm512_setzero_ps(); }
static ALWAYS_INLINE qf qf_fmadd_i(qi a, qf b, qf c) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), b, c); }
static ALWAYS_INLINE qf qf_mul(qf a, qf b) { return _mm512_mul_ps(a, b); }
static ALWAYS_INLINE void qf_store(float *p, qf v) { _mm512_storeu_ps(p, v); }
#elif defined(HAVE_NEON)
#define Q8_VNNI 0
#define Q8_LANES 4
#define Q8_TILE_TOKENS 6  /* of 32 registers: 12 int32 sums, 12 f32 sums, 2 weights, a broadcast */
typedef int32x4_t qi;     /* 4 int32 sums, or 16 bytes: 4 of each of 4 rows */
typedef float32x4_t qf;
static ALWAYS_INLINE qi qi_load(const uint8_t *p) { return vreinterpretq_s32_u8(vld1q_u8(p)); }
static ALWAYS_INLINE qi qi_set1(int32_t a) { return vdupq_n_s32(a); }
static ALWAYS_INLINE qi qi_unsigned(qi w) { return w; }  /* (signed products: nothing to do) */
static ALWAYS_INLINE qi qi_dot4(qi acc, qi w, qi wu, qi x4) {
    (void)wu;
    int8x16_t w8 = vreinterpretq_s8_s32(w), x8 = vreinterpretq_s8_s32(x4);
#ifdef __ARM_FEATURE_DOTPROD
    return vdotq_s32(acc, w8, x8);
#else
    int16x8_t lo = vmull_s8(vget_low_s8(w8), vget_low_s8(x8)), hi = vmull_high_s8(w8, x8);  /* rows 0-1, 2-3 */
    return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
#endif
}
static ALWAYS_INLINE qf qf_scales(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
static ALWAYS_INLINE qf qf_set1(float a) { return vdupq_n_f32(a); }
static ALWAYS_INLINE qf qf_zero(void) { return vdupq_n_f32(0.0f); }
static ALWAYS_INLINE qf qf_fmadd_i(qi a, qf b, qf c) { return vfmaq_f32(c, vcvtq_f32_s32(a), b); }
static ALWAYS_INLINE qf qf_mul(qf a, qf b) { return vmulq_f32(a, b); }
static ALWAYS_INLINE void qf_store(float *p, qf v) { vst1q_f32(p, v); }
#else  /* 256-bit vectors: the AVX2 build, and AVX-512 without VNNI */
#define Q8_LANES 8
typedef __m256i qi;
typedef __m256 qf;
static ALWAYS_INLINE qi qi_load(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static ALWAYS_INLINE qi qi_set1(int32_t a) { return _mm256_set1_epi32(a); }
#ifdef __AVXVNNI__  /* AVX-VNNI (Alder Lake and later, Zen 5): VNNI's vpdpbusd on 256 bits */
#define Q8_VNNI 1
#define Q8_TILE_TOKENS 3  /* of 16 registers: 6 int32 sums, 6 f32 sums, 2 weights, a broadcast */
static ALWAYS_INLINE qi qi_unsigned(qi w) { return _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)); }
static ALWAYS_INLINE qi qi_dot4(qi acc, qi w, qi wu, qi x4) { (void)w; return _mm256_dpbusd_avx_epi32(acc, wu, x4); }
#else
#define Q8_VNNI 0
#define Q8_TILE_TOKENS 2  /* of 16 registers: 8 sums, 2 x 2 weights, a broadcast */
static ALWAYS_INLINE qi qi_unsigned(qi w) { return _mm256_sign_epi8(w, w); }  /* |w| */
static ALWAYS_INLINE qi qi_dot4(qi acc, qi w, qi wu, qi x4) {
    __m256i pairs = _mm256_maddubs_epi16(wu, _mm256_sign_epi8(x4, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif
static ALWAYS_INLINE qf qf_scales(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static ALWAYS_INLINE qf qf_set1(float a) { return _mm256_set1_ps(a); }
static ALWAYS_INLINE qf qf_zero(void) { return _mm256_setzero_ps(); }
static ALWAYS_INLINE qf qf_fmadd_i(qi a, qf b, qf c) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), b, c); }
static ALWAYS_INLINE qf qf_mul(qf a, qf b) { return _mm256_mul_ps(a, b); }
static ALWAYS_INLINE void qf_store(float *p, qf v) { _mm256_storeu_ps(p, v); }
#endif
#define Q8_TILE_ROWS (2 * Q8_LANES)
/* a thread's share of rows is whole blocks: whole tiles, and whole panels for decoding (below) */
#define Q8_BLOCK_ROWS (Q8_TILE_ROWS > MM_Q8_PANEL ? Q8_TILE_ROWS : MM_Q8_PANEL)
_Static_assert(MM_Q8_PANEL % Q8_LANES == 0, "a vector of rows lies within one panel");
_Static_assert(Q8_TILE_TOKENS == 2 || Q8_TILE_TOKENS == 3 || Q8_TILE_TOKENS == 6, "q8_rows' switch covers these");

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
        for (int t = 0; t < T; t++) isum[0][t] = isum[1][t] = qi_set1(Q8_VNNI ? xqsum[(size_t)t * groups + g] : 0);
        #pragma GCC unroll 8
        for (int j = 0; j < MM_Q8_GROUP / 4; j++) {
            size_t at = ((size_t)g * MM_Q8_GROUP / 4 + j) * 4 * MM_Q8_PANEL;
            prefetch_weights(code[0] + at + WEIGHTS_AHEAD);
            if (Q8_TILE_ROWS > MM_Q8_PANEL) prefetch_weights(code[1] + at + WEIGHTS_AHEAD);  /* (else the same 64 bytes) */
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
        qf s0 = qf_scales(scale[0] + (size_t)g * MM_Q8_PANEL), s1 = qf_scales(scale[1] + (size_t)g * MM_Q8_PANEL);
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
 * integer sums wait in `sums` (in L1) until the scales come by. On AVX-512, q8_tile's 32 rows
 * are two panels, whose codes and scales it read at once (four streams): one token of minimind2
 * q8_0 at one thread that way was 15% slower (alternated ./run MODEL -m bench -n 128 -c 600, 8
 * runs each: 287 / 336 tokens/s; minimind-3 and minimind2-small within noise), and prefetching
 * ahead here cost 8% (308). */
#define Q8_PANEL_VECS (MM_Q8_PANEL / Q8_LANES)
#define Q8_SUMS_GROUPS 128       /* groups of integer sums held at once (8 KB): longer rows take turns */
static ALWAYS_INLINE void q8_panel_token(float *out, const Matrix *w, int r0, int R, const int8_t *xq,
                                         const float *xs, const int32_t *xqsum) {
    int cols = w->cols, groups = cols / MM_Q8_GROUP;
    const uint8_t *panel = (const uint8_t *)w->data + (size_t)(r0 / MM_Q8_PANEL) * q8_panel_bytes((uint64_t)cols);
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
                acc[v] = qf_fmadd_i(sums[g - g0][v], qf_mul(qf_scales(scale + (size_t)g * MM_Q8_PANEL + v * Q8_LANES), sx), acc[v]);
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
#else
#define KERNELS "portable"
#endif

#define K_CHUNK 512              /* columns per pass of an f32-activation matmul (multiple of 32) */
#define OP_MIN_TOKENS 16         /* prompt blocks of this many tokens take the outer-product form */

/* --ref-kernels: every matmul and attention through the plain reference, for testing */
static bool reference_kernels = false;

static void quantize_q8(int8_t *q, float *scale, const float *x, int n) {
#if defined(HAVE_SIMD) && defined(__AVX2__)
    if (!reference_kernels) { quantize_q8_avx2(q, scale, x, n); return; }
#endif
    quantize_q8_ref(q, scale, x, n);
}

/* rows r0 .. r0+R of out = W x, every token: the fast kernels, or the reference. The fast path
 * for f32-activation prefill blocks takes the columns in chunks (k0, kc) and accumulates, see
 * matmuls. q8_0 matrices multiply the activations' codes (s->xq, s->xs, s->xqsum), whole rows at
 * once. */
static void matmul_block(float *out, const float *x, const Matrix *w, int n, int r0, int R, int k0, int kc,
                         const State *s, float *buf) {
    int rows = w->rows, cols = w->cols;
#ifdef HAVE_SIMD
    if (!reference_kernels) {
        if (w->dtype == MM_Q8_0) {
            q8_rows(out, w, s->xq, s->xs, s->xqsum, n, r0, r0 + R);
            return;
        }
        bool add = k0 > 0;
        /* one instance per dtype, so that the weight loads are decided at compile time */
        const uint8_t *w0 = (const uint8_t *)w->data + ((size_t)r0 * cols + k0) * (w->dtype == MM_F32 ? 4 : 2);
        if (w->dtype == MM_F32) matmul_block_simd(out, rows, x + k0, cols, n, MM_F32, w0, cols, kc, r0, R, add);
        else if (w->dtype == MM_F16) matmul_block_simd(out, rows, x + k0, cols, n, MM_F16, w0, cols, kc, r0, R, add);
        else matmul_block_simd(out, rows, x + k0, cols, n, MM_BF16, w0, cols, kc, r0, R, add);
        return;
    }
#endif
    (void)rows, (void)cols, (void)k0, (void)kc;
    if (w->dtype == MM_Q8_0) matmul_rows_q8_ref(out, s->xq, s->xs, w, n, r0, r0 + R, buf);
    else matmul_rows_ref(out, x, w, n, r0, r0 + R, buf);
}

/* one matrix of a matmuls call: out = W x */
typedef struct { float *out; const Matrix *w; } MatmulJob;

/* the codes of token t's activations x[t] for the q8_0 kernels: s->xq, s->xs and, for VNNI, which
 * multiplies w + 128 (q8_tile, q8_panel_token), minus 128 x each group's codes (s->xqsum) */
static void quantize_token(State *s, const float *x, int t, int cols, bool want_xqsum) {
    int groups = cols / MM_Q8_GROUP;
    int8_t *xq = s->xq + (size_t)t * cols;
    quantize_q8(xq, s->xs + (size_t)t * groups, x + (size_t)t * cols, cols);
    for (int g = 0; want_xqsum && g < groups; g++) {
        int32_t sum = 0;
        for (int i = 0; i < MM_Q8_GROUP; i++) sum += xq[g * MM_Q8_GROUP + i];
        s->xqsum[(size_t)t * groups + g] = -128 * sum;
    }
}

/* How matmuls (below) shares out the rows of its matrices outside prompt blocks: numbered through
 * the matrices in order, in blocks of block_rows (ROW_BLOCK, or Q8_BLOCK_ROWS), each thread has a
 * contiguous share of the blocks. When the call's weights come to STEAL_MIN_BYTES or more a
 * thread, the blocks are cut into pieces of at most PIECE_BYTES of weights (or one block, if that
 * is more), and a thread that has done its own pieces takes pieces that another has not begun
 * (next_piece). Smaller calls keep fixed shares: the cache lines of the ranges passing between
 * the cores cost more than stealing won back (minimind2-small q8_0 at two threads, every call in
 * pieces: 2588 -> 2401 tokens/s, about a microsecond a call). */
#define PIECE_BYTES 65536
#define STEAL_MIN_BYTES (2 << 20)
typedef struct {
    int block_rows, first_block[4], blocks;  /* first_block[j]: matrix j's first block */
    bool steal;                   /* handed out in pieces, with stealing */
    int piece_blocks, n_pieces;   /* blocks a piece, pieces in all */
    int n_ranges;                 /* threads whose ranges of pieces matmuls set (n_threads(): the
                                     team may be smaller, and the others take what it leaves) */
} RowShares;

static uint64_t piece_range(uint32_t next, uint32_t end) { return (uint64_t)end << 32 | next; }

static RowShares row_shares(const MatmulJob *jobs, int n_jobs, int nth) {
    RowShares sh = {.block_rows = ROW_BLOCK, .n_ranges = nth};
#ifdef HAVE_SIMD
    if (jobs[0].w->dtype == MM_Q8_0 && !reference_kernels) sh.block_rows = Q8_BLOCK_ROWS;
#endif
    for (int j = 0; j < n_jobs; j++) {
        sh.first_block[j] = sh.blocks;
        sh.blocks += (jobs[j].w->rows + sh.block_rows - 1) / sh.block_rows;
    }
    /* (a q8_0 row's share of its panel: tensor_bytes counts q8_0 rows in whole panels) */
    uint64_t row_bytes = tensor_bytes((uint32_t)jobs[0].w->dtype, MM_Q8_PANEL, (uint64_t)jobs[0].w->cols) / MM_Q8_PANEL;
    uint64_t block_bytes = row_bytes * (uint64_t)sh.block_rows;
    sh.steal = nth > 1 && block_bytes * (uint64_t)sh.blocks >= (uint64_t)STEAL_MIN_BYTES * (uint64_t)nth;
    sh.piece_blocks = block_bytes >= PIECE_BYTES ? 1 : (int)(PIECE_BYTES / block_bytes);
    sh.n_pieces = (sh.blocks + sh.piece_blocks - 1) / sh.piece_blocks;
    return sh;
}

/* The next piece for thread id, or -1 when none is left. Each thread starts with a contiguous
 * range of pieces, about its fixed share, and takes them in order, one stream through memory;
 * once they are done it takes the last piece left in another thread's range. When the cores run
 * at one speed little moves (the first to finish may take the other's last piece). When one is
 * slower (other tenants of a shared machine), the other does more of the work instead of waiting
 * for it at the end of the region (with fixed shares, timers around the regions in a test build
 * had the faster of two threads idle for 8-13% of every matmul of a decoded token). */
static int next_piece(PieceRange *ranges, int n_ranges, int id) {
    for (int k = 0; k < n_ranges; k++) {
        _Atomic uint64_t *r = &ranges[(id + k) % n_ranges].next_end;
        bool own = k == 0;  /* the owner takes from the front, the others from the back */
        uint64_t v = atomic_load(r);
        for (;;) {
            uint32_t next = (uint32_t)v, end = (uint32_t)(v >> 32);
            if (next >= end) break;
            if (atomic_compare_exchange_weak(r, &v, own ? piece_range(next + 1, end) : piece_range(next, end - 1)))
                return (int)(own ? next : end - 1);
        }
    }
    return -1;
}

/* blocks b0..b1 of a matmuls call (out of RowShares' numbering) */
static void matmul_blocks(const MatmulJob *jobs, int n_jobs, const float *x, int n_tokens, State *s,
                          const RowShares *sh, int b0, int b1, int chunk, float *buf) {
    int cols = jobs[0].w->cols;
    for (int k0 = 0; k0 < cols; k0 += chunk)
        for (int b = b0; b < b1; b++) {
            int j = n_jobs - 1;
            while (b < sh->first_block[j]) j--;
            const Matrix *w = jobs[j].w;
            int r0 = (b - sh->first_block[j]) * sh->block_rows;
            int R = w->rows - r0 < sh->block_rows ? w->rows - r0 : sh->block_rows;
            matmul_block(jobs[j].out, x, w, n_tokens, r0, R, k0, cols - k0 < chunk ? cols - k0 : chunk, s, buf);
        }
}

/* thread id's share (of nth) of the rows of matmuls, below */
static void matmuls_share(const MatmulJob *jobs, int n_jobs, const float *x, int n_tokens, State *s,
                          const RowShares *sh, bool prompt, int id, int nth) {
    int cols = jobs[0].w->cols;
    bool q8 = jobs[0].w->dtype == MM_Q8_0;
    /* A prefill block of f32 activations below OP_MIN_TOKENS takes the columns K_CHUNK at a time,
     * all of a share's (or piece's) rows for each chunk: the chunk of every token's x (n_tokens x
     * K_CHUNK floats) stays in the L2 cache while the weights stream past it once. Each output
     * element still sums in a fixed order. */
    int chunk = cols;
    float *buf = s->row_buf + (size_t)id * s->row_buf_len;
#ifdef HAVE_SIMD
    if (!reference_kernels && !q8 && n_tokens > 1) chunk = K_CHUNK;  /* one token: whole rows, in order */
    /* prompt blocks: units of a few tiles, handed out as threads come free (the two cores of a
     * shared machine do not run at the same speed: fixed shares left one waiting for the other) */
    if (prompt) {
        int ldxT = (int)xT_width((size_t)n_tokens);
        int unit_rows = 4 * (q8 ? Q8_TILE_ROWS : OP_ROWS), first_unit[4], units = 0;
        for (int j = 0; j < n_jobs; j++) first_unit[j] = units, units += (jobs[j].w->rows + unit_rows - 1) / unit_rows;
        #pragma omp for schedule(dynamic, 1) nowait
        for (int u = 0; u < units; u++) {
            int j = n_jobs - 1;
            while (u < first_unit[j]) j--;
            int r0 = (u - first_unit[j]) * unit_rows, r1 = r0 + unit_rows < jobs[j].w->rows ? r0 + unit_rows : jobs[j].w->rows;
            if (q8) q8_rows(jobs[j].out, jobs[j].w, s->xq, s->xs, s->xqsum, n_tokens, r0, r1);
            else op_rows(jobs[j].out, jobs[j].w, s->xT, ldxT, n_tokens, r0, r1, buf);
        }
        return;
    }
#else
    (void)q8, (void)prompt;
#endif
    if (!sh->steal) {
        matmul_blocks(jobs, n_jobs, x, n_tokens, s, sh, (int)((long)sh->blocks * id / nth),
                      (int)((long)sh->blocks * (id + 1) / nth), chunk, buf);
        return;
    }
    for (int piece; (piece = next_piece(s->piece_ranges, sh->n_ranges, id)) >= 0;) {
        int b0 = piece * sh->piece_blocks, b1 = b0 + sh->piece_blocks < sh->blocks ? b0 + sh->piece_blocks : sh->blocks;
        matmul_blocks(jobs, n_jobs, x, n_tokens, s, sh, b0, b1, chunk, buf);
    }
}

/* out_j[t, r] = W_j[r, :] . x[t, :] for t < n_tokens, for a few matrices W_j that read the same x
 * (q, k, v; gate, up): one parallel region over all their rows, so one fork and join of the
 * threads. x: [n_tokens, cols], out_j: [n_tokens, W_j.rows]. Threads take contiguous shares of
 * blocks of rows, the larger calls in pieces with stealing (RowShares); prompt blocks go out in
 * units of a few tiles as threads come free. Every weight is read once per call, and each output
 * by one thread in a fixed order, so the bits do not depend on which thread it was.
 * At one thread the rows run without entering OpenMP, and so does a few tokens' quantisation at
 * any count: a region forks and joins even for one thread or a false if clause (libgomp makes a
 * team and wakes it with a system call, about 1 us here, and a token decoded at one thread
 * passed some 80 regions: minimind2-small q8_0 spent a tenth of its time there). */
static void matmuls(const MatmulJob *jobs, int n_jobs, const float *x, int n_tokens, State *s) {
    int cols = jobs[0].w->cols;
    bool q8 = jobs[0].w->dtype == MM_Q8_0;  /* the matrices of one call share a dtype (one layer's) */
    bool prompt = false;  /* a prompt block for the fast kernels: units handed out dynamically */
#ifdef HAVE_SIMD
    prompt = !reference_kernels && n_tokens >= OP_MIN_TOKENS;
#endif
    if (q8) {  /* the activations quantised once for every q8_0 matrix of the call */
        bool want_xqsum = false;
#if defined(HAVE_SIMD) && Q8_VNNI
        want_xqsum = !reference_kernels;
#endif
        if (n_tokens < OP_MIN_TOKENS)
            for (int t = 0; t < n_tokens; t++) quantize_token(s, x, t, cols, want_xqsum);
        else {
            #pragma omp parallel for
            for (int t = 0; t < n_tokens; t++) quantize_token(s, x, t, cols, want_xqsum);
        }
    }
#ifdef HAVE_SIMD
    int ldxT = (int)xT_width((size_t)n_tokens);
    if (prompt && !q8) {  /* the block's activations transposed once for every matrix of the call */
        #pragma omp parallel for
        for (int k = 0; k < cols; k++)
            for (int t = 0; t < ldxT; t++) s->xT[(size_t)k * ldxT + t] = t < n_tokens ? x[(size_t)t * cols + k] : 0.0f;
    }
#endif
    RowShares sh = row_shares(jobs, n_jobs, n_threads());
    for (int t = 0; sh.steal && !prompt && t < sh.n_ranges; t++)
        atomic_store(&s->piece_ranges[t].next_end, piece_range((uint32_t)((long)sh.n_pieces * t / sh.n_ranges),
                                                               (uint32_t)((long)sh.n_pieces * (t + 1) / sh.n_ranges)));
    if (n_threads() == 1) {
        matmuls_share(jobs, n_jobs, x, n_tokens, s, &sh, prompt, 0, 1);
        return;
    }
    #pragma omp parallel
    matmuls_share(jobs, n_jobs, x, n_tokens, s, &sh, prompt, thread_id(), team_size());
}

/* out[t, r] = W[r, :] . x[t, :] for t < n_tokens.  x: [n_tokens, W.cols], out: [n_tokens, W.rows] */
static void matmul(float *out, const float *x, const Matrix *w, int n_tokens, State *s) {
    matmuls(&(MatmulJob){out, w}, 1, x, n_tokens, s);
}

/* out = w * x / sqrt(mean(x^2) + eps), in fp32 */
static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) max = x[i] > max ? x[i] : max;
    float sum = 0;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - max); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

/* gate[i] = silu(gate[i]) * up[i] for i < n: SwiGLU's product */
static void swiglu(float *gate, const float *up, int n) {
    int i = 0;
#ifdef HAVE_SIMD
    if (!reference_kernels)
        for (; i + VL <= n; i += VL) {  /* exp(-x) clamped to [e^-87, inf]: silu is then x or -0 */
            vf x = vf_load(gate + i), e = vf_exp(vf_min(vf_max(vf_sub(vf_zero(), x), vf_set1(-87.0f)), vf_set1(89.0f)));
            vf_store(gate + i, vf_mul(vf_div(x, vf_add(vf_set1(1.0f), e)), vf_load(up + i)));
        }
#endif
    for (; i < n; i++) gate[i] = silu(gate[i]) * up[i];
}

/* cos/sin of position pos for every pair: the angle pos * inv_freq is rounded to fp32 first,
 * as upstream does, because at large positions that rounding shows in the logits */
static void rope_angles(float *cos_out, float *sin_out, const State *s, int pos, int half) {
    for (int i = 0; i < half; i++) {
        float angle = (float)pos * s->inv_freq[i];
        cos_out[i] = (float)cos((double)angle) * s->attn_factor;
        sin_out[i] = (float)sin((double)angle) * s->attn_factor;
    }
}

/* rotate-half RoPE on one head: pair (i, i + half) turns by angle i */
static void rope_rotate(float *v, const float *cos_, const float *sin_, int half) {
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos_[i] - b * sin_[i];
        v[i + half] = b * cos_[i] + a * sin_[i];
    }
}

/* ---- the KV cache: per layer and kv head, head_dim values per position, f32 or (--kv f16) f16;
 * values as rows, keys transposed in blocks (key_store, below) ---- */

/* f32 -> f16, rounding to nearest even (overflow to inf; the cache holds rotated k and v) */
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, mag = x & 0x7fffffff;
    if (mag >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (mag > 0x7f800000 ? 0x200 : 0));  /* inf, nan */
    if (mag >= 0x477ff000) return (uint16_t)(sign | 0x7c00);        /* rounds past 65504: inf */
    if (mag < 0x38800000) {                                          /* f16 subnormal or zero */
        float v = fabsf(f) * 16777216.0f;                            /* in units of 2^-24 */
        return (uint16_t)(sign | (uint16_t)nearbyintf(v));
    }
    uint32_t r = mag - 0x38000000;                                   /* rebias 127 -> 15, in place */
    r = (r + 0xfff + ((r >> 13) & 1)) >> 13;
    return (uint16_t)(sign | r);
}

/* n values of the value cache from element at, as f32: a pointer into an f32 cache, else converted */
static const float *value_row(const void *cache, int dtype, size_t at, int n, float *buf) {
    if (dtype == MM_F32) return (const float *)cache + at;
    const uint16_t *p = (const uint16_t *)cache + at;
    for (int i = 0; i < n; i++) buf[i] = f16_to_f32(p[i]);
    return buf;
}

static void value_store(void *cache, int dtype, size_t at, const float *x, int n) {
    if (dtype == MM_F32) { memcpy((float *)cache + at, x, (size_t)n * sizeof(float)); return; }
    uint16_t *p = (uint16_t *)cache + at;
    for (int i = 0; i < n; i++) p[i] = f32_to_f16(x[i]);
}

/* kv head g of layer l in the key or value cache: kv_len positions of head_dim values */
static void *kv_head(const State *s, void *cache, const mm_header *h, uint32_t l, int g) {
    size_t elem = s->kv_dtype == MM_F16 ? 2 : 4;
    return (uint8_t *)cache + ((size_t)l * h->n_kv_heads + (size_t)g) * s->kv_len * h->head_dim * elem;
}

/* Keys are stored transposed in blocks of KEY_BLOCK positions, [block][head_dim][KEY_BLOCK]: one
 * vector load holds dimension d of KEY_BLOCK keys, so the scores of KEY_BLOCK keys are head_dim
 * FMAs with no horizontal sums (attention_scores). key_store and key_row convert one position. */
static size_t key_at(int pos, int d, int hd) {
    return ((size_t)(pos / KEY_BLOCK) * hd + (size_t)d) * KEY_BLOCK + (size_t)(pos % KEY_BLOCK);
}

static void key_store(void *keys, int dtype, int pos, const float *x, int hd) {
    for (int d = 0; d < hd; d++) {
        if (dtype == MM_F32) ((float *)keys)[key_at(pos, d, hd)] = x[d];
        else ((uint16_t *)keys)[key_at(pos, d, hd)] = f32_to_f16(x[d]);
    }
}

static const float *key_row(const void *keys, int dtype, int pos, int hd, float *buf) {
    for (int d = 0; d < hd; d++)
        buf[d] = dtype == MM_F32 ? ((const float *)keys)[key_at(pos, d, hd)]
                                 : f16_to_f32(((const uint16_t *)keys)[key_at(pos, d, hd)]);
    return buf;
}

/* ---- attention, the plain reference: one query head over positions 0..pos of its kv head,
 * out = softmax(q.k / sqrt(hd)) . v.  keys, values: its kv head's caches;
 * scores: [pos + 1]; row: [head_dim] ---- */
static void attention_head(float *out, const float *q, const void *keys, const void *values, int kv_dtype,
                           int head_dim, int pos, float *scores, float *row) {
    float scale = 1.0f / sqrtf((float)head_dim);
    for (int t = 0; t <= pos; t++)
        scores[t] = dot(q, key_row(keys, kv_dtype, t, head_dim, row), head_dim) * scale;
    softmax(scores, pos + 1);
    memset(out, 0, (size_t)head_dim * sizeof(float));
    for (int t = 0; t <= pos; t++) {
        const float *v = value_row(values, kv_dtype, (size_t)t * head_dim, head_dim, row);
        for (int i = 0; i < head_dim; i++) out[i] += scores[t] * v[i];
    }
}

/* ---- attention, the fast path: all the query heads that share a kv head, for a run of tokens,
 * over the keys in tiles of KV_TILE positions. Each key and value row is read once for every
 * query that sees it (not once per query head), the scores of a tile are a small matrix product
 * (the matmul tile), and the softmax runs online: a running max and sum per query, the partial
 * output rescaled when the max grows, so the scores never outgrow a tile (flash attention). ---- */
#define KV_TILE 128     /* key positions per tile (a multiple of KEY_BLOCK) */
#define ATT_TOKENS 16   /* tokens per unit of attention work (with all heads of one kv head) */
#define KV_AHEAD 64     /* the caches are prefetched this many positions ahead */
_Static_assert(KV_TILE % KEY_BLOCK == 0 && KV_AHEAD % KEY_BLOCK == 0, "tiles and prefetches are whole key blocks");

#ifdef HAVE_SIMD
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
                vf k = vf_keep(load_w(kv_dtype, (const uint8_t *)kb + b * block, (size_t)d * KEY_BLOCK + (size_t)u * VL));
                for (int j = 0; j < J; j++) acc[j * B + b][u] = vf_fmadd(vf_set1(q[(size_t)j * hd + d]), k, acc[j * B + b][u]);
            }
    }
    for (int j = 0; j < J; j++)
        for (int b = 0; b < B; b++)
            for (int u = 0; u < U; u++)
                vf_store(S + (size_t)j * ldS + b * KEY_BLOCK + u * VL, vf_mul(acc[j * B + b][u], vf_set1(scale)));
}

/* the blocks [b0, b1) of keys from k for J queries, B blocks per tile (the last ones one by one),
 * prefetching KV_AHEAD positions ahead those of the first prefetch_blocks */
static ALWAYS_INLINE void scores_blocks(float *S, int ldS, const float *q, const void *k, int kv_dtype, int hd,
                                        int b0, int b1, int prefetch_blocks, float scale, const int J, const int B) {
    size_t block = (size_t)hd * KEY_BLOCK * (kv_dtype == MM_F32 ? 4 : 2);
    for (int b = b0; b < b1;) {
        int n = b1 - b >= B ? B : 1, a = b + KV_AHEAD / KEY_BLOCK;
        int n_ahead = prefetch_blocks - a;  /* of the n blocks at a, those that may be prefetched */
        n_ahead = n_ahead < 0 ? 0 : n_ahead > n ? n : n_ahead;
        const uint8_t *kb = (const uint8_t *)k + (size_t)b * block, *ahead = n_ahead ? (const uint8_t *)k + (size_t)a * block : kb;
        if (n == B) scores_tile(S + (size_t)b * KEY_BLOCK, ldS, q, kb, block, kv_dtype, hd, scale, ahead, n_ahead, J, B);
        else scores_tile(S + (size_t)b * KEY_BLOCK, ldS, q, kb, block, kv_dtype, hd, scale, ahead, n_ahead, J, 1);
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
static ALWAYS_INLINE void attention_scores_simd(float *S, int ldS, const float *q, int nq, const void *k,
                                                int kv_dtype, int hd, int n_keys, int n_prefetch, float scale) {
    int blocks = (n_keys + KEY_BLOCK - 1) / KEY_BLOCK, prefetch_blocks = (n_prefetch + KEY_BLOCK - 1) / KEY_BLOCK;
/* CALL(J) for J = n, a constant in each case (n < SCORE_QUERIES): the tiles' registers need it */
#if SCORE_QUERIES > 4
#define BY_QUERIES(n, CALL) switch (n) { case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; \
    case 4: CALL(4); break; case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; }
#else
#define BY_QUERIES(n, CALL) switch (n) { case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; }
#endif
    if (nq < SCORE_QUERIES) {
#define FEW(J) scores_blocks(S, ldS, q, k, kv_dtype, hd, 0, blocks, prefetch_blocks, scale, J, SCORE_QUERIES / J)
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
#endif

/* the largest of m and x[0..n) (the same value in any order: max is exact) */
static float max_of(const float *x, int n, float m) {
    int i = 0;
#ifdef HAVE_SIMD
    if (!reference_kernels && n >= VL) {
        vf acc = vf_set1(m);
        for (; i + VL <= n; i += VL) acc = vf_max(acc, vf_load(x + i));
        m = vf_hmax(acc);
    }
#endif
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* x[i] = exp(x[i] - m) for i < n (every x[i] <= m); returns their sum */
static float exp_shifted(float *x, int n, float m) {
    float sum = 0;
    int i = 0;
#ifdef HAVE_SIMD
    if (!reference_kernels) {
        vf acc = vf_zero();
        for (; i + VL <= n; i += VL) {
            vf y = vf_exp(vf_max(vf_sub(vf_load(x + i), vf_set1(m)), vf_set1(-87.0f)));
            vf_store(x + i, y);
            acc = vf_add(acc, y);
        }
        sum = vf_hsum(acc);
    }
#endif
    for (; i < n; i++) { x[i] = expf(x[i] - m); sum += x[i]; }
    return sum;
}

#ifdef HAVE_SIMD
/* O[r, 0..C VL) += sum over t < nt of P[r, t] v_t[0..C VL) for r < R: C vectors of columns of R
 * rows in registers, the columns of row t + KV_AHEAD prefetched while that is one of n_prefetch */
static ALWAYS_INLINE void pv_tile(float *O, int ldo, const float *P, const void *v, int kv_dtype, int hd,
                                  int nt, int n_prefetch, const int R, const int C) {
    size_t elem = kv_dtype == MM_F32 ? 4 : 2;
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
static void pv_tiles(float *O, int ldo, const float *P, const void *v, int kv_dtype, int hd, int nt, int n_prefetch,
                     int R, int C) {
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
#endif

/* O[r, :] += sum over t < nt of P[r, t] v_t for rows r < nr (P rows KV_TILE apart, O rows hd
 * apart); v_t: the cache rows from v, of which n_prefetch may be prefetched (0: none); row: [hd]
 * scratch */
static void attention_pv(float *O, const float *P, int nr, const void *v, int kv_dtype, int hd, int nt,
                         int n_prefetch, float *row) {
    int d = 0;
#ifdef HAVE_SIMD
    if (!reference_kernels) {  /* up to 4 rows x PV_VECS vectors of columns of O in registers, over all t */
        for (int C; d + VL <= hd; d += C * VL) {
            C = (hd - d) / VL < PV_VECS ? (hd - d) / VL : PV_VECS;
            for (int r0 = 0; r0 < nr; r0 += 4)
                pv_tiles(O + (size_t)r0 * hd + d, hd, P + (size_t)r0 * KV_TILE,
                         (const uint8_t *)v + (size_t)d * (kv_dtype == MM_F32 ? 4 : 2), kv_dtype, hd, nt,
                         r0 ? 0 : n_prefetch, nr - r0 < 4 ? nr - r0 : 4, C);  /* (the first rows prefetch) */
        }
        if (d == hd) return;
    }
#endif
    (void)n_prefetch;
    for (int t = 0; t < nt; t++) {  /* the plain loop, for the columns left */
        const float *vt = value_row(v, kv_dtype, (size_t)t * hd, hd, row);
        for (int r = 0; r < nr; r++) {
            float p = P[(size_t)r * KV_TILE + t], *o = O + (size_t)r * hd;
            for (int c = d; c < hd; c++) o[c] += p * vt[c];
        }
    }
}

/* S[j * ldS + t] = q_j . k_t * scale for queries j < nq (rows of head_dim from q) and keys
 * t < n_keys (from k, the start of a block of KEY_BLOCK keys, of which n_prefetch may be
 * prefetched, 0: none; S rows hold whole blocks); buf: [head_dim] */
static void attention_scores(float *S, int ldS, const float *q, int nq, const void *k, int kv_dtype,
                             int hd, int n_keys, int n_prefetch, float scale, float *buf) {
#ifdef HAVE_SIMD
    if (!reference_kernels) {
        if (kv_dtype == MM_F32) attention_scores_simd(S, ldS, q, nq, k, MM_F32, hd, n_keys, n_prefetch, scale);
        else attention_scores_simd(S, ldS, q, nq, k, MM_F16, hd, n_keys, n_prefetch, scale);
        return;
    }
#endif
    (void)n_prefetch;
    for (int t = 0; t < n_keys; t++) {
        const float *kt = key_row(k, kv_dtype, t, hd, buf);
        for (int j = 0; j < nq; j++) S[(size_t)j * ldS + t] = dot(q + (size_t)j * hd, kt, hd) * scale;
    }
}

/* Tokens pos0 .. pos0+n-1 (n <= ATT_TOKENS), the `group` query heads of kv head g each.
 * q, out: [n, q_dim] rows (this group's heads at g * group * head_dim); keys, values: kv head g's
 * caches; buf: [attention_buf_len(group, head_dim)] */
static size_t attention_buf_len(int group, int hd) {
    size_t nq = (size_t)ATT_TOKENS * group;
    return nq * KV_TILE + nq * hd + 2 * nq + (size_t)hd;
}

static void attention_group(float *out, const float *q, int n, int q_dim, int group, int g,
                            const void *keys, const void *values, int kv_dtype, int hd, int pos0, float *buf) {
    int nq = n * group;
    float *S = buf, *O = S + (size_t)nq * KV_TILE, *mx = O + (size_t)nq * hd, *sum = mx + nq, *row = sum + nq;
    float scale = 1.0f / sqrtf((float)hd);
    for (int r = 0; r < nq; r++) mx[r] = -INFINITY, sum[r] = 0;
    memset(O, 0, sizeof(float) * (size_t)nq * hd);
    int last = pos0 + n - 1;
    for (int t0 = 0; t0 <= last; t0 += KV_TILE) {
        int nt = last + 1 - t0 < KV_TILE ? last + 1 - t0 : KV_TILE;
        int n_prefetch = last + 1 - t0;  /* the positions from t0 on: the run's first token prefetches */
        const size_t k_at = (size_t)t0 * hd;  /* position t0 of either cache (t0: a multiple of KEY_BLOCK) */
        const void *k = (const uint8_t *)keys + k_at * (kv_dtype == MM_F32 ? 4 : 2);
        for (int i = 0; i < n; i++) {  /* token i sees keys up to its own position */
            int see = pos0 + i - t0 + 1 < nt ? pos0 + i - t0 + 1 : nt;
            if (see <= 0) continue;
            const float *qi = q + (size_t)i * q_dim + (size_t)g * group * hd;
            float *Si = S + (size_t)i * group * KV_TILE;
            attention_scores(Si, KV_TILE, qi, group, k, kv_dtype, hd, see, i ? 0 : n_prefetch, scale, row);
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
        const void *v = (const uint8_t *)values + k_at * (kv_dtype == MM_F32 ? 4 : 2);
        for (int i = 0; i < n; i++) {  /* O += P . V, each token's heads together over its keys */
            int see = pos0 + i - t0 + 1 < nt ? pos0 + i - t0 + 1 : nt;
            if (see > 0)
                attention_pv(O + (size_t)i * group * hd, S + (size_t)i * group * KV_TILE, group, v, kv_dtype, hd, see,
                             i ? 0 : n_prefetch, row);
        }
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < group; j++) {
            int r = i * group + j;
            float inv = 1.0f / sum[r], *o = out + (size_t)i * q_dim + ((size_t)g * group + j) * hd;
            for (int d = 0; d < hd; d++) o[d] = O[(size_t)r * hd + d] * inv;
        }
}

/* MoE routing for one token: softmax over experts, keep the top k, maybe renormalise */
static void route(int *idx, float *w, float *probs, const mm_header *h) {
    int E = (int)h->n_experts, k = (int)h->n_experts_per_tok;
    softmax(probs, E);
    for (int j = 0; j < k; j++) {   /* selection: k is 1 or 2 in every release */
        int best = -1;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int p = 0; p < j; p++) taken |= idx[p] == e;
            if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
        }
        idx[j] = best;
        w[j] = probs[best];
    }
    if (h->moe_norm == MM_MOE_NORM_ALWAYS || (h->moe_norm == MM_MOE_NORM_IF_K_GT_1 && k > 1)) {
        float sum = 0;
        for (int j = 0; j < k; j++) sum += w[j];
        for (int j = 0; j < k; j++) w[j] /= sum + 1e-20f;
    }
}

/* out[t] = down(silu(gate x[t]) * up x[t]) for n rows */
static void swiglu_ffn(float *out, const float *x, const FFN *f, int n, State *s) {
    int hidden = f->gate.rows;
    matmuls((MatmulJob[]){{s->hb, &f->gate}, {s->hb2, &f->up}}, 2, x, n, s);
    if (n == 1) swiglu(s->hb, s->hb2, hidden);  /* (no parallel region for one row: see matmuls) */
    else {
        #pragma omp parallel for
        for (int t = 0; t < n; t++) swiglu(s->hb + (size_t)t * hidden, s->hb2 + (size_t)t * hidden, hidden);
    }
    matmul(out, s->hb, &f->down, n, s);
}

/* ============================================================================================
 * The forward pass
 * ============================================================================================ */

/* Whether token t (of a block) uses expert e, and with what weight: its router weight when
 * routed there, 1 for a shared expert (MiniMind2 MoE adds those to every token). */
static bool expert_weight(const State *s, const mm_header *h, int t, uint32_t e, float *w) {
    int k = (int)h->n_experts_per_tok;
    if (e >= h->n_experts) { *w = 1.0f; return true; }
    for (int j = 0; j < k; j++)
        if (s->top_idx[(size_t)t * k + j] == (int)e) { *w = s->top_w[(size_t)t * k + j]; return true; }
    return false;
}

/* Feed-forward of a block of n rows (xb -> delta), dense or MoE. */
static void ffn_block(const Model *m, const Layer *L, State *s, int n) {
    const mm_header *h = &m->cfg;
    int dim = (int)h->dim, k = (int)h->n_experts_per_tok;
    if (!(h->flags & MM_FLAG_MOE)) {
        swiglu_ffn(s->delta, s->xb, &L->ffn[0], n, s);
        return;
    }
    matmul(s->router, s->xb, &L->router, n, s);
    for (int t = 0; t < n; t++)
        route(s->top_idx + (size_t)t * k, s->top_w + (size_t)t * k, s->router + (size_t)t * h->n_experts, h);
    memset(s->delta, 0, (size_t)n * dim * sizeof(float));
    /* each expert runs once on the rows routed to it: gather, run, scatter-add with the weights */
    for (uint32_t e = 0; e < h->n_experts + h->n_shared_experts; e++) {
        int rows = 0;
        for (int t = 0; t < n; t++) {
            if (!expert_weight(s, h, t, e, &s->moe_w[rows])) continue;
            s->moe_rows[rows] = t;
            memcpy(s->moe_in + (size_t)rows * dim, s->xb + (size_t)t * dim, (size_t)dim * sizeof(float));
            rows++;
        }
        if (rows == 0) continue;
        swiglu_ffn(s->moe_out, s->moe_in, &L->ffn[e], rows, s);
        for (int i = 0; i < rows; i++) {
            float *d = s->delta + (size_t)s->moe_rows[i] * dim;
            for (int c = 0; c < dim; c++) d[c] += s->moe_w[i] * s->moe_out[(size_t)i * dim + c];
        }
    }
}

/* The reference: one token at position pos, each step written out plainly. The batched path
 * below must agree with it (tests/run_tests.py checks). Returns the logits [vocab]. */
static float *forward_token(const Model *m, State *s, int token, int pos) {
    const mm_header *h = &m->cfg;
    if (pos < 0 || pos >= s->ctx) die("internal: position %d outside the context of %d", pos, s->ctx);
    int dim = (int)h->dim, hd = (int)h->head_dim, half = hd / 2;
    int kv_dim = (int)(h->n_kv_heads * h->head_dim), group = (int)(h->n_heads / h->n_kv_heads);
    float *x = s->x, *xb = s->xb, *buf = s->row_buf;

    memcpy(x, matrix_row(&m->embed, token, buf), (size_t)dim * sizeof(float));
    rope_angles(s->cos, s->sin, s, pos, half);
    for (uint32_t l = 0; l < h->n_layers; l++) {
        const Layer *L = &m->layers[l];
        float *k = s->k_new, *v = s->v_new;

        /* attention */
        rmsnorm(xb, x, L->input_norm, dim, h->rms_eps);
        for (int r = 0; r < L->wq.rows; r++) s->q[r] = dot(matrix_row(&L->wq, r, buf), xb, dim);
        for (int r = 0; r < kv_dim; r++) k[r] = dot(matrix_row(&L->wk, r, buf), xb, dim);
        for (int r = 0; r < kv_dim; r++) v[r] = dot(matrix_row(&L->wv, r, buf), xb, dim);
        for (uint32_t hh = 0; hh < h->n_heads; hh++) {
            float *qh = s->q + (size_t)hh * hd;
            if (L->q_norm) rmsnorm(qh, qh, L->q_norm, hd, h->rms_eps);
            rope_rotate(qh, s->cos, s->sin, half);
        }
        for (uint32_t g = 0; g < h->n_kv_heads; g++) {
            if (L->k_norm) rmsnorm(k + (size_t)g * hd, k + (size_t)g * hd, L->k_norm, hd, h->rms_eps);
            rope_rotate(k + (size_t)g * hd, s->cos, s->sin, half);
        }
        for (uint32_t g = 0; g < h->n_kv_heads; g++) {
            key_store(kv_head(s, s->key_cache, h, l, (int)g), s->kv_dtype, pos, k + (size_t)g * hd, hd);
            value_store(kv_head(s, s->value_cache, h, l, (int)g), s->kv_dtype, (size_t)pos * hd, v + (size_t)g * hd, hd);
        }
        for (uint32_t hh = 0; hh < h->n_heads; hh++) {
            int g = (int)(hh / group);
            attention_head(s->att_out + (size_t)hh * hd, s->q + (size_t)hh * hd, kv_head(s, s->key_cache, h, l, g),
                           kv_head(s, s->value_cache, h, l, g), s->kv_dtype, hd, pos, s->scores, s->att_buf);
        }
        for (int r = 0; r < dim; r++) x[r] += dot(matrix_row(&L->wo, r, buf), s->att_out, L->wo.cols);

        /* feed-forward */
        rmsnorm(xb, x, L->post_norm, dim, h->rms_eps);
        uint32_t n_ffn = 1;
        if (h->flags & MM_FLAG_MOE) {
            for (uint32_t e = 0; e < h->n_experts; e++)
                s->router[e] = dot(matrix_row(&L->router, (int)e, buf), xb, dim);
            route(s->top_idx, s->top_w, s->router, h);
            n_ffn = h->n_experts + h->n_shared_experts;
        }
        for (uint32_t e = 0; e < n_ffn; e++) {
            float weight = 1.0f;
            if ((h->flags & MM_FLAG_MOE) && !expert_weight(s, h, 0, e, &weight)) continue;
            const FFN *f = &L->ffn[e];
            int hidden = f->gate.rows;
            for (int r = 0; r < hidden; r++)
                s->hb[r] = silu(dot(matrix_row(&f->gate, r, buf), xb, dim)) *
                           dot(matrix_row(&f->up, r, buf), xb, dim);
            for (int r = 0; r < dim; r++) x[r] += weight * dot(matrix_row(&f->down, r, buf), s->hb, hidden);
        }
    }
    rmsnorm(x, x, m->final_norm, dim, h->rms_eps);
    for (uint32_t r = 0; r < h->vocab_size; r++) s->logits[r] = dot(matrix_row(&m->head, (int)r, buf), x, dim);
    return s->logits;
}

/* Attention of layer l for unit u of a block of n tokens at pos0 (forward): the query heads of kv
 * head u % n_kv_heads for the run of up to ATT_TOKENS tokens u / n_kv_heads, from s->q into
 * s->att_out */
static void attention_unit(const mm_header *h, State *s, uint32_t l, int u, int n, int pos0) {
    int hd = (int)h->head_dim, n_kv_heads = (int)h->n_kv_heads, group = (int)(h->n_heads / h->n_kv_heads);
    int q_dim = (int)h->n_heads * hd, t0 = u / n_kv_heads * ATT_TOKENS, g = u % n_kv_heads;
    int len = n - t0 < ATT_TOKENS ? n - t0 : ATT_TOKENS;
    float *buf = s->att_buf + (size_t)thread_id() * s->att_buf_len;
    const void *keys = kv_head(s, s->key_cache, h, l, g), *values = kv_head(s, s->value_cache, h, l, g);
    if (!reference_kernels) {
        attention_group(s->att_out + (size_t)t0 * q_dim, s->q + (size_t)t0 * q_dim, len, q_dim, group, g,
                        keys, values, s->kv_dtype, hd, pos0 + t0, buf);
        return;
    }
    for (int t = t0; t < t0 + len; t++)
        for (int hh = g * group; hh < (g + 1) * group; hh++)
            attention_head(s->att_out + (size_t)t * q_dim + (size_t)hh * hd,
                           s->q + (size_t)t * q_dim + (size_t)hh * hd, keys, values, s->kv_dtype, hd,
                           pos0 + t, s->scores + (size_t)thread_id() * s->ctx, buf);
}

/* The batched path: n tokens at positions pos0 .. pos0+n-1 (n <= max_tokens), each layer as
 * matrix-matrix work. Logits for all n rows when all_logits, else for the last row only.
 * Returns the logits: [n, vocab] or [1, vocab]. */
static float *forward(const Model *m, State *s, const int *tokens, int n, int pos0, bool all_logits) {
    const mm_header *h = &m->cfg;
    int dim = (int)h->dim, hd = (int)h->head_dim, half = hd / 2, n_heads = (int)h->n_heads;
    int kv_dim = (int)(h->n_kv_heads * h->head_dim), q_dim = n_heads * hd;
    int n_kv_heads = (int)h->n_kv_heads;
    if (n < 1 || n > s->max_tokens || pos0 < 0 || pos0 + n > s->ctx)
        die("internal: forward of %d tokens at position %d (block %d, context %d)", n, pos0,
            s->max_tokens, s->ctx);

    for (int t = 0; t < n; t++) {
        float *xt = s->x + (size_t)t * dim;
        memcpy(xt, matrix_row(&m->embed, tokens[t], s->row_buf), (size_t)dim * sizeof(float));
        rope_angles(s->cos + (size_t)t * half, s->sin + (size_t)t * half, s, pos0 + t, half);
    }
    for (uint32_t l = 0; l < h->n_layers; l++) {
        const Layer *L = &m->layers[l];
        float *k = s->k_new, *v = s->v_new;

        for (int t = 0; t < n; t++)
            rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, L->input_norm, dim, h->rms_eps);
        matmuls((MatmulJob[]){{s->q, &L->wq}, {k, &L->wk}, {v, &L->wv}}, 3, s->xb, n, s);
        for (int t = 0; t < n; t++) {
            const float *c = s->cos + (size_t)t * half, *sn = s->sin + (size_t)t * half;
            for (int hh = 0; hh < n_heads; hh++) {
                float *qh = s->q + (size_t)t * q_dim + (size_t)hh * hd;
                if (L->q_norm) rmsnorm(qh, qh, L->q_norm, hd, h->rms_eps);
                rope_rotate(qh, c, sn, half);
            }
            for (int g = 0; g < n_kv_heads; g++) {
                float *kh = k + (size_t)t * kv_dim + (size_t)g * hd;
                if (L->k_norm) rmsnorm(kh, kh, L->k_norm, hd, h->rms_eps);
                rope_rotate(kh, c, sn, half);
                key_store(kv_head(s, s->key_cache, h, l, g), s->kv_dtype, pos0 + t, kh, hd);
                value_store(kv_head(s, s->value_cache, h, l, g), s->kv_dtype, (size_t)(pos0 + t) * hd,
                         v + (size_t)t * kv_dim + (size_t)g * hd, hd);
            }
        }
        /* units of work: one kv head (with its query heads) for a run of up to ATT_TOKENS tokens */
        int units = (n + ATT_TOKENS - 1) / ATT_TOKENS * n_kv_heads;
        if (n_threads() == 1)  /* (no parallel region for one thread: see matmuls) */
            for (int u = 0; u < units; u++) attention_unit(h, s, l, u, n, pos0);
        else {
            #pragma omp parallel for schedule(dynamic, 1)
            for (int u = 0; u < units; u++) attention_unit(h, s, l, u, n, pos0);
        }
        matmul(s->delta, s->att_out, &L->wo, n, s);
        for (size_t i = 0; i < (size_t)n * dim; i++) s->x[i] += s->delta[i];

        for (int t = 0; t < n; t++)
            rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, L->post_norm, dim, h->rms_eps);
        ffn_block(m, L, s, n);
        for (size_t i = 0; i < (size_t)n * dim; i++) s->x[i] += s->delta[i];
    }
    int first = all_logits ? 0 : n - 1;
    for (int t = first; t < n; t++)
        rmsnorm(s->xb + (size_t)(t - first) * dim, s->x + (size_t)t * dim, m->final_norm, dim, h->rms_eps);
    matmul(s->logits, s->xb, &m->head, n - first, s);
    return s->logits;
}

/* ============================================================================================
 * Running a sequence: every position's logits, batched or token by token
 * ============================================================================================ */

typedef void (*logits_fn)(const float *logits, int t, void *ctx);

/* Logits that are NaN or infinite come from weights that overflow f32 (a corrupt file): sampling
 * and perplexity would turn them into garbage (NaN compares false, so no token is a candidate;
 * inf - inf in the softmax is NaN), so they stop with an error instead. */
static void check_logits(const float *logits, int n) {
    for (int i = 0; i < n; i++)
        if (!isfinite(logits[i]))
            die("the model computed %s logit for token %d (corrupt weights in the model file?)",
                isnan(logits[i]) ? "a NaN" : "an infinite", i);
}

/* tokens[0..n) at positions 0..n-1; emit(logits of position t, t, ctx) for every t in order */
static void run_sequence(const Model *m, State *s, const int *tokens, int n, bool batched,
                         logits_fn emit, void *ctx) {
    int vocab = (int)m->cfg.vocab_size;
    for (int start = 0; start < n; start += batched ? s->max_tokens : 1) {
        if (!batched) {
            emit(forward_token(m, s, tokens[start], start), start, ctx);
            continue;
        }
        int len = n - start < s->max_tokens ? n - start : s->max_tokens;
        const float *logits = forward(m, s, tokens + start, len, start, true);
        for (int t = 0; t < len; t++) emit(logits + (size_t)t * vocab, start + t, ctx);
    }
}

/* -m logits: float32 rows of logits, one per position */
typedef struct { FILE *out; const char *path; int vocab; } LogitsOut;

static void write_logits(const float *logits, int t, void *ctx) {
    LogitsOut *o = ctx;
    (void)t;
    if (fwrite(logits, sizeof(float), (size_t)o->vocab, o->out) != (size_t)o->vocab)
        die("%s: write failed (%s)", o->path, strerror(errno));
}

/* -m ppl: the negative log-likelihood of each next token, -log softmax(logits)[next] */
typedef struct {
    const int *tokens;  /* the current window's ids [n] */
    int n, vocab;
    double nll;         /* summed over every scored position so far */
    long count, total;  /* positions scored so far, and in the whole run */
    int reported;       /* tenths of the run already reported on stderr */
} PplSum;

static void add_nll(const float *logits, int t, void *ctx) {
    PplSum *p = ctx;
    if (t + 1 >= p->n) return;          /* the window's last position predicts nothing we have */
    check_logits(logits, p->vocab);
    float max = logits[0];
    for (int i = 1; i < p->vocab; i++) max = logits[i] > max ? logits[i] : max;
    double sum = 0;
    for (int i = 0; i < p->vocab; i++) sum += exp((double)logits[i] - max);
    p->nll += log(sum) + max - logits[p->tokens[t + 1]];
    p->count++;
    if (p->total >= 8192 && p->count * 10 >= (p->reported + 1) * p->total) {  /* long runs: every 10% */
        p->reported = (int)(p->count * 10 / p->total);
        fprintf(stderr, "ppl: %3d%% (%ld of %ld tokens), ppl so far %.4f\n", p->reported * 10, p->count,
                p->total, exp(p->nll / p->count));
    }
}

/* ============================================================================================
 * Sampling, in MiniMind's order: temperature, repetition penalty, top-k, top-p
 * ============================================================================================ */

typedef struct { float logit; int id; } Candidate_;

typedef struct {
    int vocab;
    float temperature;          /* 0: greedy */
    float top_p;                /* nucleus: smallest set of best tokens with mass >= top_p */
    int top_k;                  /* 0: off */
    float repeat_penalty;       /* 1: off */
    uint64_t rng;               /* xorshift64* state */
    Candidate_ *cand;           /* [vocab] */
    float *kth;                 /* [top_k] the k largest logits, for the top-k threshold */
} Sampler;

static float random_f32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (float)((*state * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

static int by_logit_desc(const void *a, const void *b) {
    const Candidate_ *x = a, *y = b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return x->id - y->id;
}

/* the next token from logits [vocab] (modified in place); seen[i]: token i is in the context */
static int sample(Sampler *sp, float *logits, const uint8_t *seen) {
    int V = sp->vocab;
    check_logits(logits, V);
    if (sp->temperature > 0)
        for (int i = 0; i < V; i++) logits[i] /= sp->temperature;
    if (sp->repeat_penalty != 1.0f)  /* MiniMind: positive logits divided, negative multiplied */
        for (int i = 0; i < V; i++)
            if (seen[i]) logits[i] = logits[i] > 0 ? logits[i] / sp->repeat_penalty : logits[i] * sp->repeat_penalty;
    if (sp->temperature <= 0) {
        int best = 0;
        for (int i = 1; i < V; i++) if (logits[i] > logits[best]) best = i;
        return best;
    }
    /* top-k: keep the logits >= the k-th largest (ties at the threshold stay, as in PyTorch) */
    float threshold = -INFINITY;
    if (sp->top_k > 0 && sp->top_k < V) {
        int k = sp->top_k, n = 0;
        for (int i = 0; i < V; i++) {   /* kth[] holds the k largest so far, descending */
            if (n == k && logits[i] <= sp->kth[k - 1]) continue;
            int j = n < k ? n++ : k - 1;
            for (; j > 0 && sp->kth[j - 1] < logits[i]; j--) sp->kth[j] = sp->kth[j - 1];
            sp->kth[j] = logits[i];
        }
        threshold = sp->kth[k - 1];
    }
    int n = 0;
    for (int i = 0; i < V; i++)
        if (logits[i] >= threshold) sp->cand[n++] = (Candidate_){logits[i], i};
    qsort(sp->cand, (size_t)n, sizeof *sp->cand, by_logit_desc);
    /* softmax over the candidates, then top-p: a token stays while the mass before it is <= p */
    float max = sp->cand[0].logit, sum = 0;
    for (int i = 0; i < n; i++) { sp->cand[i].logit = expf(sp->cand[i].logit - max); sum += sp->cand[i].logit; }
    int keep = n;
    float cum = 0;
    for (int i = 0; i < n; i++) {
        if (i > 0 && cum / sum > sp->top_p) { keep = i; break; }
        cum += sp->cand[i].logit;
    }
    float mass = 0;
    for (int i = 0; i < keep; i++) mass += sp->cand[i].logit;
    float r = random_f32(&sp->rng) * mass, acc = 0;
    for (int i = 0; i < keep; i++) {
        acc += sp->cand[i].logit;
        if (r < acc) return sp->cand[i].id;
    }
    return sp->cand[keep - 1].id;
}

/* ============================================================================================
 * Generation and chat
 * ============================================================================================ */

typedef struct {
    int *tokens;                /* [ctx] the conversation so far */
    int n;                      /* tokens held */
    int n_cached;               /* of which the first n_cached are in the KV cache */
    uint8_t *seen;              /* [vocab] tokens present, for the repetition penalty */
} Context;

typedef struct { long prompt, generated; double prefill_s, decode_s; } Stats;

/* Ctrl-C during generate or chat sets this; generation stops after the current token (or prompt
 * block), the line and the stats are finished, and main then dies by SIGINT itself, so that a
 * shell sees 130 and stops a loop that runs ./run (a plain exit status would look handled). A
 * second Ctrl-C stops at once; an inherited "ignore SIGINT" (nohup, background jobs) is kept. */
static volatile sig_atomic_t interrupted;

static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

/* Without SA_RESTART, so that chat's read of the next line returns at once. */
static void catch_sigint(void) {
    struct sigaction sa, old;
    if (sigaction(SIGINT, NULL, &old) == 0 && old.sa_handler == SIG_IGN) return;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
}

/* Process tokens[n_cached..n) in prompt-sized blocks; the logits of the last one (NULL when
 * interrupted). */
static float *prefill(const Model *m, State *s, Context *c) {
    float *logits = NULL;
    while (c->n_cached < c->n && !interrupted) {
        int len = c->n - c->n_cached < s->max_tokens ? c->n - c->n_cached : s->max_tokens;
        logits = forward(m, s, c->tokens + c->n_cached, len, c->n_cached, false);
        c->n_cached += len;
    }
    return logits;
}

/* Print a token's text unless it is special; append its bytes to reply when given. */
static void emit_token(const Tokenizer *tok, int id, Utf8Stream *out, Str *reply) {
    if (tok->token_kind[id] == MM_TOKEN_SPECIAL) return;
    size_t len;
    const uint8_t *bytes = tokenizer_decode(tok, id, &len);
    utf8_stream_put(out, bytes, len, stdout);
    fflush(stdout);
    if (reply) str_add(reply, (const char *)bytes, len);
}

/* Run the prompt (the uncached tail of c), then sample up to max_new tokens, streaming their text.
 * Stops at end-of-sequence or when the context is full (said on stderr). */
static void generate(const Model *m, State *s, const Tokenizer *tok, Sampler *sp, Context *c,
                     int max_new, Str *reply, Stats *st) {
    double t0 = now_seconds();
    st->prompt += c->n - c->n_cached;
    memset(c->seen, 0, m->cfg.vocab_size);
    for (int i = 0; i < c->n; i++) c->seen[c->tokens[i]] = 1;
    float *logits = prefill(m, s, c);
    double t1 = now_seconds();
    st->prefill_s += t1 - t0;
    Utf8Stream out = {0};
    for (int i = 0; i < max_new && !interrupted; i++) {
        int next = sample(sp, logits, c->seen);
        if (next == (int)m->cfg.eos_id) {
            if (c->n < s->ctx) c->tokens[c->n++] = next;  /* kept for the next turn, not yet run */
            break;
        }
        if (c->n >= s->ctx) {
            utf8_stream_flush(&out, stdout);
            fprintf(stderr, "\n[stopped: the context of %d tokens is full (-c)]\n", s->ctx);
            break;
        }
        c->tokens[c->n++] = next;
        c->seen[next] = 1;
        st->generated++;
        emit_token(tok, next, &out, reply);
        if (i + 1 < max_new && c->n < s->ctx) {
            logits = forward(m, s, &next, 1, c->n_cached, false);
            c->n_cached++;
        }
    }
    utf8_stream_flush(&out, stdout);
    st->decode_s += now_seconds() - t1;
}

static void print_stats(const Stats *st) {
    fprintf(stderr, "prompt %ld tokens, generated %ld tokens; prefill %.1f tokens/s, decode %.1f tokens/s\n",
            st->prompt, st->generated, st->prompt / (st->prefill_s > 0 ? st->prefill_s : 1e-9),
            st->generated / (st->decode_s > 0 ? st->decode_s : 1e-9));
}

/* Tokens of text, as a freshly allocated array; *n their count. */
static int *encode_text(const Tokenizer *tok, const uint8_t *text, size_t len, int *n) {
    int *ids = xcalloc(len + 1, sizeof(int), "token ids");
    size_t count = tokenizer_encode(tok, text, len, ids);
    if (count == (size_t)-1) die("out of memory tokenizing %zu bytes", len);
    if (count > INT_MAX) die("text of %zu tokens is too long", count);
    *n = (int)count;
    return ids;
}

/* -m chat: one user turn per line of stdin. The KV cache keeps the conversation: each turn's
 * prompt is rendered whole by the chat template, and only the tokens after the part already
 * cached are run. When a turn does not fit, the oldest turns are dropped (said on stderr). */
static void chat(const Model *m, State *s, const Tokenizer *tok, Sampler *sp, Context *c,
                 const char *system, bool think, int max_new, bool verbose) {
    int template = (int)m->cfg.chat_template;
    if (template == MM_CHAT_NONE)
        die("%s: this model has no chat template (a pretrained checkpoint?); use -m generate", m->path);
    int cap = 16, n_msgs = 0;
    ChatMessage *msgs = xcalloc((size_t)cap, sizeof *msgs, "conversation");
    if (system) msgs[n_msgs++] = (ChatMessage){"system", strdup(system)};
    int first_turn = n_msgs;
    bool tty = isatty(0);
    char *line = NULL;
    size_t line_cap = 0;
    Stats total = {0};
    for (;;) {
        if (tty) { fputs("> ", stdout); fflush(stdout); }
        ssize_t got = getline(&line, &line_cap, stdin);
        if (got < 0) break;
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = 0;
        if (got == 0) continue;
        if (n_msgs + 2 > cap) {
            ChatMessage *bigger = realloc(msgs, sizeof *msgs * (size_t)(cap *= 2));
            if (!bigger) die("out of memory growing the conversation");
            msgs = bigger;
        }
        msgs[n_msgs++] = (ChatMessage){"user", strdup(line)};
        int n_ids, *ids;
        for (;;) {  /* render; drop the oldest user/assistant pair while it does not fit */
            char *prompt = chat_render(template, msgs, n_msgs, true, think);
            if (!prompt) die("out of memory rendering the chat prompt");
            ids = encode_text(tok, (const uint8_t *)prompt, strlen(prompt), &n_ids);
            free(prompt);
            if (n_ids < s->ctx || n_msgs - first_turn <= 1) break;
            free(ids);
            fprintf(stderr, "[context of %d tokens is full: dropping the oldest turn]\n", s->ctx);
            free((char *)msgs[first_turn].content);
            free((char *)msgs[first_turn + 1].content);
            memmove(msgs + first_turn, msgs + first_turn + 2, sizeof *msgs * (size_t)(n_msgs - first_turn - 2));
            n_msgs -= 2;
        }
        if (n_ids >= s->ctx) {
            fprintf(stderr, "[this message is %d tokens with the template; the context holds %d (-c)]\n", n_ids, s->ctx);
            free(ids);
            free((char *)msgs[--n_msgs].content);
            continue;
        }
        /* keep the cached prefix that the new prompt shares, run the rest */
        int common = 0;
        while (common < c->n_cached && common < n_ids - 1 && c->tokens[common] == ids[common]) common++;
        memcpy(c->tokens, ids, sizeof(int) * (size_t)n_ids);
        c->n = n_ids;
        c->n_cached = common;
        free(ids);
        Str reply = {0};
        str_cat(&reply, "");
        Stats st = {0};
        generate(m, s, tok, sp, c, max_new, &reply, &st);
        fputc('\n', stdout);
        fflush(stdout);
        if (reply.oom) die("out of memory keeping the reply");
        msgs[n_msgs++] = (ChatMessage){"assistant", reply.s};
        if (verbose) print_stats(&st);
        total.prompt += st.prompt; total.generated += st.generated;
        total.prefill_s += st.prefill_s; total.decode_s += st.decode_s;
        if (interrupted) break;
    }
    free(line);
    for (int i = 0; i < n_msgs; i++) free((char *)msgs[i].content);
    free(msgs);
    if (verbose) print_stats(&total);
}

/* peak resident memory of this process so far, MB */
static double peak_rss_mb(void) {
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) == 0 ? ru.ru_maxrss / 1024.0 : NAN;  /* Linux: KB */
}

/* decode n tokens greedily after the cached context (end-of-sequence does not stop it); tokens/s */
static double bench_decode(const Model *m, State *s, Context *c, float *logits, int n) {
    double t0 = now_seconds();
    for (int i = 0; i < n; i++) {
        int next = 0;
        for (int v = 1; v < (int)m->cfg.vocab_size; v++) next = logits[v] > logits[next] ? v : next;
        logits = forward(m, s, &next, 1, c->n_cached, false);
        c->tokens[c->n_cached++] = next;
    }
    c->n = c->n_cached;
    return n / (now_seconds() - t0);
}

/* -m bench: this model's speed on this machine, on seeded random token ids (tests/bench.py runs
 * it for make bench), after a warm-up of a 32-token prompt and one token. One CSV row: a 512-token prompt (prefill tokens/s, time to first token),
 * n tokens decoded after a 16-token prompt, and after 2048 and 4096 tokens of context (left
 * empty when -c is smaller), and the peak resident memory. */
static void bench(const Model *m, State *s, Context *c, int n) {
    enum { WARMUP = 32, PROMPT = 512, SHORT = 16, DEPTH1 = 2048, DEPTH2 = 4096 };
    uint64_t rng = 0x2545F4914F6CDD1Dull;
    for (int i = 0; i < s->ctx; i++) c->tokens[i] = (int)(random_f32(&rng) * (float)m->cfg.vocab_size) % (int)m->cfg.vocab_size;
    if (s->ctx < PROMPT || s->ctx < SHORT + n) die("-m bench needs a context (-c) of at least %d", PROMPT > SHORT + n ? PROMPT : SHORT + n);
    /* a warm-up first, as llama-bench does: caches, threads, pages. The KV cache is calloc'ed and
     * its pages are mapped in as positions are first written; llama.cpp clears its cache when the
     * context is made, before it times anything: so does this, to time the same work (only the
     * positions the benchmark uses, so that peak RSS stays what they need) */
    size_t row = (size_t)m->cfg.head_dim * (s->kv_dtype == MM_F16 ? 2 : 4);
    size_t used = s->ctx < DEPTH2 + n ? (size_t)s->ctx : (size_t)(DEPTH2 + n);
    used = (used + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK;
    for (uint32_t l = 0; l < m->cfg.n_layers; l++)
        for (int g = 0; g < (int)m->cfg.n_kv_heads; g++) {
            memset(kv_head(s, s->key_cache, &m->cfg, l, g), 0, used * row);
            memset(kv_head(s, s->value_cache, &m->cfg, l, g), 0, used * row);
        }
    c->n_cached = 0, c->n = WARMUP;
    bench_decode(m, s, c, prefill(m, s, c), 1);
    c->n_cached = 0, c->n = PROMPT;
    double t0 = now_seconds();
    float *logits = prefill(m, s, c);
    int first = 0;
    for (int v = 1; v < (int)m->cfg.vocab_size; v++) first = logits[v] > logits[first] ? v : first;
    double ttft = now_seconds() - t0;
    c->n_cached = 0, c->n = SHORT;
    double decode = bench_decode(m, s, c, prefill(m, s, c), n);
    char d1[32] = "", d2[32] = "";
    if (s->ctx >= DEPTH2 + n) {  /* 2048 tokens of context, decode; then fill to 4096, decode */
        c->n_cached = 0, c->n = DEPTH1;
        snprintf(d1, sizeof d1, "%.2f", bench_decode(m, s, c, prefill(m, s, c), n));
        c->n_cached = DEPTH1, c->n = DEPTH2;
        snprintf(d2, sizeof d2, "%.2f", bench_decode(m, s, c, prefill(m, s, c), n));
    }
    (void)first;
    printf("prefill_tokens,prefill_tps,ttft_ms,decode_tokens,decode_tps,decode_tps_2048,decode_tps_4096,peak_rss_mb\n");
    printf("%d,%.2f,%.3f,%d,%.2f,%s,%s,%.1f\n", PROMPT, PROMPT / ttft, ttft * 1e3, n, decode, d1, d2, peak_rss_mb());
}

/* -m tokenize --show-tokens: a token's bytes, escaped where they are not printable text */
static void print_token_text(const uint8_t *b, size_t n) {
    for (size_t i = 0; i < n;) {
        bool complete;
        uint32_t cp;
        size_t k = utf8_prefix(b + i, n - i, &complete, &cp);
        if (complete && cp >= 0x20 && cp != 0x7F && cp != '\\') { fwrite(b + i, 1, k, stdout); i += k; continue; }
        if (b[i] == '\n') fputs("\\n", stdout);
        else if (b[i] == '\t') fputs("\\t", stdout);
        else if (b[i] == '\\') fputs("\\\\", stdout);
        else printf("\\x%02x", b[i]);
        i++;
    }
}

/* ============================================================================================
 * Command line
 * ============================================================================================ */

typedef struct {
    const char *model_path, *mode, *ids_arg, *out_path, *text, *text_file, *system;
    int ctx, threads, batch, steps, top_k;
    bool no_batch, verbose, think, show_tokens, csv;
    float temperature, top_p, repeat_penalty;
    unsigned long long seed;
    bool seed_given;
    const char *kv;             /* KV cache type: "f32" or "f16" */
    const char *rope_scaling;   /* NULL: as the model file says */
    float rope_base, rope_scale, yarn_beta_fast, yarn_beta_slow, yarn_attn_factor;
    int yarn_orig_ctx;          /* 0 / NAN above: not given */
} Options;

static void usage(FILE *f) {
    fputs(
"usage: run MODEL.bin [options]\n"
"  -m MODE                generate | chat | tokenize | decode | logits | ppl | bench  [generate]\n"
"  -i TEXT                input text: the prompt (generate), the text (tokenize, logits, ppl)\n"
"  -f FILE                input text read from FILE, byte for byte\n"
"  --ids LIST             token ids instead of text, separated by commas or spaces;\n"
"                         @FILE reads them from FILE (logits, ppl, decode)\n"
"  -o FILE                logits mode: write float32 little-endian logits, one row of vocab\n"
"                         values per input position  [required in logits mode]\n"
"  -n N                   generate at most N tokens (per chat reply; bench: decode N)  [256]\n"
"  -t F                   temperature; 0 = greedy  [0.85]\n"
"  -p F                   top-p (nucleus) sampling  [0.95]\n"
"  -k N                   top-k sampling; 0 = off  [50]\n"
"  --repeat-penalty F     divide positive / multiply negative logits of tokens in the context\n"
"                         by F; 1 = off  [1.0]\n"
"  -s N                   random seed  [from the clock]\n"
"  -y TEXT                chat: system prompt  [the template's default]\n"
"  --think                chat: open minimind-3's thinking block\n"
"  --show-tokens          tokenize: one token per line with its text\n"
"  --csv                  ppl: print context,windows,tokens,nll,ppl as CSV instead\n"
"  -c, --ctx N            context length (KV cache positions); ppl: window length\n"
"                         [the model's max positions]\n"
"  --threads N            worker threads (OpenMP builds)  [number of cores]\n"
"  --batch N              prompt tokens per forward pass  [64]\n"
"  --kv T                 KV cache type: f32 | f16 (half the memory)  [f32]\n"
"  --no-batch             run logits/ppl token by token through the reference path\n"
"  --ref-kernels          matmuls and attention through the plain C reference kernels\n"
"                         instead of the SIMD ones (for testing; slower)\n"
"  --rope-base F          RoPE theta  [the model's rope_theta]\n"
"  --rope-scaling S       none | linear | yarn  [the model's config.json, else none]\n"
"  --rope-scale F         scaling factor  [yarn: 16; linear: required]\n"
"  --yarn-orig-ctx N      YaRN original context  [2048]\n"
"  --yarn-beta-fast F     YaRN high-frequency ramp end, in rotations  [32]\n"
"  --yarn-beta-slow F     YaRN low-frequency ramp end, in rotations  [1]\n"
"  --yarn-attn-factor F   YaRN factor on cos and sin  [1.0]\n"
"  -v, --verbose          print the model's config, timings, per-window ppl and memory\n"
"                         (peak RSS, model file, KV cache) on stderr\n"
"  -h, --help             this text\n"
"generate feeds <|im_start|> + the text, as MiniMind does for pretrained checkpoints; chat\n"
"renders each turn with the checkpoint's chat template. YaRN defaults are MiniMind's\n"
"inference_rope_scaling=True; values from the checkpoint's config.json (stored at export)\n"
"come next; explicit flags win. bench times a 512-token prompt and -n decoded tokens after\n"
"16, 2048 and 4096 tokens of context on random ids, and prints one CSV row (make bench).\n", f);
}

static long parse_int(const char *flag, const char *v, long lo, long hi) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi)
        die("%s expects an integer from %ld to %ld, got '%s'", flag, lo, hi, v);
    return x;
}

static float parse_float(const char *flag, const char *v, float lo, float hi) {
    char *end;
    errno = 0;
    float x = strtof(v, &end);
    if (errno || end == v || *end || !isfinite(x) || x < lo || x > hi)
        die("%s expects a number from %g to %g, got '%s'", flag, lo, hi, v);
    return x;
}

static const char *MODES[] = {"generate", "chat", "tokenize", "decode", "logits", "ppl", "bench"};

static void parse_args(Options *o, int argc, char **argv) {
    *o = (Options){.mode = "generate", .kv = "f32", .batch = 64, .steps = 256, .top_k = 50, .temperature = 0.85f,
                   .top_p = 0.95f, .repeat_penalty = 1.0f, .rope_base = NAN, .rope_scale = NAN,
                   .yarn_beta_fast = NAN, .yarn_beta_slow = NAN, .yarn_attn_factor = NAN};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); exit(0); }
        if (!strcmp(a, "--no-batch")) { o->no_batch = true; continue; }
        if (!strcmp(a, "--ref-kernels")) { reference_kernels = true; continue; }
        if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) { o->verbose = true; continue; }
        if (!strcmp(a, "--think")) { o->think = true; continue; }
        if (!strcmp(a, "--show-tokens")) { o->show_tokens = true; continue; }
        if (!strcmp(a, "--csv")) { o->csv = true; continue; }
        if (a[0] != '-' || a[1] == 0) {
            if (o->model_path) die("unexpected argument '%s' (the model file is '%s')", a, o->model_path);
            o->model_path = a;
            continue;
        }
        if (i + 1 >= argc) die("%s needs a value (see --help)", a);
        const char *v = argv[++i];
        if (!strcmp(a, "-m")) o->mode = v;
        else if (!strcmp(a, "-i")) o->text = v;
        else if (!strcmp(a, "-f")) o->text_file = v;
        else if (!strcmp(a, "--ids")) o->ids_arg = v;
        else if (!strcmp(a, "-o")) o->out_path = v;
        else if (!strcmp(a, "-n")) o->steps = (int)parse_int(a, v, 0, 1 << 24);
        else if (!strcmp(a, "-t")) o->temperature = parse_float(a, v, 0, 100);
        else if (!strcmp(a, "-p")) o->top_p = parse_float(a, v, 0, 1);
        else if (!strcmp(a, "-k")) o->top_k = (int)parse_int(a, v, 0, 1 << 24);
        else if (!strcmp(a, "--repeat-penalty")) o->repeat_penalty = parse_float(a, v, 1e-3f, 1e3f);
        else if (!strcmp(a, "-s")) { o->seed = (unsigned long long)parse_int(a, v, 0, LONG_MAX); o->seed_given = true; }
        else if (!strcmp(a, "-y")) o->system = v;
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx")) o->ctx = (int)parse_int(a, v, 1, 1 << 24);
        else if (!strcmp(a, "--threads")) o->threads = (int)parse_int(a, v, 1, 1024);
        else if (!strcmp(a, "--batch")) o->batch = (int)parse_int(a, v, 1, 4096);
        else if (!strcmp(a, "--rope-base")) o->rope_base = parse_float(a, v, 1.0001f, 1e30f);
        else if (!strcmp(a, "--kv")) {
            if (strcmp(v, "f32") && strcmp(v, "f16")) die("--kv expects f32 or f16, got '%s'", v);
            o->kv = v;
        }
        else if (!strcmp(a, "--rope-scaling")) {
            if (strcmp(v, "none") && strcmp(v, "linear") && strcmp(v, "yarn"))
                die("--rope-scaling expects none, linear or yarn, got '%s'", v);
            o->rope_scaling = v;
        }
        else if (!strcmp(a, "--rope-scale")) o->rope_scale = parse_float(a, v, 1e-3f, 1e6f);
        else if (!strcmp(a, "--yarn-orig-ctx")) o->yarn_orig_ctx = (int)parse_int(a, v, 1, 1 << 24);
        else if (!strcmp(a, "--yarn-beta-fast")) o->yarn_beta_fast = parse_float(a, v, 1e-6f, 1e6f);
        else if (!strcmp(a, "--yarn-beta-slow")) o->yarn_beta_slow = parse_float(a, v, 1e-6f, 1e6f);
        else if (!strcmp(a, "--yarn-attn-factor")) o->yarn_attn_factor = parse_float(a, v, 1e-6f, 1e6f);
        else die("unknown option '%s' (see --help)", a);
    }
    if (!o->model_path) { usage(stderr); die("no model file given"); }
    bool known = false;
    for (size_t i = 0; i < sizeof MODES / sizeof MODES[0]; i++) known |= !strcmp(o->mode, MODES[i]);
    if (!known) die("-m expects generate, chat, tokenize, decode, logits, ppl or bench, got '%s'", o->mode);
    if (o->text && o->text_file) die("give the input text with -i or -f, not both");
}

/* RoPE: the model file's settings, then MiniMind's YaRN defaults when YaRN is newly asked for,
 * then the flags */
static Rope rope_from(const mm_header *h, const Options *o) {
    Rope r = {.scaling = (int)h->rope_scaling, .theta = h->rope_theta, .factor = h->rope_factor,
              .orig_ctx = (int)h->yarn_orig_ctx, .beta_fast = h->yarn_beta_fast,
              .beta_slow = h->yarn_beta_slow, .attn_factor = h->yarn_attn_factor};
    if (o->rope_scaling) {
        int want = !strcmp(o->rope_scaling, "yarn") ? MM_ROPE_YARN
                 : !strcmp(o->rope_scaling, "linear") ? MM_ROPE_LINEAR : MM_ROPE_NONE;
        if (want != r.scaling) {
            r.scaling = want;
            r.factor = want == MM_ROPE_YARN ? 16.0f : NAN;
            r.orig_ctx = 2048;
            r.beta_fast = 32.0f;
            r.beta_slow = 1.0f;
            r.attn_factor = 1.0f;
        }
    }
    if (!isnan(o->rope_base)) r.theta = o->rope_base;
    if (!isnan(o->rope_scale)) r.factor = o->rope_scale;
    if (o->yarn_orig_ctx) r.orig_ctx = o->yarn_orig_ctx;
    if (!isnan(o->yarn_beta_fast)) r.beta_fast = o->yarn_beta_fast;
    if (!isnan(o->yarn_beta_slow)) r.beta_slow = o->yarn_beta_slow;
    if (!isnan(o->yarn_attn_factor)) r.attn_factor = o->yarn_attn_factor;
    if (r.scaling == MM_ROPE_LINEAR && !(r.factor > 0)) die("--rope-scaling linear needs --rope-scale F");
    if (r.scaling != MM_ROPE_NONE && !(r.orig_ctx >= 1 && r.factor > 0))
        die("model file: rope scaling factor %g / original context %d invalid", r.factor, r.orig_ctx);
    return r;
}

/* the whole of a file, NUL-terminated; *len its size */
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("%s: cannot open (%s)", path, strerror(errno));
    size_t cap = 1 << 16, n = 0, got;
    char *buf = xcalloc(cap, 1, "file contents");
    while ((got = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (n + 1 == cap) {
            char *bigger = realloc(buf, cap *= 2);
            if (!bigger) die("%s: out of memory reading it", path);
            buf = bigger;
        }
    }
    if (ferror(f)) die("%s: read failed", path);
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

/* The ids in text p, checked, written to ids when it is not NULL; their count. */
static size_t scan_ids(const char *p, int *ids, uint32_t vocab) {
    size_t n = 0;
    while (*p) {
        if (*p == ',' || *p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') { p++; continue; }
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || (*end && !strchr(", \n\t\r", *end)))
            die("--ids: '%.20s' is not a token id (expected non-negative integers)", p);
        if (v < 0 || v >= (long)vocab) die("--ids: token id %ld is outside the vocab of %u", v, vocab);
        if (ids) ids[n] = (int)v;
        n++;
        p = end;
    }
    return n;
}

/* --ids "1,2,3" or --ids @FILE: checked and counted first, so that an error leaves nothing
 * allocated but the file's text */
static int *parse_ids(const char *arg, int *n_out, uint32_t vocab) {
    size_t file_len = 0;
    char *text = arg[0] == '@' ? read_file(arg + 1, &file_len) : NULL;
    if (text && strlen(text) != file_len) die("%s: ids file contains a NUL byte", arg + 1);
    const char *p = text ? text : arg;
    size_t n = scan_ids(p, NULL, vocab);
    if (n == 0) die("--ids: no token ids given");
    if (n > INT_MAX) die("--ids: %zu token ids, more than %d", n, INT_MAX);
    int *ids = xcalloc(n, sizeof(int), "ids");
    scan_ids(p, ids, vocab);
    free(text);
    *n_out = (int)n;
    return ids;
}

#ifndef MINIMIND_NO_MAIN  /* tests/kernel_test.c includes this file for its kernels */
int main(int argc, char **argv) {
    Options o;
    parse_args(&o, argc, argv);
#ifdef _OPENMP
    omp_set_num_threads(o.threads ? o.threads : omp_get_num_procs());
#endif
    Model m;
    model_load(&m, o.model_path);
    const mm_header *h = &m.cfg;
    Tokenizer tok;
    const char *tok_err = tokenizer_load(&tok, m.tokenizer, h->tokenizer_size, h->vocab_size);
    if (tok_err) die("%s: %s", o.model_path, tok_err);
    Rope rope = rope_from(h, &o);
    int ctx = o.ctx ? o.ctx : (int)h->max_seq_len;
    bool generating = !strcmp(o.mode, "generate"), chatting = !strcmp(o.mode, "chat");
    bool benching = !strcmp(o.mode, "bench");

    /* the input: token ids, or text (which generate, logits and ppl start with BOS) */
    size_t text_len = 0;
    char *text = o.text_file ? read_file(o.text_file, &text_len) : NULL;
    if (o.text) text_len = strlen(o.text);
    const char *input = text ? text : o.text;
    if (!strcmp(o.mode, "tokenize")) {
        if (!input) die("-m tokenize needs -i TEXT or -f FILE");
        int n;
        int *ids = encode_text(&tok, (const uint8_t *)input, text_len, &n);
        for (int i = 0; i < n; i++) {
            if (!o.show_tokens) { printf(i ? " %d" : "%d", ids[i]); continue; }
            size_t len;
            const uint8_t *b = tokenizer_decode(&tok, ids[i], &len);
            printf("%d\t", ids[i]);
            print_token_text(b, len);
            putchar('\n');
        }
        if (!o.show_tokens) putchar('\n');
        free(ids); free(text); tokenizer_free(&tok); model_free(&m);
        return 0;
    }
    int n_ids = 0, *ids = NULL;
    if (o.ids_arg && input) die("give token ids (--ids) or text (-i/-f), not both");
    if (o.ids_arg) {
        ids = parse_ids(o.ids_arg, &n_ids, h->vocab_size);
    } else if (input) {
        int n;
        int *body = encode_text(&tok, (const uint8_t *)input, text_len, &n);
        ids = xcalloc((size_t)n + 1, sizeof(int), "token ids");
        ids[0] = (int)h->bos_id;  /* MiniMind feeds <|im_start|> + text */
        memcpy(ids + 1, body, sizeof(int) * (size_t)n);
        n_ids = n + 1;
        free(body);
    } else if (!chatting && !benching) {
        die("-m %s needs %s", o.mode, generating ? "a prompt (-i TEXT or -f FILE)"
                                                 : "token ids (--ids) or text (-i / -f)");
    }
    free(text);
    if (!strcmp(o.mode, "decode")) {
        Utf8Stream out = {0};
        for (int i = 0; i < n_ids; i++) {
            size_t len;
            const uint8_t *b = tokenizer_decode(&tok, ids[i], &len);
            utf8_stream_put(&out, b, len, stdout);
        }
        utf8_stream_flush(&out, stdout);
        free(ids); tokenizer_free(&tok); model_free(&m);
        return 0;
    }
    bool ppl = !strcmp(o.mode, "ppl");
    if (!ppl && n_ids > ctx)
        die("the prompt is %d tokens; it does not fit the context of %d positions (-c)", n_ids, ctx);
    if (!strcmp(o.mode, "logits") && !o.out_path) die("-m logits needs -o FILE for the logits");
    int batch = o.batch < ctx ? o.batch : ctx, kv_dtype = !strcmp(o.kv, "f16") ? MM_F16 : MM_F32;
    check_memory(&m, batch, ctx, kv_dtype);
    State s;
    state_init(&s, &m, batch, ctx, &rope, kv_dtype);
    if (o.verbose) {
        static const char *scaling[] = {"none", "linear", "yarn"};
        fprintf(stderr, "%s: %s, hidden %u, %u layers, %u/%u heads of %u, %s %u, vocab %u, "
                "matrices %s\n", o.model_path, h->generation == MM_GEN_MINIMIND3 ? "minimind-3" : "MiniMind2",
                h->dim, h->n_layers, h->n_heads, h->n_kv_heads, h->head_dim,
                h->flags & MM_FLAG_MOE ? "MoE expert ffn" : "ffn",
                h->flags & MM_FLAG_MOE ? h->moe_hidden_dim : h->hidden_dim, h->vocab_size,
                dtype_name(m.layers[0].wq.dtype));
        fprintf(stderr, "rope: theta %g, scaling %s (factor %g, orig ctx %d, beta %g/%g, attn %g); "
                "ctx %d, batch %d, threads %d, kv cache %s, kernels %s\n", rope.theta, scaling[rope.scaling],
                rope.factor, rope.orig_ctx, rope.beta_fast, rope.beta_slow, rope.attn_factor, ctx, batch,
                n_threads(), o.kv, reference_kernels ? "reference" : KERNELS);
    }
    double t0 = now_seconds();
    if (benching) {
        Context c = {.tokens = xcalloc((size_t)ctx, sizeof(int), "context")};
        bench(&m, &s, &c, o.steps);
        free(c.tokens);
    } else if (generating || chatting) {
        Sampler sp = {.vocab = (int)h->vocab_size, .temperature = o.temperature, .top_p = o.top_p,
                      .top_k = o.top_k, .repeat_penalty = o.repeat_penalty,
                      .rng = o.seed_given ? o.seed : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32)};
        if (sp.rng == 0) sp.rng = 0x9E3779B97F4A7C15ull;  /* xorshift must not start at 0 */
        sp.cand = xcalloc(h->vocab_size, sizeof *sp.cand, "sampler");
        sp.kth = xcalloc((size_t)(o.top_k > 0 ? o.top_k : 1), sizeof(float), "sampler");
        Context c = {.tokens = xcalloc((size_t)ctx, sizeof(int), "context"),
                     .seen = xcalloc(h->vocab_size, 1, "context")};
        catch_sigint();
        if (generating) {
            memcpy(c.tokens, ids, sizeof(int) * (size_t)n_ids);
            c.n = n_ids;
            Stats st = {0};
            generate(&m, &s, &tok, &sp, &c, o.steps, NULL, &st);
            fputc('\n', stdout);
            fflush(stdout);  /* the text before the stats, also when both go to one pipe */
            print_stats(&st);
        } else {
            chat(&m, &s, &tok, &sp, &c, o.system, o.think, o.steps, o.verbose);
        }
        free(c.tokens); free(c.seen); free(sp.cand); free(sp.kth);
        if (interrupted) fputs("[interrupted]\n", stderr);
    } else if (!ppl) {
        LogitsOut out = {.out = fopen(o.out_path, "wb"), .path = o.out_path, .vocab = (int)h->vocab_size};
        if (!out.out) die("%s: cannot open for writing (%s)", o.out_path, strerror(errno));
        run_sequence(&m, &s, ids, n_ids, !o.no_batch, write_logits, &out);
        if (fclose(out.out) != 0) die("%s: write failed (%s)", o.out_path, strerror(errno));
    } else {
        int n_windows = (n_ids + ctx - 1) / ctx;
        PplSum sum = {.vocab = (int)h->vocab_size, .total = n_ids - n_windows};
        for (int w = 0; w < n_windows; w++) {
            sum.tokens = ids + (size_t)w * ctx;
            sum.n = n_ids - w * ctx < ctx ? n_ids - w * ctx : ctx;
            run_sequence(&m, &s, sum.tokens, sum.n, !o.no_batch, add_nll, &sum);
            if (o.verbose && n_windows > 1)
                fprintf(stderr, "window %d/%d: ppl %.4f over %ld tokens\n", w + 1, n_windows,
                        sum.count ? exp(sum.nll / sum.count) : NAN, sum.count);
        }
        if (sum.count == 0) die("ppl needs at least 2 tokens in a window (got %d ids, -c %d)", n_ids, ctx);
        if (o.csv)
            printf("context,windows,tokens,nll,ppl\n%d,%d,%ld,%.8f,%.6f\n", ctx, n_windows, sum.count,
                   sum.nll / sum.count, exp(sum.nll / sum.count));
        else
            printf("ppl = %.6f over %ld tokens\n", exp(sum.nll / sum.count), sum.count);
    }
    if (o.verbose && !generating && !chatting && !benching)
        fprintf(stderr, "%d tokens in %.3f s (%.1f tokens/s)\n", n_ids, now_seconds() - t0,
                n_ids / (now_seconds() - t0));
    if (o.verbose)  /* the cache is calloc'ed: only the positions used become resident */
        fprintf(stderr, "memory: peak RSS %.1f MB; model file %.1f MB (mapped), KV cache %.1f MB for %d "
                "positions (%s)\n", peak_rss_mb(), m.map_size / 1048576.0,
                2.0 * h->n_layers * ctx * h->n_kv_heads * h->head_dim * (s.kv_dtype == MM_F16 ? 2 : 4) / 1048576.0,
                ctx, o.kv);
    free(ids);
    state_free(&s);
    tokenizer_free(&tok);
    model_free(&m);
    if (interrupted) {
        signal(SIGINT, SIG_DFL);
        raise(SIGINT);
    }
    return interrupted ? 128 + SIGINT : 0;
}
#endif
