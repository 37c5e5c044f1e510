/* run.c: inference for MiniMind models (MiniMind2 and minimind-3, dense and MoE) in one file.
 *
 * Read top to bottom: the model file and its loader, the run state, the building blocks
 * (rmsnorm, matmul, rope, attention, swiglu, moe), the forward pass (a plain single-token
 * reference and the batched path used for prompts), the modes, and main.
 * The maths follows MiniMind's model/model_minimind.py; the layout of a model file is model.h.
 */
#define _POSIX_C_SOURCE 200809L  /* mmap, clock_gettime */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "model.h"

_Static_assert(sizeof(mm_header) == 256, "mm_header must be 256 bytes");
_Static_assert(offsetof(mm_header, tokenizer_offset) == 128, "mm_header layout");
_Static_assert(sizeof(mm_tensor_entry) == 104, "mm_tensor_entry must be 104 bytes");

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("run: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void *xcalloc(size_t n, size_t size, const char *what) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) die("out of memory allocating %s (%zu x %zu bytes)", what, n, size);
    return p;
}

static int n_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* ============================================================================================
 * The model: config from the header, weights pointing into the mapped file
 * ============================================================================================ */

typedef struct {
    int dtype;                  /* enum mm_dtype */
    int rows, cols;             /* a linear weight [out, in], as in PyTorch */
    const void *data;           /* f32/f16/bf16 values, or q8_0 int8 codes [rows * cols] */
    const float *scales;        /* q8_0 only: [rows * cols / 32] */
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
    case MM_Q8_0: return cols % MM_Q8_GROUP ? 0 : n + n / MM_Q8_GROUP * 4;
    default: return 0;
    }
}

/* The loader's table: find a tensor by name, check its shape, dtype and extent, mark it used. */
typedef struct {
    Model *m;
    const mm_tensor_entry *table;
    bool *used;
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
    Matrix w = {.dtype = (int)e->dtype, .rows = (int)rows, .cols = (int)cols, .data = p};
    if (e->dtype == MM_Q8_0) w.scales = (const float *)(p + (size_t)rows * cols);
    return w;
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

static void model_load(Model *m, const char *path) {
    memset(m, 0, sizeof *m);
    m->path = path;
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("%s: cannot open model file (%s)", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("%s: not a regular file", path);
    uint64_t size = (uint64_t)st.st_size;
    if (size < sizeof(mm_header))
        die("%s: file is %llu bytes, too short for the %zu-byte header (truncated?)", path,
            (unsigned long long)size, sizeof(mm_header));
    m->map_size = (size_t)size;
    m->map = mmap(NULL, m->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m->map == MAP_FAILED) die("%s: mmap failed (%s)", path, strerror(errno));
    memcpy(&m->cfg, m->map, sizeof(mm_header));
    mm_header *h = &m->cfg;

    if (h->magic != MM_MAGIC)
        die("%s: not a minimind.c model file (magic 0x%08x, expected 0x%08x \"MMND\"; convert "
            "checkpoints with export.py)", path, h->magic, MM_MAGIC);
    if (h->version != MM_VERSION)
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
                 .used = xcalloc(h->n_tensors, sizeof(bool), "tensor table marks")};
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
    free(ld.used);
}

static void model_free(Model *m) {
    if (m->layers)
        for (uint32_t l = 0; l < m->cfg.n_layers; l++) free(m->layers[l].ffn);
    free(m->layers);
    munmap(m->map, m->map_size);
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
    float *row_buf;             /* [threads, max cols] a weight row converted to f32 */
    int row_buf_len;
    float *logits;              /* [max_tokens, vocab] */
    float *key_cache;           /* [n_layers, ctx, n_kv_heads * head_dim] */
    float *value_cache;         /* [n_layers, ctx, n_kv_heads * head_dim] */
} State;

static void state_init(State *s, const Model *m, int max_tokens, int ctx, const Rope *rope) {
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
    s->row_buf_len = (int)max_cols;
    s->row_buf = xcalloc(nt * max_cols, sizeof(float), "weight row buffer");
    s->logits = xcalloc(T * h->vocab_size, sizeof(float), "logits");
    /* calloc of this size maps fresh zero pages: memory is only committed for positions used */
    s->key_cache = xcalloc((size_t)h->n_layers * ctx * kv_dim, sizeof(float), "key cache");
    s->value_cache = xcalloc((size_t)h->n_layers * ctx * kv_dim, sizeof(float), "value cache");
}

static void state_free(State *s) {
    void *bufs[] = {s->x, s->xb, s->delta, s->q, s->att_out, s->hb, s->hb2, s->moe_in, s->moe_out,
                    s->moe_rows, s->moe_w, s->router, s->top_idx, s->top_w, s->cos, s->sin, s->inv_freq,
                    s->scores, s->row_buf, s->logits, s->key_cache, s->value_cache};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
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
    default: { /* MM_Q8_0 */
        const int8_t *q = (const int8_t *)w->data + at;
        const float *scale = w->scales + at / MM_Q8_GROUP;
        for (int c = 0; c < w->cols; c++) buf[c] = scale[c / MM_Q8_GROUP] * (float)q[c];
        return buf;
    }
    }
}

static float dot(const float *a, const float *b, int n) {
    float sum = 0;
    #pragma omp simd reduction(+:sum)  /* vector lanes of partial sums (-fopenmp-simd) */
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* out[t, r] = W[r, :] . x[t, :] for t < n_tokens.  x: [n_tokens, W.cols], out: [n_tokens, W.rows].
 * Each weight row is read (and converted) once for the whole block of tokens. */
static void matmul(float *out, const float *x, const Matrix *w, int n_tokens, State *s) {
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < w->rows; r++) {
        const float *row = matrix_row(w, r, s->row_buf + (size_t)thread_id() * s->row_buf_len);
        for (int t = 0; t < n_tokens; t++)
            out[(size_t)t * w->rows + r] = dot(row, x + (size_t)t * w->cols, w->cols);
    }
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

/* One query head over positions 0..pos of its kv head: out = softmax(q.k / sqrt(hd)) . v
 * keys, values: the layer's cache, [ctx, kv_dim], this head's slice at offset kv_off */
static void attention_head(float *out, const float *q, const float *keys, const float *values,
                           int kv_dim, int kv_off, int head_dim, int pos, float *scores) {
    float scale = 1.0f / sqrtf((float)head_dim);
    for (int t = 0; t <= pos; t++)
        scores[t] = dot(q, keys + (size_t)t * kv_dim + kv_off, head_dim) * scale;
    softmax(scores, pos + 1);
    memset(out, 0, (size_t)head_dim * sizeof(float));
    for (int t = 0; t <= pos; t++) {
        const float *v = values + (size_t)t * kv_dim + kv_off;
        for (int i = 0; i < head_dim; i++) out[i] += scores[t] * v[i];
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
    matmul(s->hb, x, &f->gate, n, s);
    matmul(s->hb2, x, &f->up, n, s);
    for (size_t i = 0; i < (size_t)n * hidden; i++) s->hb[i] = silu(s->hb[i]) * s->hb2[i];
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
        float *keys = s->key_cache + (size_t)l * s->ctx * kv_dim;
        float *values = s->value_cache + (size_t)l * s->ctx * kv_dim;
        float *k = keys + (size_t)pos * kv_dim, *v = values + (size_t)pos * kv_dim;

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
        for (uint32_t hh = 0; hh < h->n_heads; hh++)
            attention_head(s->att_out + (size_t)hh * hd, s->q + (size_t)hh * hd, keys, values, kv_dim,
                           (int)(hh / group) * hd, hd, pos, s->scores);
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

/* The batched path: n tokens at positions pos0 .. pos0+n-1 (n <= max_tokens), each layer as
 * matrix-matrix work. Logits for all n rows when all_logits, else for the last row only.
 * Returns the logits: [n, vocab] or [1, vocab]. */
static float *forward(const Model *m, State *s, const int *tokens, int n, int pos0, bool all_logits) {
    const mm_header *h = &m->cfg;
    int dim = (int)h->dim, hd = (int)h->head_dim, half = hd / 2, n_heads = (int)h->n_heads;
    int kv_dim = (int)(h->n_kv_heads * h->head_dim), q_dim = n_heads * hd;
    int group = (int)(h->n_heads / h->n_kv_heads);
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
        float *keys = s->key_cache + (size_t)l * s->ctx * kv_dim;
        float *values = s->value_cache + (size_t)l * s->ctx * kv_dim;
        float *k = keys + (size_t)pos0 * kv_dim, *v = values + (size_t)pos0 * kv_dim;

        for (int t = 0; t < n; t++)
            rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, L->input_norm, dim, h->rms_eps);
        matmul(s->q, s->xb, &L->wq, n, s);
        matmul(k, s->xb, &L->wk, n, s);     /* k and v go straight into the cache rows */
        matmul(v, s->xb, &L->wv, n, s);
        for (int t = 0; t < n; t++) {
            const float *c = s->cos + (size_t)t * half, *sn = s->sin + (size_t)t * half;
            for (int hh = 0; hh < n_heads; hh++) {
                float *qh = s->q + (size_t)t * q_dim + (size_t)hh * hd;
                if (L->q_norm) rmsnorm(qh, qh, L->q_norm, hd, h->rms_eps);
                rope_rotate(qh, c, sn, half);
            }
            for (uint32_t g = 0; g < h->n_kv_heads; g++) {
                float *kh = k + (size_t)t * kv_dim + (size_t)g * hd;
                if (L->k_norm) rmsnorm(kh, kh, L->k_norm, hd, h->rms_eps);
                rope_rotate(kh, c, sn, half);
            }
        }
        #pragma omp parallel for schedule(dynamic, 1)
        for (int th = 0; th < n * n_heads; th++) {
            int t = th / n_heads, hh = th % n_heads;
            attention_head(s->att_out + (size_t)t * q_dim + (size_t)hh * hd,
                           s->q + (size_t)t * q_dim + (size_t)hh * hd, keys, values, kv_dim,
                           (hh / group) * hd, hd, pos0 + t, s->scores + (size_t)thread_id() * s->ctx);
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
typedef struct { const int *tokens; int n, vocab; double nll; long count, total; } PplSum;

static void add_nll(const float *logits, int t, void *ctx) {
    PplSum *p = ctx;
    if (t + 1 >= p->n) return;          /* the window's last position predicts nothing we have */
    float max = logits[0];
    for (int i = 1; i < p->vocab; i++) max = logits[i] > max ? logits[i] : max;
    double sum = 0;
    for (int i = 0; i < p->vocab; i++) sum += exp((double)logits[i] - max);
    p->nll += log(sum) + max - logits[p->tokens[t + 1]];
    p->count++;
    if (p->total >= 8192 && p->count % 4096 == 0)  /* long runs: progress on stderr */
        fprintf(stderr, "ppl %.4f after %ld of %ld tokens\n", exp(p->nll / p->count), p->count, p->total);
}

/* ============================================================================================
 * Command line
 * ============================================================================================ */

typedef struct {
    const char *model_path, *mode, *ids_arg, *out_path;
    int ctx, threads, batch;
    bool no_batch, verbose;
    const char *rope_scaling;   /* NULL: as the model file says */
    float rope_base, rope_scale, yarn_beta_fast, yarn_beta_slow, yarn_attn_factor;
    int yarn_orig_ctx;          /* 0 / NAN above: not given */
} Options;

static void usage(FILE *f) {
    fputs(
"usage: run MODEL.bin [options]\n"
"  -m MODE                logits | ppl  [logits]\n"
"  --ids LIST             token ids, separated by commas or spaces; @FILE reads them from FILE\n"
"  -o FILE                logits mode: write float32 little-endian logits, one row of vocab\n"
"                         values per input position  [required in logits mode]\n"
"  -c, --ctx N            context length (KV cache positions); ppl: window length\n"
"                         [the model's max positions]\n"
"  --threads N            worker threads (OpenMP builds)  [number of cores]\n"
"  --batch N              prompt tokens per forward pass  [64]\n"
"  --no-batch             run prompts token by token through the reference path\n"
"  --rope-base F          RoPE theta  [the model's rope_theta]\n"
"  --rope-scaling S       none | linear | yarn  [the model's config.json, else none]\n"
"  --rope-scale F         scaling factor  [yarn: 16; linear: required]\n"
"  --yarn-orig-ctx N      YaRN original context  [2048]\n"
"  --yarn-beta-fast F     YaRN high-frequency ramp end, in rotations  [32]\n"
"  --yarn-beta-slow F     YaRN low-frequency ramp end, in rotations  [1]\n"
"  --yarn-attn-factor F   YaRN factor on cos and sin  [1.0]\n"
"  -v, --verbose          print the model's config and timings on stderr\n"
"  -h, --help             this text\n"
"YaRN defaults are MiniMind's inference_rope_scaling=True; values from the checkpoint's\n"
"config.json (stored at export) come next; explicit flags win.\n", f);
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

static void parse_args(Options *o, int argc, char **argv) {
    *o = (Options){.mode = "logits", .batch = 64, .rope_base = NAN, .rope_scale = NAN,
                   .yarn_beta_fast = NAN, .yarn_beta_slow = NAN, .yarn_attn_factor = NAN};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); exit(0); }
        if (!strcmp(a, "--no-batch")) { o->no_batch = true; continue; }
        if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) { o->verbose = true; continue; }
        if (a[0] != '-') {
            if (o->model_path) die("unexpected argument '%s' (the model file is '%s')", a, o->model_path);
            o->model_path = a;
            continue;
        }
        if (i + 1 >= argc) die("%s needs a value (see --help)", a);
        const char *v = argv[++i];
        if (!strcmp(a, "-m")) o->mode = v;
        else if (!strcmp(a, "--ids")) o->ids_arg = v;
        else if (!strcmp(a, "-o")) o->out_path = v;
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx")) o->ctx = (int)parse_int(a, v, 1, 1 << 24);
        else if (!strcmp(a, "--threads")) o->threads = (int)parse_int(a, v, 1, 1024);
        else if (!strcmp(a, "--batch")) o->batch = (int)parse_int(a, v, 1, 4096);
        else if (!strcmp(a, "--rope-base")) o->rope_base = parse_float(a, v, 1.0001f, 1e30f);
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
    if (strcmp(o->mode, "logits") && strcmp(o->mode, "ppl"))
        die("-m expects logits or ppl, got '%s'", o->mode);
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

/* --ids "1,2,3" or --ids @FILE */
static int *parse_ids(const char *arg, int *n_out, uint32_t vocab) {
    char *text = NULL;
    if (arg[0] == '@') {
        FILE *f = fopen(arg + 1, "rb");
        if (!f) die("%s: cannot open ids file (%s)", arg + 1, strerror(errno));
        size_t cap = 1 << 16, len = 0;
        text = xcalloc(cap, 1, "ids file");
        size_t got;
        while ((got = fread(text + len, 1, cap - len - 1, f)) > 0) {
            len += got;
            if (len + 1 == cap) {
                char *bigger = realloc(text, cap *= 2);
                if (!bigger) die("out of memory reading %s", arg + 1);
                text = bigger;
            }
        }
        fclose(f);
        text[len] = 0;
        if (strlen(text) != len) die("%s: ids file contains a NUL byte", arg + 1);
    }
    const char *p = text ? text : arg;
    int n = 0, cap = 256;
    int *ids = xcalloc((size_t)cap, sizeof(int), "ids");
    while (*p) {
        if (*p == ',' || *p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') { p++; continue; }
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || (*end && !strchr(", \n\t\r", *end)))
            die("--ids: '%.20s' is not a token id (expected non-negative integers)", p);
        if (v < 0 || v >= (long)vocab) die("--ids: token id %ld is outside the vocab of %u", v, vocab);
        if (n == cap) {
            int *bigger = realloc(ids, sizeof(int) * (size_t)(cap *= 2));
            if (!bigger) die("out of memory reading ids");
            ids = bigger;
        }
        ids[n++] = (int)v;
        p = end;
    }
    free(text);
    if (n == 0) die("--ids: no token ids given");
    *n_out = n;
    return ids;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    Options o;
    parse_args(&o, argc, argv);
#ifdef _OPENMP
    omp_set_num_threads(o.threads ? o.threads : omp_get_num_procs());
#endif
    Model m;
    model_load(&m, o.model_path);
    const mm_header *h = &m.cfg;
    Rope rope = rope_from(h, &o);
    int ctx = o.ctx ? o.ctx : (int)h->max_seq_len;
    if (!o.ids_arg) die("-m %s needs --ids (token ids)", o.mode);
    int n_ids;
    int *ids = parse_ids(o.ids_arg, &n_ids, h->vocab_size);
    bool ppl = !strcmp(o.mode, "ppl");
    if (!ppl && n_ids > ctx)
        die("%d tokens do not fit the context of %d positions (-c)", n_ids, ctx);
    if (!ppl && !o.out_path) die("-m logits needs -o FILE for the logits");
    int batch = o.batch < ctx ? o.batch : ctx;
    State s;
    state_init(&s, &m, batch, ctx, &rope);
    if (o.verbose) {
        static const char *scaling[] = {"none", "linear", "yarn"};
        fprintf(stderr, "%s: %s, hidden %u, %u layers, %u/%u heads of %u, %s %u, vocab %u, "
                "matrices %s\n", o.model_path, h->generation == MM_GEN_MINIMIND3 ? "minimind-3" : "MiniMind2",
                h->dim, h->n_layers, h->n_heads, h->n_kv_heads, h->head_dim,
                h->flags & MM_FLAG_MOE ? "MoE expert ffn" : "ffn",
                h->flags & MM_FLAG_MOE ? h->moe_hidden_dim : h->hidden_dim, h->vocab_size,
                dtype_name(m.layers[0].wq.dtype));
        fprintf(stderr, "rope: theta %g, scaling %s (factor %g, orig ctx %d, beta %g/%g, attn %g); "
                "ctx %d, batch %d, threads %d\n", rope.theta, scaling[rope.scaling], rope.factor,
                rope.orig_ctx, rope.beta_fast, rope.beta_slow, rope.attn_factor, ctx, batch, n_threads());
    }
    double t0 = now_seconds();
    if (!ppl) {
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
            if (n_windows > 1)
                fprintf(stderr, "window %d/%d: ppl %.4f over %ld tokens\n", w + 1, n_windows,
                        sum.count ? exp(sum.nll / sum.count) : NAN, sum.count);
        }
        if (sum.count == 0) die("ppl needs at least 2 tokens in a window (got %d ids, -c %d)", n_ids, ctx);
        printf("ppl = %.6f over %ld tokens\n", exp(sum.nll / sum.count), sum.count);
    }
    if (o.verbose)
        fprintf(stderr, "%d tokens in %.3f s (%.1f tokens/s)\n", n_ids, now_seconds() - t0,
                n_ids / (now_seconds() - t0));
    free(ids);
    state_free(&s);
    model_free(&m);
    return 0;
}
