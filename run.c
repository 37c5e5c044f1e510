/* run.c: inference for MiniMind models (MiniMind2 and minimind-3, dense and MoE) in C.
 *
 * Read top to bottom: the model file and its loader, RoPE's settings, the run state, the building
 * blocks in plain C (a weight row, dot products, rmsnorm, RoPE, the KV cache, attention of one
 * head, SwiGLU, the MoE router), the plug points where the fast kernels come in, the forward pass,
 * sampling, generation and chat, the command line. The maths follows MiniMind's
 * model/model_minimind.py; the layout of a model file is model.h; the fast kernels are behind
 * kernels.h.
 */
#define _POSIX_C_SOURCE 200809L  /* mmap, clock_gettime */
#define _DEFAULT_SOURCE          /* MAP_POPULATE (Linux) */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
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

#include "model.h"
#include "kernels.h"            /* the fast kernels' interface, and what run.c shares with them */
#include "kernels/attention.c"  /* their code: one translation unit, as tokenizer.c */
#include "kernels/matmul.c"
#include "tokenizer.c"          /* tokenizer_*, utf8_*, chat_* */

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

/* n x size zeroed bytes that start on a 64-byte boundary, a cache line, so that a vector load of
 * the activations never straddles two lines (calloc's large blocks start 16 bytes past a page) */
#define CACHE_LINE 64
static void *xcalloc(size_t n, size_t size, const char *what) {
    n = n ? n : 1, size = size ? size : 1;
    if (n > (SIZE_MAX - CACHE_LINE) / size)
        die("out of memory allocating %s (%zu x %zu bytes)", what, n, size);
    size_t bytes = (n * size + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE;  /* aligned_alloc's rule */
    void *p = aligned_alloc(CACHE_LINE, bytes);
    if (!p) die("out of memory allocating %s (%zu x %zu bytes)", what, n, size);
    return memset(p, 0, bytes);
}

static char *xstrdup(const char *s) {
    char *copy = strdup(s);
    if (!copy) die("out of memory copying %zu bytes of text", strlen(s));
    return copy;
}

/* The KV cache: anonymous memory, whose zeroed pages the kernel maps in when they are first
 * written: the cache's pages of positions (kernels.h) take memory as the positions are reached.
 * Where the kernel offers 2 MB pages on request, ask for all but the first 2 MB (long contexts
 * read the cache faster through fewer TLB entries; the first tokens, in small pages, do not wait
 * for 2 MB to be zeroed and perhaps compacted). The start is 2 MB-aligned, so that the rest takes
 * whole 2 MB pages. Returns the start; *map, *map_bytes: what to munmap. */
#define HUGE_PAGE ((size_t)2 << 20)
static void *alloc_kv(size_t bytes, void **map, size_t *map_bytes) {
    *map_bytes = bytes + HUGE_PAGE;
    *map = mmap(NULL, *map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (*map == MAP_FAILED) {
        *map = NULL;  /* (nothing for state_free to unmap) */
        die("out of memory allocating the KV cache (%zu bytes)", bytes);
    }
    uint8_t *start = (uint8_t *)(((uintptr_t)*map + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
#ifdef MADV_HUGEPAGE
    if (bytes > 2 * HUGE_PAGE)  /* only advice: may be refused */
        (void)madvise(start + HUGE_PAGE, bytes / HUGE_PAGE * HUGE_PAGE - HUGE_PAGE, MADV_HUGEPAGE);
#endif
    return start;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}


/* ============================================================================================
 * The model: config from the header, weights pointing into the mapped file
 * ============================================================================================ */

/* (Matrix, a linear weight [rows, cols] in the mapped file, is kernels.h's) */

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

/* bytes of a [rows, cols] tensor in a dtype; 0 when it cannot be stored that way */
static uint64_t tensor_bytes(uint32_t dtype, uint64_t rows, uint64_t cols) {
    uint64_t n = rows * cols;
    switch (dtype) {
    case MM_F32: return n * 4;
    case MM_F16: case MM_BF16: return n * 2;
    case MM_Q8_0:
        return cols % MM_Q8_GROUP ? 0 : (rows + MM_Q8_PANEL - 1) / MM_Q8_PANEL * q8_panel_bytes(cols);
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

/* The matrices that are multiplied in one call (q, k and v; an FFN's gate and up) share a dtype:
 * the fast kernels take one dtype a call. name: the second's tensor name. */
static void same_dtype(const Loader *ld, const Matrix *a, const Matrix *b, const char *name) {
    if (a->dtype != b->dtype)
        die("%s: tensor %s has dtype %s, expected %s as its companions in one matmul (q/k/v or gate/up)",
            ld->m->path, name, dtype_name((uint32_t)b->dtype), dtype_name((uint32_t)a->dtype));
}

static FFN load_ffn(Loader *ld, const char *prefix, uint32_t dim, uint32_t hidden) {
    char name[MM_NAME_LEN + 32];
    FFN f;
    snprintf(name, sizeof name, "%sgate_proj.weight", prefix);
    f.gate = load_matrix(ld, name, hidden, dim);
    snprintf(name, sizeof name, "%sup_proj.weight", prefix);
    f.up = load_matrix(ld, name, hidden, dim);
    same_dtype(ld, &f.gate, &f.up, name);
    snprintf(name, sizeof name, "%sdown_proj.weight", prefix);
    f.down = load_matrix(ld, name, dim, hidden);
    return f;
}

/* Check the header's numbers before anything trusts them. */
static void check_config(const Model *m) {
    const mm_header *h = &m->cfg;
    const char *p = m->path;
#define REQUIRE(cond, ...) do { if (!(cond)) die(__VA_ARGS__); } while (0)
#define IN_RANGE(field, lo, hi) /* lo <= field <= hi (unsigned: below lo wraps past hi - lo) */            \
    REQUIRE(h->field - (lo) <= (uint32_t)(hi) - (lo), "%s: header field " #field " = %u, expected %u..%u", \
            p, h->field, (unsigned)(lo), (unsigned)(hi))
    IN_RANGE(dim, 1, 65536);
    IN_RANGE(n_layers, 1, 1024);
    IN_RANGE(n_heads, 1, 1024);
    REQUIRE(h->n_kv_heads >= 1 && h->n_heads % h->n_kv_heads == 0,
            "%s: header field n_kv_heads = %u, expected a divisor of n_heads %u", p, h->n_kv_heads,
            h->n_heads);
    REQUIRE(h->head_dim >= 2 && h->head_dim <= 4096 && h->head_dim % 2 == 0,
            "%s: header field head_dim = %u, expected an even number 2..4096", p, h->head_dim);
    IN_RANGE(vocab_size, 1, 1u << 24);
    IN_RANGE(max_seq_len, 1, 1u << 24);
    REQUIRE(h->generation == MM_GEN_MINIMIND2 || h->generation == MM_GEN_MINIMIND3,
            "%s: header field generation = %u, expected 2 (MiniMind2) or 3 (minimind-3)", p, h->generation);
    REQUIRE((h->flags & ~(uint32_t)(MM_FLAG_QK_NORM | MM_FLAG_TIED_EMBED | MM_FLAG_MOE)) == 0,
            "%s: header field flags = 0x%x has unknown bits", p, h->flags);
    REQUIRE(isfinite(h->rms_eps) && h->rms_eps > 0 && h->rms_eps < 1,
            "%s: header field rms_eps = %g, expected 0 < eps < 1", p, h->rms_eps);
    REQUIRE(isfinite(h->rope_theta) && h->rope_theta > 1, "%s: header field rope_theta = %g, expected > 1", p,
            h->rope_theta);
    if (h->flags & MM_FLAG_MOE) {
        IN_RANGE(n_experts, 1, 1024);
        REQUIRE(h->n_experts_per_tok >= 1 && h->n_experts_per_tok <= h->n_experts,
                "%s: header field n_experts_per_tok = %u, expected 1..%u", p, h->n_experts_per_tok,
                h->n_experts);
        IN_RANGE(n_shared_experts, 0, 1024);
        IN_RANGE(moe_hidden_dim, 1, 1u << 20);
        IN_RANGE(moe_norm, 0, MM_MOE_NORM_ALWAYS);
    } else {
        IN_RANGE(hidden_dim, 1, 1u << 20);
    }
    IN_RANGE(rope_scaling, 0, MM_ROPE_YARN);
    IN_RANGE(chat_template, 0, MM_CHAT_MINIMIND2_NO_TOOLS);
    REQUIRE(h->bos_id < h->vocab_size && h->eos_id < h->vocab_size && h->pad_id < h->vocab_size,
            "%s: bos/eos/pad ids %u/%u/%u outside the vocab of %u", p, h->bos_id, h->eos_id, h->pad_id,
            h->vocab_size);
    REQUIRE((uint64_t)h->n_heads * h->head_dim <= (1u << 20), "%s: n_heads x head_dim too large", p);
#undef IN_RANGE
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
        same_dtype(&ld, &L->wq, &L->wk, name);
        L->wv = load_matrix(&ld, NAME("%s", "self_attn.v_proj.weight"), kv_dim, dim);
        same_dtype(&ld, &L->wq, &L->wv, name);
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

/* two kinds of scaling more than a model file stores (model.h), from the command line: NTK-aware
 * (a larger base, theta F^(d/(d-2))) and transformers' dynamic NTK (that for the context's length) */
enum { ROPE_NTK = MM_ROPE_YARN + 1, ROPE_DYNAMIC };

typedef struct {
    int scaling;                /* enum mm_rope_scaling, ROPE_NTK or ROPE_DYNAMIC */
    float theta;                /* rope_theta, or --rope-base */
    float factor;               /* F: linear divides positions by it, YaRN slows low frequencies,
                                 * NTK and dynamic raise the base */
    int orig_ctx;               /* YaRN and dynamic: original_max_position_embeddings */
    float beta_fast, beta_slow; /* YaRN: ramp ends, in rotations over orig_ctx */
    float attn_factor;          /* YaRN: multiplies cos and sin */
    int pos_offset;             /* --pos-offset: the first position's number */
    bool off;                   /* --no-rope: no rotation at all */
} Rope;

/* the base NTK scaling turns theta into: theta x F^(d/(d-2)); dynamic, for a context of `window`
 * tokens past the original context C, theta x (F window / C - (F - 1))^(d/(d-2)) (in double, as
 * transformers computes it, then rounded to f32) */
static float rope_theta_scaled(const Rope *r, int head_dim, int window) {
    double d = head_dim, base = r->theta;
    if (r->scaling == ROPE_NTK) base *= pow(r->factor, d / (d - 2));
    if (r->scaling == ROPE_DYNAMIC && window > r->orig_ctx)
        base *= pow((double)r->factor * window / r->orig_ctx - (r->factor - 1), d / (d - 2));
    return (float)base;
}

/* YaRN's ramp for pair i: 0 where a pair turns more than beta_fast times over the original
 * context (kept), 1 where it turns fewer than beta_slow times (interpolated), linear between */
static float yarn_ramp(const Rope *r, int i, int head_dim) {
    /* the pair index at which a frequency makes b rotations over the original context */
    double ln_theta = log((double)r->theta);
#define DIM_OF(b) (head_dim * log(r->orig_ctx / ((b) * 2 * 3.14159265358979323846)) / (2 * ln_theta))
    double low = fmax(floor(DIM_OF((double)r->beta_fast)), 0.0);
    double high = fmin(ceil(DIM_OF((double)r->beta_slow)), (double)(head_dim / 2 - 1));
#undef DIM_OF
    float span = (float)fmax(high - low, 0.001);
    float ramp = ((float)i - (float)low) / span;
    return ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
}

/* inv_freq[i] for i < head_dim/2, computed in fp32 exactly as upstream does; window: the context's
 * length (dynamic NTK) */
static void rope_inv_freq(float *inv_freq, const Rope *r, int head_dim, int max_seq_len, int window) {
    int half = head_dim / 2;
    float theta = rope_theta_scaled(r, head_dim, window);
    for (int i = 0; i < half; i++)
        inv_freq[i] = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
    if (r->scaling == MM_ROPE_LINEAR) {
        for (int i = 0; i < half; i++) inv_freq[i] /= r->factor;
    } else if (r->scaling == MM_ROPE_YARN && (double)max_seq_len / r->orig_ctx > 1.0) {
        for (int i = 0; i < half; i++) {
            float ramp = yarn_ramp(r, i, head_dim);
            inv_freq[i] = inv_freq[i] * ((1.0f - ramp) + ramp / r->factor);
        }
    }
}

/* ============================================================================================
 * The run state: activations for a block of tokens, the KV cache, scratch
 * ============================================================================================ */

typedef struct {
    int max_tokens;             /* tokens per forward call (--batch) */
    int ctx;                    /* positions the KV cache holds (-c) */
    float *x;                   /* [max_tokens, dim] the residual stream */
    float *xb;                  /* [max_tokens, dim] the normed input of a sublayer */
    float *q;                   /* [max_tokens, n_heads * head_dim] */
    float *k, *v;               /* [max_tokens, n_kv_heads * head_dim] the block's keys and values */
    float *att_out;             /* [max_tokens, n_heads * head_dim] attention's output */
    float *delta;               /* [max_tokens, dim] a sublayer's output, before the residual add */
    float *hb, *hb2;            /* [max_tokens, ffn] SwiGLU's gate and up */
    float *router;              /* [max_tokens, n_experts] MoE router probabilities */
    int *top_idx;               /* [max_tokens, top_k] the experts each token goes to */
    float *top_w;               /* [max_tokens, top_k] and their weights */
    float *moe_in, *moe_out;    /* [max_tokens, dim] the rows routed to one expert */
    int *moe_rows;              /* [max_tokens] which rows those are */
    float *moe_w;               /* [max_tokens] and the weight each gives the expert */
    float *inv_freq;            /* [head_dim / 2] RoPE's frequencies */
    float attn_factor;          /* YaRN's factor on cos and sin, else 1 */
    int pos_offset;             /* RoPE's position of cache position 0 (--pos-offset) */
    bool rope_off;              /* --no-rope */
    float *cos, *sin;           /* [max_tokens, head_dim / 2] the rotation of each token's position */
    float *logits;              /* [max_tokens, vocab] */
    int kv_dtype;               /* the KV cache: MM_F32, or MM_F16 (--kv f16) */
    void *kv_cache;             /* [ceil(ctx / KV_PAGE) pages] of keys and values (kernels.h) */
    void *kv_map;               /* the mapping that holds it (alloc_kv) */
    size_t kv_map_bytes;
    float *row_buf;             /* [threads, row_buf_len] a weight row as f32 (matmul_plain) */
    int row_buf_len;
    int8_t *xq;                 /* [max_tokens, max cols] x quantised for a q8_0 matrix (matmul_plain) */
    float *xs;                  /* [max_tokens, max cols / 32] their scales */
    float *scores;              /* [threads, ctx] attention scores (attention_head) */
    KernelScratch ks;           /* the fast kernels' scratch */
    void *buffers[40];          /* every buffer above, for state_free */
    int n_buffers;
    bool counting;              /* state_init only adds up the bytes it would allocate */
    uint64_t bytes;
} State;

/* n x size zeroed bytes for the state, or with s->counting only their count */
static void *state_buffer(State *s, size_t n, size_t size) {
    s->bytes += (uint64_t)n * size;
    if (s->counting) return NULL;
    if (s->n_buffers == (int)(sizeof s->buffers / sizeof s->buffers[0]))
        die("internal: too many state buffers");
    return s->buffers[s->n_buffers++] = xcalloc(n, size, "the run state");
}

/* bytes of one page of the KV cache: keys and values of KV_PAGE positions, every layer and kv head */
static uint64_t kv_page_bytes(const mm_header *h, int kv_dtype) {
    return 2 * (uint64_t)h->n_layers * h->n_kv_heads * KV_PAGE * h->head_dim * kv_elem_size(kv_dtype);
}

/* bytes of the KV cache for n positions: whole pages */
static uint64_t kv_cache_bytes(const mm_header *h, int n, int kv_dtype) {
    return ((uint64_t)n + KV_PAGE - 1) / KV_PAGE * kv_page_bytes(h, kv_dtype);
}

/* The state for blocks of up to max_tokens tokens and a context of ctx positions; with counting,
 * only s->bytes, what it would take (fit_context). Every buffer is sized here and nowhere else. */
static void state_init(State *s, const Model *m, int max_tokens, int ctx, const Rope *rope, int kv_dtype,
                       bool counting) {
    const mm_header *h = &m->cfg;
    size_t T = (size_t)max_tokens, dim = h->dim, hd = h->head_dim, nt = (size_t)n_threads();
    size_t q_dim = h->n_heads * hd, kv_dim = h->n_kv_heads * hd, E = h->n_experts, k = h->n_experts_per_tok;
    size_t ffn = h->flags & MM_FLAG_MOE ? h->moe_hidden_dim : h->hidden_dim;
    size_t max_cols = dim > q_dim ? dim : q_dim;  /* the widest x a matrix multiplies */
    max_cols = ffn > max_cols ? ffn : max_cols;
    *s = (State){.max_tokens = max_tokens, .ctx = ctx, .kv_dtype = kv_dtype, .counting = counting,
                 .row_buf_len = 2 * (int)max_cols};
    s->x = state_buffer(s, T * dim, sizeof(float));
    s->xb = state_buffer(s, T * dim, sizeof(float));
    s->q = state_buffer(s, T * q_dim, sizeof(float));
    s->k = state_buffer(s, T * kv_dim, sizeof(float));
    s->v = state_buffer(s, T * kv_dim, sizeof(float));
    s->att_out = state_buffer(s, T * q_dim, sizeof(float));
    s->delta = state_buffer(s, T * dim, sizeof(float));
    s->hb = state_buffer(s, T * ffn, sizeof(float));
    s->hb2 = state_buffer(s, T * ffn, sizeof(float));
    if (h->flags & MM_FLAG_MOE) {
        s->router = state_buffer(s, T * E, sizeof(float));
        s->top_idx = state_buffer(s, T * k, sizeof(int));
        s->top_w = state_buffer(s, T * k, sizeof(float));
        s->moe_in = state_buffer(s, T * dim, sizeof(float));
        s->moe_out = state_buffer(s, T * dim, sizeof(float));
        s->moe_rows = state_buffer(s, T, sizeof(int));
        s->moe_w = state_buffer(s, T, sizeof(float));
    }
    s->inv_freq = state_buffer(s, hd / 2, sizeof(float));
    s->cos = state_buffer(s, T * hd / 2, sizeof(float));
    s->sin = state_buffer(s, T * hd / 2, sizeof(float));
    s->logits = state_buffer(s, T * h->vocab_size, sizeof(float));
    s->row_buf = state_buffer(s, nt * (size_t)s->row_buf_len, sizeof(float));
    s->xq = state_buffer(s, T * max_cols, 1);
    s->xs = state_buffer(s, T * (max_cols / MM_Q8_GROUP + 1), sizeof(float));
    s->scores = state_buffer(s, nt * (size_t)ctx, sizeof(float));
    int group = (int)(h->n_heads / h->n_kv_heads);
    void *scratch =
        state_buffer(s, kernel_scratch_bytes(max_tokens, (int)max_cols, group, (int)hd, (int)nt), 1);
    uint64_t kv_bytes = kv_cache_bytes(h, ctx, kv_dtype);
    s->bytes += kv_bytes;
    if (counting) return;
    kernel_scratch_init(&s->ks, scratch, max_tokens, (int)max_cols, group, (int)hd, (int)nt);
    rope_inv_freq(s->inv_freq, rope, (int)hd, (int)h->max_seq_len, rope->pos_offset + ctx);
    s->attn_factor = rope->scaling == MM_ROPE_YARN ? rope->attn_factor : 1.0f;
    s->pos_offset = rope->pos_offset, s->rope_off = rope->off;
    s->kv_cache = alloc_kv(kv_bytes, &s->kv_map, &s->kv_map_bytes);  /* mapped, not written */
}

static void state_free(State *s) {
    for (int i = 0; i < s->n_buffers; i++) free(s->buffers[i]);
    if (s->kv_map) munmap(s->kv_map, s->kv_map_bytes);
}

/* layer l's part of the KV cache */
static KvLayer kv_layer(const State *s, const mm_header *h, uint32_t l) {
    size_t keys_bytes = (size_t)h->n_kv_heads * KV_PAGE * h->head_dim * kv_elem_size(s->kv_dtype);
    uint8_t *layer = (uint8_t *)s->kv_cache + l * 2 * keys_bytes;  /* in page 0: its keys, then values */
    return (KvLayer){.keys = layer,
                     .values = layer + keys_bytes,
                     .page_bytes = kv_page_bytes(h, s->kv_dtype),
                     .dtype = s->kv_dtype,
                     .n_kv_heads = (int)h->n_kv_heads,
                     .group = (int)(h->n_heads / h->n_kv_heads),
                     .head_dim = (int)h->head_dim};
}

/* ---- what this process may use: memory and CPUs ----
 * A container's limits live in its cgroup, not in what sysconf reports of the machine. Linux
 * lists a process's groups in /proc/self/cgroup, one line each: "0::/path" in cgroup v2, and
 * "id:controllers:/path" per hierarchy in v1. A limit holds for a group and everything under it,
 * so the one that binds is the smallest over the group and its parents. */

#define PATH_LEN 4096

/* what one group's folder says (dir: in the v2 hierarchy, or in v1's), or INFINITY: no limit */
typedef double (*CgroupValue)(const char *dir, bool v2);

/* a small file's first line into buf ("" when it cannot be read) */
static const char *read_line(const char *dir, const char *name, char *buf, size_t size) {
    char path[2 * PATH_LEN];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r");
    buf[0] = 0;
    if (f) {
        if (!fgets(buf, (int)size, f)) buf[0] = 0;
        fclose(f);
    }
    return buf;
}

/* is `word` one of the comma-separated controllers? */
static bool has_controller(const char *list, const char *word) {
    size_t n = strlen(word);
    for (const char *p = list; p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
        if (!strncmp(p, word, n) && (p[n] == ',' || p[n] == 0)) return true;
    return false;
}

/* the smallest value over this process's group of `controller` (v1) or its v2 group, their
 * parents and the root of their mount (a container's own group, when it has no cgroup namespace),
 * where the hierarchies are mounted in the usual places */
static double cgroup_limit(const char *controller, CgroupValue value) {
    double limit = INFINITY;
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (!f) return limit;
    char line[PATH_LEN], dir[2 * PATH_LEN];
    while (fgets(line, sizeof line, f)) {
        if (!strchr(line, '\n')) {  /* a path too long to read here: skip the rest of its line */
            int c;
            while ((c = fgetc(f)) != EOF && c != '\n') {}
            continue;
        }
        line[strcspn(line, "\n")] = 0;
        char *controllers = strchr(line, ':'), *path = controllers ? strchr(controllers + 1, ':') : NULL;
        if (!path || path[1] != '/') continue;
        *controllers++ = 0;
        *path++ = 0;
        bool v2 = !strcmp(line, "0") && !*controllers;
        if (!v2 && !has_controller(controllers, controller)) continue;
        char roots[2][PATH_LEN / 4];
        if (v2) {
            snprintf(roots[0], sizeof roots[0], "/sys/fs/cgroup");
            snprintf(roots[1], sizeof roots[1], "/sys/fs/cgroup/unified");
        } else {
            snprintf(roots[0], sizeof roots[0], "/sys/fs/cgroup/%s", controller);
            snprintf(roots[1], sizeof roots[1], "/sys/fs/cgroup/%s", controllers);  /* "cpu,cpuacct" */
        }
        for (int r = 0; r < 2; r++)
            for (size_t len = strlen(path);;) {  /* the group, each parent, the root */
                snprintf(dir, sizeof dir, "%s%.*s", roots[r], (int)len, path);
                double v = value(dir, v2);
                limit = v < limit ? v : limit;
                if (len == 0) break;
                while (len > 0 && path[len - 1] != '/') len--;  /* drop the last name ... */
                if (len > 0) len--;                             /* ... and its slash */
            }
    }
    fclose(f);
    return limit;
}

/* what a group may still take: its limit less what it holds (v2: memory.max, "max" for none, and
 * memory.current; v1: memory.limit_in_bytes, a huge number for none, and memory.usage_in_bytes) */
static double memory_left(const char *dir, bool v2) {
    char limit[64], used[64];
    read_line(dir, v2 ? "memory.max" : "memory.limit_in_bytes", limit, sizeof limit);
    if (limit[0] < '0' || limit[0] > '9') return INFINITY;
    read_line(dir, v2 ? "memory.current" : "memory.usage_in_bytes", used, sizeof used);
    double left = strtod(limit, NULL) - strtod(used, NULL);
    return left > 0 ? left : 0;
}

/* CPUs' worth of time per period: cpu.max (v2: "quota period", "max period" for none), or
 * cpu.cfs_quota_us / cpu.cfs_period_us (v1: -1 for none) */
static double cpu_quota(const char *dir, bool v2) {
    char a[64], b[64];
    double quota, period;
    if (v2) {
        read_line(dir, "cpu.max", a, sizeof a);
        if (sscanf(a, "%lf %lf", &quota, &period) != 2) return INFINITY;
    } else {
        quota = strtod(read_line(dir, "cpu.cfs_quota_us", a, sizeof a), NULL);
        period = strtod(read_line(dir, "cpu.cfs_period_us", b, sizeof b), NULL);
    }
    return quota > 0 && period > 0 ? quota / period : INFINITY;
}

/* The CPUs this process may use: those of its affinity mask (OpenMP counts them), no more than its
 * cgroup's CPU quota, rounded up */
static int usable_cpus(void) {
#ifdef _OPENMP
    int n = omp_get_num_procs();
#else
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    int n = online > 0 ? (int)online : 1;
#endif
    double quota = cgroup_limit("cpu", cpu_quota);
    return quota < n ? (quota > 1 ? (int)ceil(quota) : 1) : n;
}

/* bytes of address space this process has mapped now (Linux: /proc/self/statm), or at least the
 * model file's */
static uint64_t mapped_now(const Model *m) {
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long long pages = 0;
    if (f) {
        if (fscanf(f, "%llu", &pages) != 1) pages = 0;
        fclose(f);
    }
    uint64_t bytes = (uint64_t)pages * (uint64_t)sysconf(_SC_PAGESIZE);
    return bytes > m->map_size ? bytes : m->map_size;
}

/* The bytes this process may still take, and what bounds them: this machine's memory, the address
 * space that RLIMIT_AS (ulimit -v) leaves, or what a cgroup's memory limit leaves (the limit counts
 * the pages of the model file in memory, as it counts the process's own, and other processes') */
static uint64_t memory_available(const Model *m, const char **what) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    uint64_t have = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : UINT64_MAX;
    *what = "memory";
    struct rlimit rl;
    if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        uint64_t mapped = mapped_now(m), left = rl.rlim_cur > mapped ? (uint64_t)rl.rlim_cur - mapped : 0;
        if (left < have) {
            have = left;
            *what = "address space that ulimit -v leaves";
        }
    }
    double group = cgroup_limit("memory", memory_left);
    if (group < (double)have) {
        have = (uint64_t)group;
        *what = "memory that this cgroup's limit leaves";
    }
    return have;
}

/* bytes a state for ctx positions takes: the state's buffers with a full KV cache (and its
 * mapping's alignment, alloc_kv), and main's (the context's token ids; per vocabulary entry a
 * sampling candidate and a flag) */
static uint64_t memory_needed(const Model *m, int max_tokens, int ctx, int kv_dtype) {
    State probe;
    state_init(&probe, m, max_tokens, ctx, NULL, kv_dtype, true);
    return probe.bytes + HUGE_PAGE + (uint64_t)ctx * 4 + (uint64_t)m->cfg.vocab_size * 16;
}

/* The context to run: ctx, if a state for it fits what this process may use. The KV cache is
 * mapped and its pages taken only as positions reach them, so without this a context too large
 * would start, and be killed part way. A context that does not fit is an error when asked for
 * (-c); the default (the model's max_position_embeddings) is cut to what fits, and that is said. */
static int fit_context(const Model *m, int max_tokens, int ctx, bool asked, int kv_dtype) {
    const char *what;
    uint64_t have = memory_available(m, &what), need = memory_needed(m, max_tokens, ctx, kv_dtype);
    if (need <= have) return ctx;
    uint64_t kv = kv_cache_bytes(&m->cfg, ctx, kv_dtype);
    if (asked)
        die("a context of %d positions needs %llu bytes (KV cache %llu, activations %llu), more than the "
            "%llu bytes of %s; use a smaller -c%s", ctx, (unsigned long long)need, (unsigned long long)kv,
            (unsigned long long)(need - kv), (unsigned long long)have, what,
            kv_dtype == MM_F16 ? "" : " or --kv f16");
    /* the default: the most whole pages that fit, with a sixteenth to spare (what the allocator and
     * the rest of the process take); halve until it fits, then search the pages between */
    uint64_t room = have - have / 16;
    int fits = ctx, over = ctx;
    while (fits > KV_PAGE && memory_needed(m, max_tokens, fits, kv_dtype) > room) {
        over = fits;
        fits /= 2;
    }
    while (over - fits > KV_PAGE) {
        int mid = (fits + (over - fits) / 2) / KV_PAGE * KV_PAGE;
        if (mid <= fits) break;
        if (memory_needed(m, max_tokens, mid, kv_dtype) <= room) fits = mid;
        else over = mid;
    }
    if (memory_needed(m, max_tokens, fits, kv_dtype) > room)
        die("the run state needs %llu bytes, more than the %llu bytes of %s",
            (unsigned long long)memory_needed(m, max_tokens, fits, kv_dtype), (unsigned long long)have, what);
    fprintf(stderr, "run: note: a context of %d positions needs %llu bytes, more than the %llu bytes of %s: "
            "using -c %d\n", ctx, (unsigned long long)need, (unsigned long long)have, what, fits);
    return fits;
}

/* ============================================================================================
 * Building blocks, in plain C
 * ============================================================================================ */

/* Row r of a q8_0 matrix gathered from its panel: codes [cols], scales [cols / 32] */
static void q8_row(const Matrix *w, int r, int8_t *codes, float *scales) {
    int cols = w->cols, i = r % MM_Q8_PANEL;
    const uint8_t *panel =
        (const uint8_t *)w->data + (size_t)(r / MM_Q8_PANEL) * q8_panel_bytes((uint64_t)cols);
    for (int c = 0; c < cols; c++)
        codes[c] = (int8_t)panel[(size_t)(c / 4) * 4 * MM_Q8_PANEL + 4 * i + c % 4];
    const uint8_t *scale = panel + (size_t)MM_Q8_PANEL * cols;
    for (int g = 0; g < cols / MM_Q8_GROUP; g++) {
        uint16_t h;
        memcpy(&h, scale + 2 * ((size_t)g * MM_Q8_PANEL + i), 2);
        scales[g] = f16_to_f32(h);
    }
}

/* Row r of a weight matrix as f32: a pointer into the file for f32, else converted into buf
 * (room for 2 cols floats) */
static const float *matrix_row(const Matrix *w, int r, float *buf) {
    size_t at = (size_t)r * w->cols;
    const uint16_t *half = (const uint16_t *)w->data + at;
    switch (w->dtype) {
    case MM_F32: return (const float *)w->data + at;
    case MM_F16: for (int c = 0; c < w->cols; c++) buf[c] = f16_to_f32(half[c]); return buf;
    case MM_BF16: for (int c = 0; c < w->cols; c++) buf[c] = bf16_to_f32(half[c]); return buf;
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

/* w . x for a q8_0 weight row and a q8_0 activation row (quantize_q8): an exact integer sum per
 * group of 32, times the two scales */
static float dot_q8(const int8_t *w, const float *w_scale, const int8_t *x, const float *x_scale, int n) {
    float sum = 0;
    for (int g = 0; g < n / MM_Q8_GROUP; g++) {
        int32_t isum = 0;
        for (int i = 0; i < MM_Q8_GROUP; i++)
            isum += (int32_t)w[g * MM_Q8_GROUP + i] * x[g * MM_Q8_GROUP + i];
        sum += (float)isum * (w_scale[g] * x_scale[g]);
    }
    return sum;
}

/* out[t, r] = W[r, :] . x[t, :] for every row r and token t < n; x: [n, W.cols], out: [n, W.rows].
 * Each weight row is converted to f32 once for the whole block; a q8_0 matrix multiplies x
 * quantised the same way (dot_q8). The threads share the rows. */
static void matmul_plain(float *out, const float *x, const Matrix *w, int n, State *s) {
    int rows = w->rows, cols = w->cols, groups = cols / MM_Q8_GROUP;
    bool q8 = w->dtype == MM_Q8_0;
    int8_t *xq = s->xq;
    float *xs = s->xs;
    for (int t = 0; q8 && t < n; t++)
        quantize_q8(xq + (size_t)t * cols, xs + (size_t)t * groups, x + (size_t)t * cols, cols);
    #pragma omp parallel for
    for (int r = 0; r < rows; r++) {
        float *buf = s->row_buf + (size_t)thread_id() * s->row_buf_len;
        if (q8) {
            int8_t *codes = (int8_t *)buf;
            float *scales = buf + cols / 4;
            q8_row(w, r, codes, scales);
            for (int t = 0; t < n; t++)
                out[(size_t)t * rows + r] =
                    dot_q8(codes, scales, xq + (size_t)t * cols, xs + (size_t)t * groups, cols);
        } else {
            const float *row = matrix_row(w, r, buf);
            for (int t = 0; t < n; t++) out[(size_t)t * rows + r] = dot(row, x + (size_t)t * cols, cols);
        }
    }
}

/* out = w * x / sqrt(mean(x^2) + eps), in fp32 */
static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

/* the same for each of n rows of dim */
static void rmsnorm_rows(float *out, const float *x, const float *w, int n, int dim, float eps) {
    for (int t = 0; t < n; t++) rmsnorm(out + (size_t)t * dim, x + (size_t)t * dim, w, dim, eps);
}

static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) max = x[i] > max ? x[i] : max;
    float sum = 0;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - max); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

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

/* the key k and value v of kv head g at position pos, into the cache (f32, or rounded to f16) */
static void cache_store(const KvLayer *c, int g, int pos, const float *k, const float *v) {
    void *keys = kv_keys(c, g, pos), *values = kv_values(c, g, pos);
    for (int d = 0; d < c->head_dim; d++) {
        size_t ki = key_in_block(pos, d);
        if (c->dtype == MM_F32) ((float *)keys)[ki] = k[d], ((float *)values)[d] = v[d];
        else ((uint16_t *)keys)[ki] = f32_to_f16(k[d]), ((uint16_t *)values)[d] = f32_to_f16(v[d]);
    }
}

/* element i of a kv head's keys or values, as f32 */
static float cache_at(const void *cache, int dtype, size_t i) {
    return dtype == MM_F32 ? ((const float *)cache)[i] : f16_to_f32(((const uint16_t *)cache)[i]);
}

/* One query head q over positions 0..pos of kv head g: out = softmax(q . k_t / sqrt(head_dim)) . v_t
 * (out, q: [head_dim]; scores: room for pos + 1). The keys are stored transposed in blocks, for
 * the fast kernel: key_in_block finds dimension d of the key at position t. */
static void attention_head(float *out, const float *q, const KvLayer *c, int g, int pos, float *scores) {
    int hd = c->head_dim;
    for (int t = 0; t <= pos; t++) {
        const void *key = kv_keys(c, g, t);
        float score = 0;
        for (int d = 0; d < hd; d++) score += q[d] * cache_at(key, c->dtype, key_in_block(t, d));
        scores[t] = score / sqrtf((float)hd);
    }
    softmax(scores, pos + 1);
    for (int d = 0; d < hd; d++) out[d] = 0;
    for (int t = 0; t <= pos; t++) {
        const void *value = kv_values(c, g, t);
        for (int d = 0; d < hd; d++) out[d] += scores[t] * cache_at(value, c->dtype, (size_t)d);
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

/* Whether token t (of a block) uses expert e, and with what weight: its router weight when
 * routed there, 1 for a shared expert (MiniMind2 MoE adds those to every token). */
static bool expert_weight(const State *s, const mm_header *h, int t, uint32_t e, float *w) {
    int k = (int)h->n_experts_per_tok;
    if (e >= h->n_experts) { *w = 1.0f; return true; }
    for (int j = 0; j < k; j++)
        if (s->top_idx[(size_t)t * k + j] == (int)e) { *w = s->top_w[(size_t)t * k + j]; return true; }
    return false;
}

/* ============================================================================================
 * The plug points: the fast kernels where they are built (kernels.h), else the plain loops
 * ============================================================================================ */

/* --ref-kernels: the plain loops even where the fast kernels are built (for testing) */
static bool reference_kernels = false;

static bool fast_kernels(void) { return KERNELS_BUILT && !reference_kernels; }

/* out_j = W_j x for a few matrices that read the same x [n, cols] (q, k and v; gate and up):
 * out_j [n, W_j.rows] */
static void matmuls(State *s, const MatmulJob *jobs, int n_jobs, const float *x, int n) {
    bool mixed = n_jobs > KERNEL_MAX_JOBS;  /* (the loader checks the dtypes of every file) */
    for (int j = 1; j < n_jobs; j++) mixed |= jobs[j].w->dtype != jobs[0].w->dtype;
    if (mixed) die("internal: a matmuls call of %d matrices, or of mixed dtypes", n_jobs);
    if (fast_kernels()) kernel_matmuls(jobs, n_jobs, x, n, &s->ks);
    else for (int j = 0; j < n_jobs; j++) matmul_plain(jobs[j].out, x, jobs[j].w, n, s);
}

static void matmul(State *s, float *out, const float *x, const Matrix *w, int n) {
    matmuls(s, &(MatmulJob){out, w}, 1, x, n);
}

/* attention of the n tokens at positions pos0.. (s->q) to the cache of their layer, into
 * s->att_out: each query head reads the keys and values of its kv head */
static void attention(State *s, const KvLayer *c, int n, int pos0) {
    if (fast_kernels()) {
        kernel_attention(s->att_out, s->q, n, pos0, c, &s->ks);
        return;
    }
    int n_heads = c->n_kv_heads * c->group, hd = c->head_dim;
    #pragma omp parallel for collapse(2)
    for (int t = 0; t < n; t++)
        for (int i = 0; i < n_heads; i++)
            attention_head(s->att_out + ((size_t)t * n_heads + i) * hd, s->q + ((size_t)t * n_heads + i) * hd,
                           c, i / c->group, pos0 + t, s->scores + (size_t)thread_id() * s->ctx);
}

/* SwiGLU's product for n rows of `hidden`: gate = silu(gate) * up */
static void swiglu(float *gate, const float *up, int n, int hidden) {
    if (fast_kernels()) kernel_swiglu(gate, up, n, hidden);
    else for (size_t i = 0; i < (size_t)n * hidden; i++) gate[i] = silu(gate[i]) * up[i];
}

/* ============================================================================================
 * Threads: as many as help
 * ============================================================================================ */

/* A decoded token passes some 80 parallel regions, and each ends when its last thread is done.
 * On an idle machine every core speeds a token up. On a busy one the system takes cores away to
 * run other processes, the team waits at the end of a region for a thread that is not running,
 * and two threads can be several times slower than one (docs/kernels.md, "Threads"). Which holds
 * changes as the program runs, so unless --threads or OMP_NUM_THREADS fixes the count, the
 * forward passes measure it:
 *   - the size in use: its mean seconds per token since the last probe (a mean, not a median:
 *     under load most calls are fast and a few very slow, and the slow ones are the cost);
 *   - a probe: a few calls at half or twice the size; the faster size is kept;
 *   - the next probe comes when the time it could lose, at the ratio just seen, is PROBE_BUDGET
 *     of the time between; at once when the calls slow down by a third (new load);
 *   - more threads are probed only when no other process runs on the CPUs they would take, where
 *     that can be read: on a busy machine their probe is costly (a thread that slept while unused
 *     can wait 100 ms for a CPU) and misleading (its few calls can miss the slow ones); the first
 *     size is the CPUs that no other process runs on then.
 * Single tokens (decoding) and blocks (prompts) are measured apart, as their speeds and best sizes
 * differ, and a block only against blocks of as many tokens. The output is the same bits at any
 * team size (kernels.h): a switch changes only the time. */
enum {
    PROBE_FIRST = 2,      /* calls before the first probe */
    PROBE_GAP_MIN = 8,    /* calls between probes, at least */
    PROBE_GAP_MAX = 1024, /* and at most */
};
#define PROBE_BUDGET 0.02  /* of the time, at most, spent probing a slower size */
#define PROBE_MARGIN 0.05  /* a probe wins when 5% faster than the size in use */
#define PROBE_ABORT 2.0    /* a probe's timed call this much slower than the size in use ends it */
#define NEW_LOAD 1.33      /* recent calls this much slower than the baseline: probe now */

typedef struct {
    int size;                   /* the team size in use */
    int calls_n;                /* the tokens of each of its calls measured (blocks: their length) */
    int calls;                  /* its calls since the last probe */
    double sum;                 /* their seconds per token, summed */
    double recent;              /* seconds per token of its last calls, a running mean */
    double baseline;            /* its seconds per token when the last probe ended (0: none yet) */
    int until_probe;            /* calls at `size` before the next probe */
    int probe;                  /* a probe's team size; 0: none under way */
    int probe_calls;            /* the probe's calls so far */
    int warm_calls;             /* its first calls, not timed (threads that slept wake in them) */
    int timed_calls;            /* the calls timed after them */
    double probe_sum;           /* their seconds per token, summed */
    bool probe_fewer;           /* the next probe tries fewer threads, where both ways are open */
    int busy_gap;               /* calls before looking again for free CPUs, doubling while none are */
    long n_calls, n_probes, n_switches;  /* for -v */
} TeamSize;

static struct {
    int max;                    /* the most threads: --threads, OMP_NUM_THREADS or the usable CPUs */
    bool tuned;                 /* sizes measured as the program runs (not fixed by the user) */
    TeamSize tokens, blocks;    /* for single tokens, and for blocks of several */
    double call_start;          /* when the forward call under way began */
} threads;

static void set_team_size(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

/* The CPUs of this machine that no other thread is running or waiting to run on now, this one's
 * own aside (Linux's /proc/loadavg counts the runnable threads: "0.52 0.58 0.59 3/190 12345" has
 * 3, this one among them), up to max; max where that cannot be read */
static int free_cpus(int max) {
    FILE *f = fopen("/proc/loadavg", "r");
    int runnable = 0;
    if (f) {
        if (fscanf(f, "%*f %*f %*f %d/", &runnable) != 1) runnable = 0;
        fclose(f);
    }
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    if (runnable < 1 || online < 1) return max;
    long idle = online - (runnable - 1);
    return idle < 0 ? 0 : idle < max ? (int)idle : max;
}

static void threads_init(int max, bool tuned) {
    threads.max = max;
    threads.tuned = tuned && max > 1;
    int start = threads.tuned ? free_cpus(max) : max;  /* the CPUs free now, the probes correct it */
    TeamSize first = {.size = start > 1 ? start : 1, .until_probe = PROBE_FIRST, .probe_fewer = true,
                      .busy_gap = PROBE_GAP_MIN};
    threads.tokens = threads.blocks = first;
    set_team_size(max);  /* (the state's buffers are sized by it) */
}

/* Start the threads before the first forward pass: their creation takes milliseconds on some
 * systems, which should not count against a size's first call, and threads that have just run
 * are still awake when the first call comes */
static void threads_start(void) {
    if (threads.max < 2) return;
    #pragma omp parallel
    (void)0;
}

/* -v: what the measuring did */
static void print_threads(void) {
    if (!threads.tuned) return;
    const TeamSize *t[2] = {&threads.blocks, &threads.tokens};
    const char *what[2] = {"prompt blocks", "single tokens"};
    for (int i = 0; i < 2; i++)
        if (t[i]->n_calls)
            fprintf(stderr, "threads for %s: %d of up to %d at the end; %ld calls, %ld probes, %ld "
                    "switches\n", what[i], t[i]->size, threads.max, t[i]->n_calls, t[i]->n_probes,
                    t[i]->n_switches);
}

/* the team size for a forward call of n tokens */
static void team_begin(int n) {
    if (!threads.tuned) return;
    const TeamSize *t = n == 1 ? &threads.tokens : &threads.blocks;
    set_team_size(t->probe ? t->probe : t->size);
    threads.call_start = now_seconds();
}

/* A probe is over: keep the faster size, and set when to probe again. (A probe begins only after
 * two calls at the size in use, and ends after one timed call at least: no division by zero.) */
static void probe_end(TeamSize *t) {
    double in_use = t->sum / t->calls, probed = t->probe_sum / t->timed_calls;
    bool wins = probed < in_use * (1 - PROBE_MARGIN);
    double ratio = wins ? in_use / probed : probed / in_use;  /* the slower over the faster */
    double gap = (t->warm_calls + t->timed_calls) * (ratio - 1) / PROBE_BUDGET;
    t->until_probe = gap < PROBE_GAP_MIN ? PROBE_GAP_MIN : gap > PROBE_GAP_MAX ? PROBE_GAP_MAX : (int)gap;
    if (wins) {
        t->size = t->probe;
        in_use = probed;
        t->n_switches++;
    }
    t->n_probes++;
    t->baseline = t->recent = in_use;
    t->sum = 0;
    t->calls = 0;
    t->probe = 0;
    t->probe_fewer = !t->probe_fewer;
}

/* a probe of half or twice the size in use (as far as 1 and max allow), alternately; of more
 * threads only when no other thread runs on the CPUs they would take, else of fewer (if any) */
static void probe_begin(TeamSize *t, bool tokens) {
    int fewer = t->size / 2, more = 2 * t->size < threads.max ? 2 * t->size : threads.max;
    bool go_fewer = t->size > 1 && (t->size == threads.max || t->probe_fewer);
    if (!go_fewer && free_cpus(threads.max) < more) {
        if (t->size == 1) {  /* no CPUs free for more, and none to give back: look again later */
            t->until_probe = t->busy_gap;
            t->busy_gap = 2 * t->busy_gap < PROBE_GAP_MAX ? 2 * t->busy_gap : PROBE_GAP_MAX;
            t->baseline = t->recent;
            return;
        }
        go_fewer = true;
    }
    t->busy_gap = PROBE_GAP_MIN;
    t->probe = go_fewer ? fewer : more;
    t->probe_calls = 0;
    t->probe_sum = 0;
    t->timed_calls = tokens ? 2 : 1;
    t->warm_calls = tokens && !go_fewer ? 1 : 0;
}

/* the call of n tokens that team_begin began is done: time it */
static void team_end(int n) {
    if (!threads.tuned) return;
    TeamSize *t = n == 1 ? &threads.tokens : &threads.blocks;
    double per_token = (now_seconds() - threads.call_start) / n;
    t->n_calls++;
    if (t->probe) {
        bool timed = t->probe_calls >= t->warm_calls;
        if (n != t->calls_n) {  /* a block of another length: nothing to compare; try again later */
            t->probe = 0;
            t->until_probe = 1;
        } else if (timed && per_token > t->sum / t->calls * PROBE_ABORT) {  /* lost already */
            t->warm_calls = t->probe_calls;
            t->timed_calls = 1;
            t->probe_sum = per_token;
            probe_end(t);
        } else if (++t->probe_calls > t->warm_calls) {
            t->probe_sum += per_token;
            if (t->probe_calls == t->warm_calls + t->timed_calls) probe_end(t);
        }
        return;
    }
    if (n != t->calls_n) {  /* blocks of a new length: measure afresh */
        t->calls_n = n;
        t->calls = 0;
        t->sum = 0;
        t->recent = per_token;
        t->baseline = 0;
        t->until_probe = PROBE_FIRST;
    }
    t->sum += per_token;
    t->calls++;
    t->recent += (per_token - t->recent) / 8;
    if (t->baseline > 0 && t->recent > t->baseline * NEW_LOAD) t->until_probe = 0;
    if (--t->until_probe <= 0 && t->calls >= 2) probe_begin(t, n == 1);
}

/* ============================================================================================
 * The forward pass
 * ============================================================================================ */

/* The feed-forward of a mixture of experts, xb -> delta for n rows: the router sends each token
 * to its top-k experts; each expert runs once, on the rows routed to it, and its output is added
 * to theirs with the router's weight (shared experts, in MiniMind2 MoE: every row, weight 1). */
static void moe_ffn(const Model *m, const Layer *L, State *s, int n) {
    const mm_header *h = &m->cfg;
    int dim = (int)h->dim, k = (int)h->n_experts_per_tok;
    matmul(s, s->router, s->xb, &L->router, n);
    for (int t = 0; t < n; t++)
        route(s->top_idx + (size_t)t * k, s->top_w + (size_t)t * k, s->router + (size_t)t * h->n_experts, h);
    memset(s->delta, 0, (size_t)n * dim * sizeof(float));
    for (uint32_t e = 0; e < h->n_experts + h->n_shared_experts; e++) {
        int rows = 0;
        for (int t = 0; t < n; t++) {  /* gather */
            if (!expert_weight(s, h, t, e, &s->moe_w[rows])) continue;
            s->moe_rows[rows] = t;
            memcpy(s->moe_in + (size_t)rows * dim, s->xb + (size_t)t * dim, (size_t)dim * sizeof(float));
            rows++;
        }
        if (rows == 0) continue;
        const FFN *f = &L->ffn[e];
        matmuls(s, (MatmulJob[]){{s->hb, &f->gate}, {s->hb2, &f->up}}, 2, s->moe_in, rows);
        swiglu(s->hb, s->hb2, rows, f->gate.rows);
        matmul(s, s->moe_out, s->hb, &f->down, rows);
        for (int i = 0; i < rows; i++) {  /* scatter, weighted */
            float *d = s->delta + (size_t)s->moe_rows[i] * dim;
            for (int c = 0; c < dim; c++) d[c] += s->moe_w[i] * s->moe_out[(size_t)i * dim + c];
        }
    }
}

/* n tokens at positions pos0 .. pos0+n-1, after the pos0 before them in the KV cache: every layer
 * of the model for all n at once, each weight matrix read once for the block; the logits of the
 * last token into s->logits [vocab], or with all_logits of every token [n, vocab] */
static void forward_pass(const Model *m, State *s, const int *tokens, int n, int pos0, bool all_logits) {
    const mm_header *h = &m->cfg;
    int dim = (int)h->dim, hd = (int)h->head_dim, half = hd / 2, n_heads = (int)h->n_heads;
    int n_kv_heads = (int)h->n_kv_heads, q_dim = n_heads * hd, kv_dim = n_kv_heads * hd;
    float eps = h->rms_eps;

    for (int t = 0; t < n; t++) {  /* each token's embedding, and the rotation of its position */
        memcpy(s->x + (size_t)t * dim, matrix_row(&m->embed, tokens[t], s->row_buf),
               (size_t)dim * sizeof(float));
        rope_angles(s->cos + (size_t)t * half, s->sin + (size_t)t * half, s, s->pos_offset + pos0 + t, half);
    }
    for (uint32_t l = 0; l < h->n_layers; l++) {
        const Layer *L = &m->layers[l];
        KvLayer cache = kv_layer(s, h, l);

        /* attention: q, k, v of the normed input; per head, q and k normed (minimind-3) and
         * rotated, k and v into the cache; attention over the cache; its output projected */
        rmsnorm_rows(s->xb, s->x, L->input_norm, n, dim, eps);
        matmuls(s, (MatmulJob[]){{s->q, &L->wq}, {s->k, &L->wk}, {s->v, &L->wv}}, 3, s->xb, n);
        for (int t = 0; t < n; t++) {
            const float *cos_t = s->cos + (size_t)t * half, *sin_t = s->sin + (size_t)t * half;
            for (int i = 0; i < n_heads; i++) {
                float *q = s->q + (size_t)t * q_dim + (size_t)i * hd;
                if (L->q_norm) rmsnorm(q, q, L->q_norm, hd, eps);
                if (!s->rope_off) rope_rotate(q, cos_t, sin_t, half);
            }
            for (int g = 0; g < n_kv_heads; g++) {
                float *k = s->k + (size_t)t * kv_dim + (size_t)g * hd;
                if (L->k_norm) rmsnorm(k, k, L->k_norm, hd, eps);
                if (!s->rope_off) rope_rotate(k, cos_t, sin_t, half);
                cache_store(&cache, g, pos0 + t, k, s->v + (size_t)t * kv_dim + (size_t)g * hd);
            }
        }
        attention(s, &cache, n, pos0);
        matmul(s, s->delta, s->att_out, &L->wo, n);
        for (size_t i = 0; i < (size_t)n * dim; i++) s->x[i] += s->delta[i];  /* the residual */

        /* feed-forward: SwiGLU of the normed input, down(silu(gate x) * up x), or the experts' */
        rmsnorm_rows(s->xb, s->x, L->post_norm, n, dim, eps);
        if (h->flags & MM_FLAG_MOE) {
            moe_ffn(m, L, s, n);
        } else {
            const FFN *f = &L->ffn[0];
            matmuls(s, (MatmulJob[]){{s->hb, &f->gate}, {s->hb2, &f->up}}, 2, s->xb, n);
            swiglu(s->hb, s->hb2, n, f->gate.rows);
            matmul(s, s->delta, s->hb, &f->down, n);
        }
        for (size_t i = 0; i < (size_t)n * dim; i++) s->x[i] += s->delta[i];  /* the residual */
    }
    /* the final norm and the logits, of the last token or of all */
    int first = all_logits ? 0 : n - 1;
    rmsnorm_rows(s->xb, s->x + (size_t)first * dim, m->final_norm, n - first, dim, eps);
    matmul(s, s->logits, s->xb, &m->head, n - first);
}

typedef struct {                /* forward_pass's arguments, for kernel_team */
    const Model *m;
    State *s;
    const int *tokens;
    int n, pos0;
    bool all_logits;
} ForwardCall;

static void forward_call(void *arg) {
    const ForwardCall *c = arg;
    forward_pass(c->m, c->s, c->tokens, c->n, c->pos0, c->all_logits);
}

/* The forward pass of n tokens (n <= max_tokens) at positions pos0..: the logits of the last
 * token [vocab], or with all_logits of every token [n, vocab]. A single token's pass keeps its
 * threads for the whole pass (kernel_team, kernels.h); a block's forks them at each kernel. */
static float *forward(const Model *m, State *s, const int *tokens, int n, int pos0, bool all_logits) {
    if (n < 1 || n > s->max_tokens || pos0 < 0 || pos0 + n > s->ctx)
        die("internal: forward of %d tokens at position %d (block %d, context %d)", n, pos0, s->max_tokens,
            s->ctx);
    team_begin(n);  /* how many threads (above) */
    if (n == 1 && fast_kernels())
        kernel_team(forward_call, &(ForwardCall){m, s, tokens, n, pos0, all_logits});
    else forward_pass(m, s, tokens, n, pos0, all_logits);
    team_end(n);
    return s->logits;
}

/* ============================================================================================
 * Running a sequence: every position's logits, a block of tokens at a time
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
static void run_sequence(const Model *m, State *s, const int *tokens, int n, logits_fn emit, void *ctx) {
    int vocab = (int)m->cfg.vocab_size;
    for (int start = 0; start < n; start += s->max_tokens) {
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
/* the window without -c, rather than the model's max positions (32768 in MiniMind's configs, far
 * past the lengths its models are trained at, where the perplexity says little) */
#define PPL_WINDOW 512

/* a perplexity as text: six decimals, or six significant digits with an exponent from 1e6 on */
static const char *ppl_text(double ppl, char buf[32]) {
    snprintf(buf, 32, ppl < 1e6 ? "%.6f" : "%.6e", ppl);
    return buf;
}

typedef struct {
    const int *tokens;  /* the current window's ids [n] */
    int n, vocab;
    double nll;         /* summed over every scored position so far */
    long count, total;  /* positions scored so far, and in the whole run */
    int reported;       /* tenths of the run already reported on stderr */
    double *pos_nll;    /* --per-position: [window] the NLL summed at each position, or NULL */
    long *pos_count;    /* [window] positions scored there */
} PplSum;

static void add_nll(const float *logits, int t, void *ctx) {
    PplSum *p = ctx;
    if (t + 1 >= p->n) return;          /* the window's last position predicts nothing we have */
    check_logits(logits, p->vocab);
    float max = logits[0];
    for (int i = 1; i < p->vocab; i++) max = logits[i] > max ? logits[i] : max;
    double sum = 0;
    for (int i = 0; i < p->vocab; i++) sum += exp((double)logits[i] - max);
    double nll = log(sum) + max - logits[p->tokens[t + 1]];
    p->nll += nll;
    p->count++;
    if (p->pos_nll) p->pos_nll[t] += nll, p->pos_count[t]++;
    if (p->total >= 8192 && p->count * 10 >= (p->reported + 1) * p->total) {  /* long runs: every 10% */
        p->reported = (int)(p->count * 10 / p->total);
        char ppl[32];
        fprintf(stderr, "ppl: %3d%% (%ld of %ld tokens), ppl so far %s\n", p->reported * 10, p->count,
                p->total, ppl_text(exp(p->nll / p->count), ppl));
    }
}

/* ============================================================================================
 * Sampling, in MiniMind's order: temperature, repetition penalty, top-k, top-p
 * ============================================================================================ */

typedef struct { float logit; int id; } TokenLogit;  /* a candidate for the next token */

typedef struct {
    int vocab;
    float temperature;          /* 0: greedy */
    float top_p;                /* nucleus: smallest set of best tokens with mass >= top_p */
    int top_k;                  /* 0: off */
    float repeat_penalty;       /* 1: off */
    uint64_t rng;               /* xorshift64* state */
    TokenLogit *cand;           /* [vocab] */
    float *kth;                 /* [top_k] the k largest logits, for the top-k threshold */
} Sampler;

static float random_f32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (float)((*state * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

/* the index of the largest of x[0..n) (the first, among equals) */
static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) best = x[i] > x[best] ? i : best;
    return best;
}

static int by_logit_desc(const void *a, const void *b) {
    const TokenLogit *x = a, *y = b;
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
            if (seen[i])
                logits[i] = logits[i] > 0 ? logits[i] / sp->repeat_penalty : logits[i] * sp->repeat_penalty;
    if (sp->temperature <= 0) return argmax(logits, V);
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
        if (logits[i] >= threshold) sp->cand[n++] = (TokenLogit){logits[i], i};
    qsort(sp->cand, (size_t)n, sizeof *sp->cand, by_logit_desc);
    /* softmax over the candidates, then top-p: a token stays while the mass before it is <= p */
    float max = sp->cand[0].logit, sum = 0;
    for (int i = 0; i < n; i++) {
        sp->cand[i].logit = expf(sp->cand[i].logit - max);
        sum += sp->cand[i].logit;
    }
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
 * Stops at end-of-sequence (then returns true) or when the context is full (said on stderr). */
static bool generate(const Model *m, State *s, const Tokenizer *tok, Sampler *sp, Context *c,
                     int max_new, Str *reply, Stats *st) {
    double t0 = now_seconds();
    st->prompt += c->n - c->n_cached;
    memset(c->seen, 0, m->cfg.vocab_size);
    for (int i = 0; i < c->n; i++) c->seen[c->tokens[i]] = 1;
    float *logits = prefill(m, s, c);
    double t1 = now_seconds();
    st->prefill_s += t1 - t0;
    Utf8Stream out = {0};
    bool ended = false;
    for (int i = 0; i < max_new && !interrupted; i++) {
        int next = sample(sp, logits, c->seen);
        if (next == (int)m->cfg.eos_id) {
            if (c->n < s->ctx) c->tokens[c->n++] = next;  /* kept for the next turn, not yet run */
            ended = true;
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
    return ended;
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

/* the whole of a file ("-": standard input), NUL-terminated; *len its size */
static char *read_file(const char *path, size_t *len) {
    bool std_in = !strcmp(path, "-");
    FILE *f = std_in ? stdin : fopen(path, "rb");
    if (!f) die("%s: cannot open (%s)", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) die("%s: is a folder, not a file", path);
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
    if (ferror(f)) die("%s: read failed", std_in ? "standard input" : path);
    if (!std_in) fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

/* A conversation: its messages, and the tools the template lists (each its JSON text). From
 * --messages FILE.json and --tools FILE.json (OpenAI's formats), or from -y and the text given. */
typedef struct {
    ChatMessage *msgs;          /* [n], room for cap */
    int n, cap;
    char **tools;               /* [n_tools] */
    int n_tools;
} Conversation;

static void conversation_add(Conversation *cv, ChatMessage msg) {
    if (cv->n == cv->cap) {
        cv->cap = cv->cap ? 2 * cv->cap : 16;
        ChatMessage *bigger = realloc(cv->msgs, sizeof *bigger * (size_t)cv->cap);
        if (!bigger) die("out of memory growing the conversation");
        cv->msgs = bigger;
    }
    cv->msgs[cv->n++] = msg;
}

static void conversation_drop(Conversation *cv, int at, int count) {  /* messages [at, at + count) */
    for (int i = at; i < at + count; i++) chat_message_free(&cv->msgs[i]);
    memmove(cv->msgs + at, cv->msgs + at + count, sizeof *cv->msgs * (size_t)(cv->n - at - count));
    cv->n -= count;
}

static void conversation_free(Conversation *cv) {
    for (int i = 0; i < cv->n; i++) chat_message_free(&cv->msgs[i]);
    for (int i = 0; i < cv->n_tools; i++) free(cv->tools[i]);
    free(cv->msgs);
    free(cv->tools);
}

static const char *TEMPLATE_NAMES[] = {"none", "plain ChatML", "MiniMind2", "minimind-3", "MiniMind2 without tools"};

/* the conversation that chat starts from and -m prompt renders: --messages, else -y's system
 * prompt (and, for -m prompt, the text as the user's message); --tools; checked against what
 * the model's template can render */
static Conversation conversation_load(const char *model_path, int template, const char *messages_path,
                                      const char *tools_path, const char *system, const char *user, bool think) {
    Conversation cv = {0};
    if (template == MM_CHAT_NONE)
        die("%s: this model has no chat template (a pretrained checkpoint?); use -m generate", model_path);
    if (think && template != MM_CHAT_MINIMIND3)
        die("--think opens minimind-3's thinking block; this model's template (%s) has none",
            TEMPLATE_NAMES[template]);
    if (messages_path) {
        size_t len;
        char *json = read_file(messages_path, &len);
        ChatMessage *msgs;
        int n;
        const char *err = chat_parse_messages(json, len, &msgs, &n, tools_path ? NULL : &cv.tools, &cv.n_tools);
        if (err) die("%s: %s", messages_path, err);
        for (int i = 0; i < n; i++) conversation_add(&cv, msgs[i]);
        free(msgs);
        free(json);
        if (system && !strcmp(cv.msgs[0].role, "system"))
            die("-y gives a system prompt, and %s starts with one too: give one of them", messages_path);
    }
    if (tools_path) {
        size_t len;
        char *json = read_file(tools_path, &len);
        const char *err = chat_parse_tools(json, len, &cv.tools, &cv.n_tools);
        if (err) die("%s: %s", tools_path, err);
        free(json);
    }
    if (system) {  /* it goes first */
        conversation_add(&cv, (ChatMessage){0});
        memmove(cv.msgs + 1, cv.msgs, sizeof *cv.msgs * (size_t)(cv.n - 1));
        cv.msgs[0] = (ChatMessage){.role = "system", .content = xstrdup(system)};
    }
    if (user) conversation_add(&cv, (ChatMessage){.role = "user", .content = xstrdup(user)});
    const char *err = chat_check(template, cv.msgs, cv.n, cv.n_tools);
    if (err) die("%s: %s", model_path, err);  /* (what its template cannot render) */
    return cv;
}

/* -m chat: one user turn per line of stdin (a line "/tool TEXT" is a tool's result instead). The
 * conversation may start from --messages: when it ends with a user's or a tool's message, the
 * reply to it comes first. The KV cache keeps the conversation: each turn's prompt is rendered
 * whole by the chat template, and only the tokens after the part already cached are run. When a
 * turn does not fit, the oldest turns are dropped (said on stderr). */
#define CHAT_MAX_REPLY 8192  /* chat's -n: a reply runs to its end, as MiniMind's eval_llm.py lets it */

/* what chat takes from the command line */
typedef struct {
    bool think;                 /* --think: open minimind-3's thinking block */
    int max_reply;              /* -n */
    int history;                /* --history: earlier messages kept, -1: all */
    bool show_prompt, verbose;  /* --verbose-prompt, -v */
} ChatSettings;

static void chat(const Model *m, State *s, const Tokenizer *tok, Sampler *sp, Context *c, Conversation *cv,
                 const ChatSettings *cs) {
    int max_new = cs->max_reply;
    int template = (int)m->cfg.chat_template;
    int first_turn = cv->n > 0 && !strcmp(cv->msgs[0].role, "system");  /* the system prompt stays */
    bool answer_first = cv->n > first_turn && (!strcmp(cv->msgs[cv->n - 1].role, "user") ||
                                               !strcmp(cv->msgs[cv->n - 1].role, "tool"));
    bool tty = isatty(0);
    char *line = NULL;
    size_t line_cap = 0;
    Stats total = {0};
    for (;;) {
        if (!answer_first) {  /* the next turn from standard input */
            if (tty) { fputs("> ", stdout); fflush(stdout); }
            ssize_t got = getline(&line, &line_cap, stdin);
            if (got < 0) break;
            while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = 0;
            if (got == 0) continue;
            bool tool = !strncmp(line, "/tool ", 6);
            if (tool && !chat_has_tools(template)) {
                fprintf(stderr, "[this model's chat template has no tool messages]\n");
                continue;
            }
            conversation_add(cv, (ChatMessage){.role = tool ? "tool" : "user", .content = xstrdup(line + (tool ? 6 : 0))});
        }
        answer_first = false;
        while (cs->history >= 0 && cv->n - 1 - first_turn > cs->history)  /* --history: in pairs */
            conversation_drop(cv, first_turn, cv->n - 1 - first_turn >= 2 ? 2 : 1);
        int n_ids, *ids;
        for (;;) {  /* render; drop the oldest pair of messages while it does not fit */
            char *prompt = chat_render(template, cv->msgs, cv->n, cv->tools, cv->n_tools, true, cs->think);
            if (!prompt) die("out of memory rendering the chat prompt");
            ids = encode_text(tok, (const uint8_t *)prompt, strlen(prompt), &n_ids);
            bool fits = n_ids < s->ctx || cv->n - first_turn <= 1;
            if (fits && cs->show_prompt)
                fprintf(stderr, "[prompt, %d tokens]\n%s\n[end of prompt]\n", n_ids, prompt);
            free(prompt);
            if (fits) break;
            free(ids);
            fprintf(stderr, "[context of %d tokens is full: dropping the oldest turn]\n", s->ctx);
            conversation_drop(cv, first_turn, 2);
        }
        if (n_ids >= s->ctx) {
            fprintf(stderr, "[this message is %d tokens with the template; the context holds %d (-c)]\n",
                    n_ids, s->ctx);
            free(ids);
            conversation_drop(cv, cv->n - 1, 1);
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
        bool ended = generate(m, s, tok, sp, c, max_new, &reply, &st);
        fputc('\n', stdout);
        fflush(stdout);
        if (!ended && st.generated == max_new)
            fprintf(stderr, "[the reply stopped at -n %d tokens]\n", max_new);
        if (reply.oom) die("out of memory keeping the reply");
        /* the reply as the model wrote it, <tool_call> blocks included: rendered again, it is the
         * same text, so the next turn reuses its cache */
        conversation_add(cv, (ChatMessage){.role = "assistant", .content = reply.s});
        if (cs->verbose) print_stats(&st);
        total.prompt += st.prompt; total.generated += st.generated;
        total.prefill_s += st.prefill_s; total.decode_s += st.decode_s;
        if (interrupted) break;
    }
    free(line);
    if (cs->verbose) print_stats(&total);
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
        int next = argmax(logits, (int)m->cfg.vocab_size);
        logits = forward(m, s, &next, 1, c->n_cached, false);
        c->tokens[c->n_cached++] = next;
    }
    c->n = c->n_cached;
    return n / (now_seconds() - t0);
}

/* -m bench: this model's speed on this machine, on seeded random token ids (tests/bench.py runs
 * it for make bench), after a warm-up of a 32-token prompt and one token. One CSV row: a 512-token prompt
 * (prefill tokens/s, time to first token), n tokens decoded after a 16-token prompt, and after 2048 and 4096
 * tokens of context (left empty when -c is smaller), and the peak resident memory. */
static void bench(const Model *m, State *s, Context *c, int n) {
    enum { WARMUP = 32, PROMPT = 512, SHORT = 16, DEPTH1 = 2048, DEPTH2 = 4096 };
    uint64_t rng = 0x2545F4914F6CDD1Dull;
    for (int i = 0; i < s->ctx; i++)
        c->tokens[i] = (int)(random_f32(&rng) * (float)m->cfg.vocab_size) % (int)m->cfg.vocab_size;
    if (s->ctx < PROMPT || s->ctx < SHORT + n)
        die("-m bench needs a context (-c) of at least %d", PROMPT > SHORT + n ? PROMPT : SHORT + n);
    /* a warm-up first, as llama-bench does: caches, threads, pages. The KV cache is mapped and
     * its pages come in as positions are first written; llama.cpp clears its cache when the
     * context is made, before it times anything: so does this, to time the same work (only the
     * positions the benchmark uses, so that peak RSS stays what they need) */
    memset(s->kv_cache, 0, kv_cache_bytes(&m->cfg, s->ctx < DEPTH2 + n ? s->ctx : DEPTH2 + n, s->kv_dtype));
    c->n_cached = 0, c->n = WARMUP;
    bench_decode(m, s, c, prefill(m, s, c), 1);
    c->n_cached = 0, c->n = PROMPT;
    double t0 = now_seconds();
    float *logits = prefill(m, s, c);
    int first = argmax(logits, (int)m->cfg.vocab_size);
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
    printf("prefill_tokens,prefill_tps,ttft_ms,decode_tokens,decode_tps,decode_tps_2048,decode_tps_4096,peak_"
           "rss_mb\n");
    printf("%d,%.2f,%.3f,%d,%.2f,%s,%s,%.1f\n", PROMPT, PROMPT / ttft, ttft * 1e3, n, decode, d1, d2,
           peak_rss_mb());
}

/* -m tokenize --show-tokens: a token's bytes, escaped where they are not printable text */
static void print_token_text(const uint8_t *b, size_t n) {
    for (size_t i = 0; i < n;) {
        bool complete;
        uint32_t cp;
        size_t k = utf8_prefix(b + i, n - i, &complete, &cp);
        if (complete && cp >= 0x20 && cp != 0x7F && cp != '\\') {
            fwrite(b + i, 1, k, stdout);
            i += k;
            continue;
        }
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
    const char *messages_path, *tools_path;  /* --messages, --tools */
    int ctx, threads, batch, steps, top_k;
    bool verbose, think, show_tokens, csv;
    float temperature, top_p, repeat_penalty;
    unsigned long long seed;
    bool seed_given, steps_given;
    const char *sampling_flag;  /* the first of -t -p -k -s --repeat-penalty given, or NULL */
    int history;                /* --history N; -1: all */
    bool verbose_prompt;
    const char *kv;             /* KV cache type: "f32" or "f16" */
    const char *rope_scaling;   /* NULL: as the model file says */
    float rope_base, rope_scale, yarn_beta_fast, yarn_beta_slow, yarn_attn_factor;
    int yarn_orig_ctx;          /* 0 / NAN above: not given */
    int row_bits;               /* --row-bits; 0: as the processor reads fastest */
    const char *per_position;   /* ppl: --per-position FILE.csv */
    int pos_offset;             /* --pos-offset K */
    bool no_rope;               /* --no-rope */
} Options;

/* how this build runs threads (--help's last line, --version) */
#ifdef _OPENMP
#define BUILD_THREADS "OpenMP threads"
#else
#define BUILD_THREADS "one thread (built without OpenMP)"
#endif

/* the kernels built, and the width decoding reads rows in (this processor's, or --row-bits) */
static const char *kernels_line(void) {
    static char line[96];
    if (!KERNELS_BUILT) return KERNELS;
    snprintf(line, sizeof line, "%s, decoding rows in %d-bit vectors", KERNELS, kernel_row_bits());
    return line;
}

static void usage(FILE *f) {
    fputs(
"usage: run MODEL.bin [options]\n"
"  -m MODE                generate | chat | prompt | tokenize | decode | logits | ppl | rope |\n"
"                         bench\n"
"                         [generate]\n"
"  -i TEXT                input text: the prompt (generate), the text (tokenize, logits, ppl)\n"
"  -f FILE                input text read from FILE, byte for byte (-: standard input, which\n"
"                         is also read when no -i, -f or --ids is given and it is not a terminal)\n"
"  --ids LIST             token ids instead of text, separated by commas or spaces;\n"
"                         @FILE reads them from FILE (logits, ppl, decode)\n"
"  -o FILE                logits mode: write float32 little-endian logits, one row of vocab\n"
"                         values per input position  [required in logits mode]\n"
"  -n N                   generate at most N tokens (per chat reply; bench: decode N)\n"
"                         [256; chat: 8192, a reply stops at its end token]\n"
"  -t F                   temperature; 0 = greedy  [0.85]\n"
"  -p F                   top-p (nucleus) sampling  [0.95]\n"
"  -k N                   top-k sampling; 0 = off  [50]\n"
"  --repeat-penalty F     divide positive / multiply negative logits of tokens in the context\n"
"                         by F; 1 = off  [1.0]\n"
"  -s N                   random seed  [from the clock]\n"
"  -y TEXT                chat, prompt: system prompt  [the template's default]\n"
"  --think                chat, prompt: open minimind-3's thinking block\n"
"  --messages FILE        chat, prompt: start from this conversation, OpenAI's messages format\n"
"                         (JSON: a list of {role, content}, roles system, user, assistant (with\n"
"                         reasoning_content, tool_calls) and tool; or an object with \"messages\"\n"
"                         and \"tools\"); chat answers its last message first when a user's or a\n"
"                         tool's\n"
"  --tools FILE           chat, prompt: the tools the model may call, as OpenAI's API lists them\n"
"                         (JSON: [{\"type\": \"function\", \"function\": {name, description,\n"
"                         parameters}}]); a reply's <tool_call> is printed as the model wrote it,\n"
"                         and a chat line \"/tool TEXT\" gives a tool's result\n"
"  --history N            chat: keep only the last N messages of the conversation, in pairs\n"
"                         (eval_llm.py's --historys); 0 = none  [all that fit the context]\n"
"  --verbose-prompt       chat: print each turn's prompt, as the template renders it, on stderr\n"
"  --show-tokens          tokenize: one token per line with its text\n"
"  --csv                  ppl: print context,windows,tokens,nll,ppl as CSV instead\n"
"  --per-position FILE    ppl: also write position,count,mean_nll, the loss at each position\n"
"                         of the window over all windows, to FILE (CSV)\n"
"  -c, --ctx N            context length (KV cache positions)  [the model's max positions];\n"
"                         ppl: window length  [512, or the model's max if smaller]\n"
"  --threads N            threads, exactly N (OpenMP builds)  [OMP_NUM_THREADS if set, else\n"
"                         up to the CPUs this process may use, fewer while that is faster]\n"
"  --batch N              prompt tokens per forward pass; 1 = token by token  [64]\n"
"  --kv T                 KV cache type: f32 | f16 (half the memory)  [f32]\n"
"  --ref-kernels          matmuls, attention and SwiGLU through run.c's plain loops\n"
"                         instead of the fast kernels (for testing; slower)\n"
"  --row-bits N           decoding reads f32, f16 and bf16 weight rows in vectors of N bits:\n"
"                         512, or 256 (the same results; AVX-512 builds)  [by the processor:\n"
"                         256 on AMD Zen 4, else 512]\n"
"  --rope-base F          RoPE theta  [the model's rope_theta]\n"
"  --rope-scaling S       none | linear | yarn | ntk | dynamic  [the model's config.json, else\n"
"                         none]; ntk: base theta x F^(d/(d-2)); dynamic: that for the context\n"
"                         (-c) past the original one, theta x (F ctx / C - (F - 1))^(d/(d-2))\n"
"  --rope-scale F         scaling factor F  [yarn: 16; linear, ntk, dynamic: required]\n"
"  --yarn-orig-ctx N      original context C (YaRN, dynamic; -m rope's training length)\n"
"                         [2048]\n"
"  --yarn-beta-fast F     YaRN high-frequency ramp end, in rotations  [32]\n"
"  --yarn-beta-slow F     YaRN low-frequency ramp end, in rotations  [1]\n"
"  --yarn-attn-factor F   YaRN factor on cos and sin  [1.0]\n"
"  --pos-offset K         number the positions from K instead of 0 (RoPE's angles only)  [0]\n"
"  --no-rope              no rotation at all: attention without positions (an ablation)\n"
"  -v, --verbose          print the model's config, timings, per-window ppl, memory (peak\n"
"                         RSS, model file, KV cache) and threads (what measuring chose) on stderr\n"
"  --version              the build: its commit, the model file format, kernels and threads\n"
"  -h, --help             this text\n"
"generate feeds <|im_start|> + the text, as MiniMind does for pretrained checkpoints; chat\n"
"renders each turn with the checkpoint's chat template; prompt prints what the template renders\n"
"for --messages (or -y and the text as the user's message) with --tools, ready for the\n"
"assistant's reply, and exits. YaRN defaults are MiniMind's inference_rope_scaling=True;\n"
"values from the checkpoint's config.json (stored at export) come next; explicit flags win.\n"
"rope prints the frequency of each dimension pair as CSV, and what the scaling makes of it.\n"
"bench times a 512-token prompt and -n decoded tokens after 16, 2048 and 4096 tokens of\n"
"context on random ids, and prints one CSV row (make bench).\n", f);
    fprintf(f, "this build: kernels %s, %s\n", kernels_line(), BUILD_THREADS);
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

static const char *MODES[] = {"generate", "chat", "prompt", "tokenize", "decode", "logits", "ppl", "rope", "bench"};

/* the options that take a value (parse_args) */
static const char *VALUE_FLAGS[] = {
    "-m", "-i", "-f", "--ids", "-o", "-n", "-t", "-p", "-k", "--repeat-penalty", "-s", "-y", "-c", "--ctx",
    "--threads", "--batch", "--rope-base", "--kv", "--rope-scaling", "--rope-scale", "--yarn-orig-ctx",
    "--yarn-beta-fast", "--yarn-beta-slow", "--yarn-attn-factor", "--history", "--row-bits", "--per-position",
    "--messages", "--tools",
    "--pos-offset"};

#ifndef MINIMIND_VERSION
#define MINIMIND_VERSION "unknown"  /* the Makefile gives the git commit */
#endif

static void print_version(void) {
    printf("minimind.c %s; model files of format version %u; kernels %s, %s\n", MINIMIND_VERSION,
           (unsigned)MM_VERSION, kernels_line(), BUILD_THREADS);
}

static void parse_args(Options *o, int argc, char **argv) {
    *o = (Options){.mode = "generate",
                   .kv = "f32",
                   .batch = 64,
                   .steps = 256,
                   .top_k = 50,
                   .temperature = 0.85f,
                   .top_p = 0.95f,
                   .repeat_penalty = 1.0f,
                   .history = -1,
                   .rope_base = NAN,
                   .rope_scale = NAN,
                   .yarn_beta_fast = NAN,
                   .yarn_beta_slow = NAN,
                   .yarn_attn_factor = NAN};
    kernel_set_row_bits(0);  /* (what --help and --version name) */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); exit(0); }
        if (!strcmp(a, "--ref-kernels")) { reference_kernels = true; continue; }
        if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) { o->verbose = true; continue; }
        if (!strcmp(a, "--think")) { o->think = true; continue; }
        if (!strcmp(a, "--show-tokens")) { o->show_tokens = true; continue; }
        if (!strcmp(a, "--csv")) { o->csv = true; continue; }
        if (!strcmp(a, "--no-rope")) { o->no_rope = true; continue; }
        if (!strcmp(a, "--verbose-prompt")) { o->verbose_prompt = true; continue; }
        if (a[0] != '-' || a[1] == 0) {
            if (o->model_path) die("unexpected argument '%s' (the model file is '%s')", a, o->model_path);
            o->model_path = a;
            continue;
        }
        if (!strcmp(a, "--version")) { print_version(); exit(0); }
        bool takes_value = false;
        for (size_t k = 0; k < sizeof VALUE_FLAGS / sizeof VALUE_FLAGS[0]; k++)
            takes_value |= !strcmp(a, VALUE_FLAGS[k]);
        if (!takes_value) die("unknown option '%s' (see --help)", a);
        if (i + 1 >= argc) die("%s needs a value (see --help)", a);
        const char *v = argv[++i];
        static const char *SAMPLING[] = {"-t", "-p", "-k", "-s", "--repeat-penalty"};
        for (size_t k = 0; k < sizeof SAMPLING / sizeof SAMPLING[0] && !o->sampling_flag; k++)
            if (!strcmp(a, SAMPLING[k])) o->sampling_flag = SAMPLING[k];
        if (!strcmp(a, "-m")) o->mode = v;
        else if (!strcmp(a, "-i")) o->text = v;
        else if (!strcmp(a, "-f")) o->text_file = v;
        else if (!strcmp(a, "--ids")) o->ids_arg = v;
        else if (!strcmp(a, "-o")) o->out_path = v;
        else if (!strcmp(a, "-n")) {
            o->steps = (int)parse_int(a, v, 0, 1 << 24);
            o->steps_given = true;
        }
        else if (!strcmp(a, "-t")) o->temperature = parse_float(a, v, 0, 100);
        else if (!strcmp(a, "-p")) o->top_p = parse_float(a, v, 0, 1);
        else if (!strcmp(a, "-k")) o->top_k = (int)parse_int(a, v, 0, 1 << 24);
        else if (!strcmp(a, "--repeat-penalty")) o->repeat_penalty = parse_float(a, v, 1e-3f, 1e3f);
        else if (!strcmp(a, "-s")) {
            o->seed = (unsigned long long)parse_int(a, v, 0, LONG_MAX);
            o->seed_given = true;
        } else if (!strcmp(a, "-y"))
            o->system = v;
        else if (!strcmp(a, "--messages")) o->messages_path = v;
        else if (!strcmp(a, "--tools")) o->tools_path = v;
        else if (!strcmp(a, "--history")) o->history = (int)parse_int(a, v, 0, 1 << 24);
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx")) o->ctx = (int)parse_int(a, v, 1, 1 << 24);
        else if (!strcmp(a, "--threads")) o->threads = (int)parse_int(a, v, 1, 1024);
        else if (!strcmp(a, "--row-bits")) o->row_bits = (int)parse_int(a, v, 128, 512);
        else if (!strcmp(a, "--per-position")) o->per_position = v;
        else if (!strcmp(a, "--pos-offset")) o->pos_offset = (int)parse_int(a, v, 0, 1 << 30);
        else if (!strcmp(a, "--batch")) o->batch = (int)parse_int(a, v, 1, 4096);
        else if (!strcmp(a, "--rope-base")) o->rope_base = parse_float(a, v, 1.0001f, 1e30f);
        else if (!strcmp(a, "--kv")) {
            if (strcmp(v, "f32") && strcmp(v, "f16")) die("--kv expects f32 or f16, got '%s'", v);
            o->kv = v;
        }
        else if (!strcmp(a, "--rope-scaling")) {
            if (strcmp(v, "none") && strcmp(v, "linear") && strcmp(v, "yarn") && strcmp(v, "ntk") &&
                strcmp(v, "dynamic"))
                die("--rope-scaling expects none, linear, yarn, ntk or dynamic, got '%s'", v);
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
    if (!known) die("-m expects generate, chat, prompt, tokenize, decode, logits, ppl, rope or bench, got '%s'", o->mode);
    if (o->text && o->text_file) die("give the input text with -i or -f, not both");
    bool chat = !strcmp(o->mode, "chat");  /* flags of chat alone, and flags chat has no use for */
    bool prompt = !strcmp(o->mode, "prompt");
    if (chat && (o->text || o->text_file || o->ids_arg))
        die("-m chat reads each turn from standard input; %s applies to the other modes",
            o->text ? "-i" : o->text_file ? "-f" : "--ids");
    if (prompt && o->messages_path && (o->text || o->text_file))
        die("-m prompt renders --messages, or the text (%s) as the user's message: give one of them",
            o->text ? "-i" : "-f");
    if (prompt && o->ids_arg) die("-m prompt renders text; --ids applies to logits, ppl and decode");
    const char *template_flag = o->system ? "-y" : o->think ? "--think" : o->messages_path ? "--messages"
                              : o->tools_path ? "--tools" : NULL;
    if (!chat && !prompt && template_flag) die("%s applies to -m chat and -m prompt only", template_flag);
    const char *chat_flag = o->history >= 0 ? "--history" : o->verbose_prompt ? "--verbose-prompt" : NULL;
    if (!chat && chat_flag) die("%s applies to -m chat only", chat_flag);
    if (o->per_position && strcmp(o->mode, "ppl")) die("--per-position applies to -m ppl only");
    bool samples = chat || !strcmp(o->mode, "generate");
    if (!samples && o->sampling_flag)
        die("%s applies to the modes that sample tokens (generate, chat), not -m %s", o->sampling_flag, o->mode);
    if (!samples && o->steps_given && strcmp(o->mode, "bench"))
        die("-n applies to generate, chat and bench, not -m %s", o->mode);
    bool runs_model = strcmp(o->mode, "tokenize") && strcmp(o->mode, "decode") && strcmp(o->mode, "rope") &&
                      strcmp(o->mode, "bench") && !prompt;
    if (!runs_model && (o->pos_offset || o->no_rope))
        die("%s applies to the modes that run the model (generate, chat, logits, ppl), not -m %s",
            o->pos_offset ? "--pos-offset" : "--no-rope", o->mode);
    const char *rope_flag = o->pos_offset ? "--pos-offset" : o->rope_scaling ? "--rope-scaling"
                          : !isnan(o->rope_base) ? "--rope-base" : !isnan(o->rope_scale) ? "--rope-scale"
                          : o->yarn_orig_ctx ? "--yarn-orig-ctx" : !isnan(o->yarn_beta_fast) ? "--yarn-beta-fast"
                          : !isnan(o->yarn_beta_slow) ? "--yarn-beta-slow"
                          : !isnan(o->yarn_attn_factor) ? "--yarn-attn-factor" : NULL;
    if (o->no_rope && rope_flag) die("--no-rope turns RoPE off; %s has nothing to apply to", rope_flag);
    if (!runs_model && o->row_bits && strcmp(o->mode, "bench"))
        die("--row-bits applies to the modes that run the model, not -m %s", o->mode);
    if (!strcmp(o->mode, "rope") && (o->text || o->text_file || o->ids_arg || o->out_path))
        die("-m rope prints the model's frequencies; %s applies to the other modes",
            o->text ? "-i" : o->text_file ? "-f" : o->ids_arg ? "--ids" : "-o");
    if (o->row_bits && reference_kernels) die("--row-bits applies to the fast kernels, not --ref-kernels");
    int widths[2], n_widths = kernel_row_widths(widths);
    if (o->row_bits && !n_widths) die("--row-bits applies to the fast kernels, which this build has not");
    if (o->row_bits && o->row_bits != widths[0] && (n_widths < 2 || o->row_bits != widths[1])) {
        if (n_widths < 2) die("--row-bits %d: this build's kernels (%s) read rows in %d-bit vectors only",
                              o->row_bits, KERNELS, widths[0]);
        die("--row-bits expects %d or %d for this build's kernels (%s), got %d", widths[0], widths[1], KERNELS,
            o->row_bits);
    }
    kernel_set_row_bits(o->row_bits);
}

/* RoPE: the model file's settings, then MiniMind's YaRN defaults when YaRN is newly asked for,
 * then the flags */
static Rope rope_from(const mm_header *h, const Options *o) {
    Rope r = {.scaling = (int)h->rope_scaling, .theta = h->rope_theta, .factor = h->rope_factor,
              .orig_ctx = (int)h->yarn_orig_ctx, .beta_fast = h->yarn_beta_fast,
              .beta_slow = h->yarn_beta_slow, .attn_factor = h->yarn_attn_factor};
    if (o->rope_scaling) {
        int want = !strcmp(o->rope_scaling, "yarn") ? MM_ROPE_YARN
                 : !strcmp(o->rope_scaling, "linear") ? MM_ROPE_LINEAR
                 : !strcmp(o->rope_scaling, "ntk") ? ROPE_NTK
                 : !strcmp(o->rope_scaling, "dynamic") ? ROPE_DYNAMIC : MM_ROPE_NONE;
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
    r.pos_offset = o->pos_offset, r.off = o->no_rope;
    if ((r.scaling == MM_ROPE_LINEAR || r.scaling == ROPE_NTK || r.scaling == ROPE_DYNAMIC) && !(r.factor > 0))
        die("--rope-scaling %s needs --rope-scale F", r.scaling == MM_ROPE_LINEAR ? "linear"
            : r.scaling == ROPE_NTK ? "ntk" : "dynamic");
    /* --yarn-orig-ctx is also dynamic's original context, and the length -m rope counts rotations in */
    bool orig_ctx_applies = r.scaling == MM_ROPE_YARN || r.scaling == ROPE_DYNAMIC || !strcmp(o->mode, "rope");
    const char *yarn_flag = o->yarn_orig_ctx && !orig_ctx_applies ? "--yarn-orig-ctx"
                          : !isnan(o->yarn_beta_fast)   ? "--yarn-beta-fast"
                          : !isnan(o->yarn_beta_slow)   ? "--yarn-beta-slow"
                          : !isnan(o->yarn_attn_factor) ? "--yarn-attn-factor" : NULL;
    if (r.scaling == MM_ROPE_NONE && !isnan(o->rope_scale))
        die("--rope-scale applies with --rope-scaling linear, yarn, ntk or dynamic (this model's config has "
            "no scaling)");
    if (r.scaling != MM_ROPE_YARN && yarn_flag)
        die("%s applies with --rope-scaling yarn%s (%s)", yarn_flag, o->yarn_orig_ctx ? " or dynamic" : "",
            o->rope_scaling ? "not with the --rope-scaling given" : "this model's config has no YaRN");
    if (r.scaling != MM_ROPE_NONE && !(r.orig_ctx >= 1 && r.factor > 0))
        die("model file: rope scaling factor %g / original context %d invalid", r.factor, r.orig_ctx);
    return r;
}

/* -m rope: one CSV row per dimension pair i: its inverse frequency theta^(-2i/d) (the model's
 * theta, or --rope-base), wavelength 2 pi / inv_freq in tokens, rotations over the original
 * context C (what a model trained at C has seen of it); and with the scaling, YaRN's ramp (0:
 * kept, 1: divided by F), the frequency used for a context of ctx, its wavelength, and the
 * factor on cos and sin */
static void print_rope(const mm_header *h, const Rope *r, int ctx) {
    int hd = (int)h->head_dim, half = hd / 2;
    static const char *names[] = {"none", "linear", "yarn", "ntk", "dynamic"};
    Rope plain = *r;
    plain.scaling = MM_ROPE_NONE;
    float *base = xcalloc((size_t)half, sizeof(float), "rope"), *used = xcalloc((size_t)half, sizeof(float), "rope");
    rope_inv_freq(base, &plain, hd, (int)h->max_seq_len, ctx);
    rope_inv_freq(used, r, hd, (int)h->max_seq_len, r->pos_offset + ctx);
    bool yarn = r->scaling == MM_ROPE_YARN && (double)h->max_seq_len / r->orig_ctx > 1.0;
    fprintf(stderr, "rope: theta %g, head_dim %d, scaling %s (F %g), original context %d, context %d\n", r->theta, hd,
           names[r->scaling], r->scaling == MM_ROPE_NONE ? 1.0 : r->factor, r->orig_ctx, ctx);
    printf("pair,inv_freq,wavelength,rotations_in_original_context,ramp,scaled_inv_freq,scaled_wavelength,"
           "attn_factor\n");
    const double two_pi = 2 * 3.14159265358979323846;
    for (int i = 0; i < half; i++) {
        char ramp[32] = "";
        if (yarn) snprintf(ramp, sizeof ramp, "%.6f", yarn_ramp(r, i, hd));
        printf("%d,%.9g,%.6g,%.6g,%s,%.9g,%.6g,%g\n", i, base[i], two_pi / base[i], r->orig_ctx * base[i] / two_pi,
               ramp, used[i], two_pi / used[i], r->scaling == MM_ROPE_YARN ? r->attn_factor : 1.0);
    }
    free(base);
    free(used);
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
    /* threads: --threads N, else OMP_NUM_THREADS, both fixed; else up to the usable CPUs, tuned */
    int usable = usable_cpus();
#ifdef _OPENMP
    const char *env = getenv("OMP_NUM_THREADS");
    bool from_env = !o.threads && env && *env >= '1' && *env <= '9';  /* (libgomp ignores others) */
    int max_threads = o.threads ? o.threads : from_env ? omp_get_max_threads() : usable;
    if (max_threads > usable)
        fprintf(stderr, "run: warning: %d threads (%s) on the %d CPUs this process may use: they will wait "
                "for each other\n", max_threads, o.threads ? "--threads" : "OMP_NUM_THREADS", usable);
    threads_init(max_threads, !o.threads && !from_env);
#else
    if (o.threads > 1)
        die("--threads %d: this build runs one thread (it was built without OpenMP)", o.threads);
    threads_init(1, false);
    (void)usable;
#endif
    Model m;
    model_load(&m, o.model_path);
    if (o.row_bits && m.head.dtype == MM_Q8_0 && m.layers[0].wq.dtype == MM_Q8_0)
        die("--row-bits applies to f32, f16 and bf16 weights; %s is q8_0, which decoding reads by panels",
            o.model_path);
    const mm_header *h = &m.cfg;
    Tokenizer tok;
    const char *tok_err = tokenizer_load(&tok, m.tokenizer, h->tokenizer_size, h->vocab_size);
    if (tok_err) die("%s: %s", o.model_path, tok_err);
    Rope rope = rope_from(h, &o);
    int ctx = o.ctx ? o.ctx : (int)h->max_seq_len;
    if (!o.ctx && !strcmp(o.mode, "ppl") && ctx > PPL_WINDOW) ctx = PPL_WINDOW;
    if (rope.scaling == ROPE_DYNAMIC && !o.ctx && strcmp(o.mode, "ppl"))  /* (ppl: its window) */
        die("--rope-scaling dynamic scales the base for the context's length: give it with -c");
    bool generating = !strcmp(o.mode, "generate"), chatting = !strcmp(o.mode, "chat");
    bool benching = !strcmp(o.mode, "bench");
    if (!strcmp(o.mode, "rope")) {
        print_rope(h, &rope, ctx);
        tokenizer_free(&tok); model_free(&m);
        return 0;
    }

    Conversation conversation = {0};  /* chat's: read first, so that a bad file fails at once */
    if (chatting)
        conversation = conversation_load(o.model_path, (int)h->chat_template, o.messages_path, o.tools_path,
                                         o.system, NULL, o.think);

    /* the input: token ids, or text (which generate, logits and ppl start with BOS) */
    size_t text_len = 0;
    const char *text_file = o.text_file;
    bool reads_text = !chatting && !benching && strcmp(o.mode, "decode") && !o.messages_path;
    if (!text_file && !o.text && !o.ids_arg && reads_text && !isatty(STDIN_FILENO))
        text_file = "-";  /* echo TEXT | ./run MODEL: the text comes from standard input */
    char *text = text_file ? read_file(text_file, &text_len) : NULL;
    if (text && !o.text_file && text_len == 0) {  /* nothing there: as if none were given */
        free(text);
        text = NULL;
    }
    if (o.text) text_len = strlen(o.text);
    const char *input = text ? text : o.text;
    if (!strcmp(o.mode, "prompt")) {  /* the text the template renders, as it goes to the model */
        if (!o.messages_path && !input)
            die("-m prompt needs --messages FILE, or the user's message (-i TEXT or -f FILE)");
        if (input && memchr(input, 0, text_len)) die("%s: the message holds a NUL byte", text_file ? text_file : "-i");
        Conversation cv = conversation_load(o.model_path, (int)h->chat_template, o.messages_path, o.tools_path,
                                            o.system, input, o.think);
        char *prompt = chat_render((int)h->chat_template, cv.msgs, cv.n, cv.tools, cv.n_tools, true, o.think);
        if (!prompt) die("out of memory rendering the chat prompt");
        fputs(prompt, stdout);
        if (o.verbose) {
            int n;
            free(encode_text(&tok, (const uint8_t *)prompt, strlen(prompt), &n));
            fprintf(stderr, "[%d messages, %d tools: %d tokens]\n", cv.n, cv.n_tools, n);
        }
        free(prompt); conversation_free(&cv); free(text); tokenizer_free(&tok); model_free(&m);
        return 0;
    }
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
    int kv_dtype = !strcmp(o.kv, "f16") ? MM_F16 : MM_F32;
    ctx = fit_context(&m, o.batch < ctx ? o.batch : ctx, ctx, o.ctx != 0, kv_dtype);
    int batch = o.batch < ctx ? o.batch : ctx;
    if (!ppl && n_ids > ctx)
        die("the prompt is %d tokens; it does not fit the context of %d positions (-c)", n_ids, ctx);
    if (!strcmp(o.mode, "logits") && !o.out_path) die("-m logits needs -o FILE for the logits");
    State s;
    state_init(&s, &m, batch, ctx, &rope, kv_dtype, false);
    if (o.verbose) {
        static const char *scaling[] = {"none", "linear", "yarn", "ntk", "dynamic"};
        fprintf(stderr, "%s: %s, hidden %u, %u layers, %u/%u heads of %u, %s %u, vocab %u, "
                "matrices %s\n", o.model_path, h->generation == MM_GEN_MINIMIND3 ? "minimind-3" : "MiniMind2",
                h->dim, h->n_layers, h->n_heads, h->n_kv_heads, h->head_dim,
                h->flags & MM_FLAG_MOE ? "MoE expert ffn" : "ffn",
                h->flags & MM_FLAG_MOE ? h->moe_hidden_dim : h->hidden_dim, h->vocab_size,
                dtype_name(m.layers[0].wq.dtype));
        fprintf(stderr, "rope: theta %g, scaling %s (factor %g, orig ctx %d, beta %g/%g, attn %g); "
                "ctx %d, batch %d, threads %s%d, kv cache %s, kernels %s\n", rope.theta,
                scaling[rope.scaling], rope.factor, rope.orig_ctx, rope.beta_fast, rope.beta_slow,
                rope.attn_factor, ctx, batch, threads.tuned ? "up to " : "", threads.max, o.kv,
                fast_kernels() ? kernels_line() : "plain loops");
    }
    threads_start();
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
            ChatSettings cs = {.think = o.think, .history = o.history,
                               .max_reply = o.steps_given ? o.steps : CHAT_MAX_REPLY,
                               .show_prompt = o.verbose_prompt, .verbose = o.verbose};
            chat(&m, &s, &tok, &sp, &c, &conversation, &cs);
            conversation_free(&conversation);
        }
        free(c.tokens); free(c.seen); free(sp.cand); free(sp.kth);
        if (interrupted) fputs("[interrupted]\n", stderr);
    } else if (!ppl) {
        LogitsOut out = {.out = fopen(o.out_path, "wb"), .path = o.out_path, .vocab = (int)h->vocab_size};
        if (!out.out) die("%s: cannot open for writing (%s)", o.out_path, strerror(errno));
        run_sequence(&m, &s, ids, n_ids, write_logits, &out);
        if (fclose(out.out) != 0) die("%s: write failed (%s)", o.out_path, strerror(errno));
    } else {
        int n_windows = (n_ids + ctx - 1) / ctx;
        PplSum sum = {.vocab = (int)h->vocab_size, .total = n_ids - n_windows};
        FILE *per_position = NULL;
        if (o.per_position) {  /* (opened first: a path that cannot be written fails before the work) */
            per_position = fopen(o.per_position, "w");
            if (!per_position) die("%s: cannot open for writing (%s)", o.per_position, strerror(errno));
            sum.pos_nll = xcalloc((size_t)ctx, sizeof(double), "per-position loss");
            sum.pos_count = xcalloc((size_t)ctx, sizeof(long), "per-position counts");
        }
        char ppl_buf[32];
        fprintf(stderr, "ppl: %d tokens in %d window%s of %d, each from position %d%s\n", n_ids, n_windows,
                n_windows > 1 ? "s" : "", ctx, o.pos_offset, o.ctx ? "" : " (-c sets the window)");
        for (int w = 0; w < n_windows; w++) {
            sum.tokens = ids + (size_t)w * ctx;
            sum.n = n_ids - w * ctx < ctx ? n_ids - w * ctx : ctx;
            run_sequence(&m, &s, sum.tokens, sum.n, add_nll, &sum);
            if (o.verbose && n_windows > 1)
                fprintf(stderr, "window %d/%d: ppl %s over %ld tokens\n", w + 1, n_windows,
                        ppl_text(sum.count ? exp(sum.nll / sum.count) : NAN, ppl_buf), sum.count);
        }
        if (sum.count == 0) die("ppl needs at least 2 tokens in a window (got %d ids, -c %d)", n_ids, ctx);
        if (o.csv)
            printf("context,windows,tokens,nll,ppl\n%d,%d,%ld,%.8f,%s\n", ctx, n_windows, sum.count,
                   sum.nll / sum.count, ppl_text(exp(sum.nll / sum.count), ppl_buf));
        else
            printf("ppl = %s over %ld tokens\n", ppl_text(exp(sum.nll / sum.count), ppl_buf), sum.count);
        if (per_position) {  /* position t's loss is that of the token at t + 1, predicted there */
            fprintf(per_position, "position,count,mean_nll\n");
            for (int t = 0; t < ctx; t++)
                if (sum.pos_count[t])
                    fprintf(per_position, "%d,%ld,%.8f\n", t, sum.pos_count[t], sum.pos_nll[t] / sum.pos_count[t]);
            if (fclose(per_position) != 0) die("%s: write failed (%s)", o.per_position, strerror(errno));
            free(sum.pos_nll);
            free(sum.pos_count);
        }
    }
    if (o.verbose && !generating && !chatting && !benching)
        fprintf(stderr, "%d tokens in %.3f s (%.1f tokens/s)\n", n_ids, now_seconds() - t0,
                n_ids / (now_seconds() - t0));
    if (o.verbose) {  /* (the cache is mapped: only the pages of positions used become resident) */
        fprintf(stderr, "memory: peak RSS %.1f MB; model file %.1f MB (mapped), KV cache up to %.1f MB for "
                "%d positions (%s)\n", peak_rss_mb(), m.map_size / 1048576.0,
                kv_cache_bytes(h, ctx, s.kv_dtype) / 1048576.0, ctx, o.kv);
        print_threads();
    }
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
