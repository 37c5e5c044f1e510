/* model.h: the minimind.c model file format. Data only: no code lives here.
 *
 * One file holds one model, everything little-endian:
 *
 *   mm_header                      fixed size, at offset 0
 *   tokenizer block                at header.tokenizer_offset, header.tokenizer_size bytes
 *   mm_tensor_entry[n_tensors]     at header.tensor_table_offset
 *   tensor data                    each tensor at its entry's offset, MM_ALIGN-aligned for mmap
 *
 * export.py writes it, run.c maps it. The loader checks every count, offset and size against
 * the file length before using it. Any change to this layout bumps MM_VERSION.
 */
#ifndef MINIMIND_MODEL_H
#define MINIMIND_MODEL_H

#include <stdint.h>

#define MM_MAGIC   0x444e4d4du  /* the bytes "MMND" read as a little-endian uint32 */
#define MM_VERSION 2u          /* 2: the q8_0 panel layout (version 1 files without q8_0 still load) */
#define MM_ALIGN   64u          /* tensor data offsets are multiples of this */
#define MM_NAME_LEN 64          /* tensor names, NUL-padded */
#define MM_MAX_DIMS 4

/* Model generation: decides defaults and a few details of the maths (see spec). */
enum mm_generation {
    MM_GEN_MINIMIND2 = 2,       /* 2025: no q/k norm, MoE with shared experts */
    MM_GEN_MINIMIND3 = 3,       /* 2026: q/k norm over head_dim, MoE without shared experts */
};

/* Behaviour switches of the architecture, as bits of mm_header.flags. */
enum mm_flags {
    MM_FLAG_QK_NORM    = 1u << 0, /* RMSNorm on every q and k head before RoPE */
    MM_FLAG_TIED_EMBED = 1u << 1, /* output head is the embedding matrix (no lm_head tensor) */
    MM_FLAG_MOE        = 1u << 2, /* feed-forward is a mixture of experts */
};

/* When the top-k router weights are divided by their sum. */
enum mm_moe_norm {
    MM_MOE_NORM_NEVER = 0,
    MM_MOE_NORM_IF_K_GT_1 = 1,  /* MiniMind2: only when top_k > 1 */
    MM_MOE_NORM_ALWAYS = 2,     /* minimind-3 */
};

/* RoPE scaling, as the checkpoint's config.json asks for it (run.c flags override). */
enum mm_rope_scaling {
    MM_ROPE_NONE = 0,
    MM_ROPE_LINEAR = 1,         /* positions divided by rope_factor */
    MM_ROPE_YARN = 2,           /* MiniMind's YaRN: per-pair frequency ramp, see spec */
};

/* Which chat template the checkpoint's tokenizer_config.json carries. MiniMind2's and
 * minimind-3's list tools in a "# Tools" system block, print tool calls as <tool_call> blocks and
 * tool results as <tool_response> turns; the others render no tools. */
enum mm_chat_template {
    MM_CHAT_NONE = 0,           /* no template: pretrained model, prompt is BOS + text */
    MM_CHAT_CHATML = 1,         /* plain ChatML, system block only when given */
    MM_CHAT_MINIMIND2 = 2,      /* ChatML, default system "You are a helpful assistant" */
    MM_CHAT_MINIMIND3 = 3,      /* ChatML, <think> blocks on assistant turns */
    MM_CHAT_MINIMIND2_NO_TOOLS = 4,  /* MiniMind2's without tools (an earlier one) */
};

/* Tensor element types. Norm weights are always F32. */
enum mm_dtype {
    MM_F32 = 0,
    MM_F16 = 1,
    MM_BF16 = 2,
    MM_Q8_0 = 3,                /* int8 codes in groups of 32 along a row, an f16 scale per group,
                                   stored in panels of 16 rows (below) */
};
#define MM_Q8_GROUP 32
#define MM_Q8_PANEL 16

/* A q8_0 [rows, cols] tensor: weight w[r][c] = scale[r][c / 32] * code[r][c], scale = max|w| / 127
 * over the group. The rows come in panels of MM_Q8_PANEL (the last one padded with zero rows and
 * scales), one after another; panel p holds rows 16p .. 16p+15 as
 *     int8    codes[cols / 4][16][4]     4 columns of row 16p+i at codes[c / 4][i]
 *     uint16  scales[cols / 32][16]      f16: the scale of group g of row 16p+i at scales[g][i]
 * i.e. 16 x cols + 16 x (cols / 32) x 2 bytes (a multiple of 64). This is the order in which the
 * kernels consume them: one 64-byte load holds 4 columns of 16 rows, and a panel is read start to
 * end. */

/* Offset 0 of the file. 256 bytes; every field at a fixed offset (checked in run.c). */
typedef struct {
    uint32_t magic;             /* MM_MAGIC */
    uint32_t version;           /* MM_VERSION */
    uint32_t header_size;       /* sizeof(mm_header) */
    uint32_t generation;        /* enum mm_generation */
    uint32_t flags;             /* enum mm_flags bits */
    uint32_t dim;               /* hidden size */
    uint32_t n_layers;
    uint32_t n_heads;           /* query heads */
    uint32_t n_kv_heads;        /* key/value heads (GQA: n_heads is a multiple) */
    uint32_t head_dim;
    uint32_t hidden_dim;        /* SwiGLU width of the dense FFN (0 when MoE) */
    uint32_t vocab_size;
    uint32_t max_seq_len;       /* max_position_embeddings */
    float    rms_eps;
    float    rope_theta;
    uint32_t n_experts;         /* routed experts (0 when dense) */
    uint32_t n_experts_per_tok; /* top-k */
    uint32_t n_shared_experts;  /* always-on experts (MiniMind2 MoE) */
    uint32_t moe_hidden_dim;    /* SwiGLU width of each expert */
    uint32_t moe_norm;          /* enum mm_moe_norm */
    uint32_t rope_scaling;      /* enum mm_rope_scaling from config.json */
    float    rope_factor;       /* linear/YaRN factor s */
    uint32_t yarn_orig_ctx;     /* original_max_position_embeddings */
    float    yarn_beta_fast;
    float    yarn_beta_slow;
    float    yarn_attn_factor;  /* multiplies cos and sin */
    uint32_t bos_id, eos_id, pad_id;
    uint32_t chat_template;     /* enum mm_chat_template */
    uint32_t n_tensors;
    uint32_t reserved0;
    uint64_t tokenizer_offset;  /* tokenizer block, see below */
    uint64_t tokenizer_size;
    uint64_t tensor_table_offset;
    uint64_t file_size;         /* the whole file: a shorter file is truncated */
    uint8_t  reserved[96];      /* zero */
} mm_header;

/* The tokenizer block (byte-level BPE, Hugging Face tokenizer.json semantics):
 *   uint32 n_vocab, n_merges
 *   n_vocab times:  uint8 kind (0 normal, 1 added, 2 added+special), uint32 len, len raw bytes
 *                   (the token's bytes after undoing the byte-level character mapping;
 *                    an added token's literal text)
 *   n_merges times: uint32 left_id, right_id, merged_id    (rank = index)
 */
enum mm_token_kind { MM_TOKEN_NORMAL = 0, MM_TOKEN_ADDED = 1, MM_TOKEN_SPECIAL = 2 };

/* One row of the tensor table: 104 bytes. */
typedef struct {
    char     name[MM_NAME_LEN]; /* e.g. "model.layers.0.self_attn.q_proj.weight", NUL-padded */
    uint32_t dtype;             /* enum mm_dtype */
    uint32_t n_dims;            /* 1 or 2 */
    uint32_t shape[MM_MAX_DIMS];/* PyTorch order: [out, in] for a linear weight */
    uint64_t offset;            /* from the start of the file, multiple of MM_ALIGN */
    uint64_t size;              /* bytes */
} mm_tensor_entry;

#endif
