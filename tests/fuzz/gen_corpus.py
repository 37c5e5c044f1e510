#!/usr/bin/env python3
"""Seed corpora for the fuzz targets (tests/fuzz/corpus/<target>/), made from the project's own
fixtures only (Python standard library; no torch):

  loader     tiny model files: random-weight checkpoints written as safetensors, exported by
             export.py with tests/fixtures/tokenizer (dense and MoE, both generations, every dtype)
  tokenizer  texts from tests/reference/corpus.json (the tokenizer parity corpus)
  chat       conversations from tests/reference/chats.json, in chat_fuzz.c's input format
  args       command lines after `run model.bin`, arguments separated by NUL bytes

    python3 tests/fuzz/gen_corpus.py   (make fuzz-corpus: rewrites the four folders, deterministic;
                                        the crash reproducers, regress-*, are kept)
"""
import json
import os
import random
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUZZ = os.path.join(ROOT, "tests", "fuzz")
CORPUS = os.path.join(FUZZ, "corpus")
REF = os.path.join(ROOT, "tests", "reference")
VOCAB = 320  # tests/fixtures/tokenizer


def tensor_bytes(values, dtype):
    if dtype == "F32":
        return struct.pack(f"<{len(values)}f", *values)
    if dtype == "F16":
        return struct.pack(f"<{len(values)}e", *values)
    f32 = struct.pack(f"<{len(values)}f", *values)  # BF16: the high half of each float
    return b"".join(f32[i + 2:i + 4] for i in range(0, len(f32), 4))


def write_safetensors(path, tensors, dtype, rng):
    header, blobs, off = {}, [], 0
    for name, shape in tensors:
        n = 1
        for s in shape:
            n *= s
        dt = "F32" if len(shape) == 1 else dtype
        raw = tensor_bytes([rng.uniform(-0.5, 0.5) + (1.0 if len(shape) == 1 else 0.0) for _ in range(n)], dt)
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def checkpoint(dim, layers, heads, kv_heads, head_dim, hidden, qk_norm, experts=0, shared=0, untied=False):
    t = [("model.embed_tokens.weight", (VOCAB, dim)), ("model.norm.weight", (dim,))]
    if untied:
        t.append(("lm_head.weight", (VOCAB, dim)))
    for l in range(layers):
        p = f"model.layers.{l}."
        t += [(p + "input_layernorm.weight", (dim,)), (p + "post_attention_layernorm.weight", (dim,)),
              (p + "self_attn.q_proj.weight", (heads * head_dim, dim)),
              (p + "self_attn.k_proj.weight", (kv_heads * head_dim, dim)),
              (p + "self_attn.v_proj.weight", (kv_heads * head_dim, dim)),
              (p + "self_attn.o_proj.weight", (dim, heads * head_dim))]
        if qk_norm:
            t += [(p + "self_attn.q_norm.weight", (head_dim,)), (p + "self_attn.k_norm.weight", (head_dim,))]
        ffns = [p + "mlp."] if not experts else \
            [p + f"mlp.experts.{e}." for e in range(experts)] + [p + f"mlp.shared_experts.{e}." for e in range(shared)]
        if experts:
            t.append((p + "mlp.gate.weight", (experts, dim)))
        for f in ffns:
            t += [(f + "gate_proj.weight", (hidden, dim)), (f + "up_proj.weight", (hidden, dim)),
                  (f + "down_proj.weight", (dim, hidden))]
    return t


# name, checkpoint shape, config.json, safetensors dtype, export --dtype
MODELS = [
    ("m3_dense_f32", dict(dim=8, layers=1, heads=2, kv_heads=1, head_dim=4, hidden=16, qk_norm=True),
     {"num_attention_heads": 2, "max_position_embeddings": 64}, "F32", "f32"),
    ("m3_moe_f16", dict(dim=8, layers=2, heads=2, kv_heads=2, head_dim=4, hidden=8, qk_norm=True,
                        experts=3, shared=1),
     {"num_attention_heads": 2, "num_experts_per_tok": 2, "max_position_embeddings": 64,
      "inference_rope_scaling": True}, "F16", "f16"),
    ("m2_dense_bf16", dict(dim=8, layers=1, heads=2, kv_heads=1, head_dim=4, hidden=16, qk_norm=False),
     {"num_attention_heads": 2, "max_position_embeddings": 64}, "BF16", "bf16"),
    ("m2_moe_f32", dict(dim=8, layers=1, heads=2, kv_heads=2, head_dim=4, hidden=8, qk_norm=False,
                        experts=2),
     {"num_attention_heads": 2, "num_experts_per_tok": 1, "norm_topk_prob": False,
      "max_position_embeddings": 64}, "F32", "f32"),
    ("m3_dense_q8_0", dict(dim=32, layers=1, heads=2, kv_heads=1, head_dim=16, hidden=32, qk_norm=True),
     {"num_attention_heads": 2, "max_position_embeddings": 64}, "F32", "q8_0"),
    ("m3_untied_f32", dict(dim=8, layers=1, heads=2, kv_heads=1, head_dim=4, hidden=16, qk_norm=True,
                           untied=True),
     {"num_attention_heads": 2, "max_position_embeddings": 64}, "F32", "f32"),
]


def loader_seeds(out):
    rng = random.Random(6)
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape, config, st_dtype, dtype in MODELS:
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            write_safetensors(os.path.join(folder, "model.safetensors"), checkpoint(**shape), st_dtype, rng)
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump(dict(config, model_type="minimind"), f)
            subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), folder, os.path.join(out, name),
                            "--tokenizer", os.path.join(ROOT, "tests", "fixtures", "tokenizer"),
                            "--dtype", dtype], check=True, stdout=subprocess.DEVNULL)


def tokenizer_seeds(out):
    with open(os.path.join(REF, "corpus.json"), encoding="utf-8") as f:
        texts = json.load(f)
    for i, text in enumerate(texts[::4]):  # every fourth: a small corpus, all kinds of text
        with open(os.path.join(out, f"text{i:03d}"), "wb") as f:
            f.write(text.encode("utf-8", "surrogatepass"))
    with open(os.path.join(out, "bytes"), "wb") as f:
        f.write(bytes(range(256)) + b"<|im_start|>user\n\xe4\xbd\xa0<|im_end|>\xf0\x9f")


def chat_seeds(out):
    """chat_fuzz.c's input: one byte of settings (the template in bits 0-2, bit 3
    add_generation_prompt, bit 4 think), then the conversation as JSON, messages and tools."""
    with open(os.path.join(REF, "chats.json"), encoding="utf-8") as f:
        chats = json.load(f)
    for i, chat in enumerate(chats):
        for template in (2, 3):
            flags = template | (8 if chat.get("add_generation_prompt") else 0) | (16 if i % 2 else 0)
            text = json.dumps({"messages": chat["messages"], "tools": chat.get("tools")}, ensure_ascii=i % 3 == 0)
            with open(os.path.join(out, f"chat{i:02d}_t{template}"), "wb") as f:
                f.write(bytes([flags]) + text.encode("utf-8"))


ARGS = [  # after `run model.bin`
    ["-i", "hello", "-n", "16", "-s", "42"],
    ["-m", "chat", "-y", "You are a poet.", "--think", "-t", "0.7", "-p", "0.9", "-k", "20"],
    ["-m", "logits", "--ids", "1,2,3", "-o", "out.f32", "--batch", "1", "--ref-kernels"],
    ["-m", "ppl", "-f", "text.txt", "-c", "32", "--csv", "-v"],
    ["-m", "tokenize", "-i", "x", "--show-tokens", "--threads", "2", "--batch", "8"],
    ["--rope-scaling", "yarn", "--rope-scale", "4", "--yarn-orig-ctx", "2048",
     "--yarn-beta-fast", "32", "--yarn-beta-slow", "1", "--yarn-attn-factor", "1.0", "--rope-base", "10000"],
    ["--rope-scaling", "linear", "--rope-scale", "2", "--kv", "f16", "--ctx", "100000"],
    ["-m", "decode", "--ids", "5 6\n7", "--repeat-penalty", "1.1"],
    ["-m", "bench", "-n", "4", "-c", "600"],
]


def args_seeds(out):
    for i, argv in enumerate(ARGS):
        with open(os.path.join(out, f"args{i}"), "wb") as f:
            f.write(b"\0".join(a.encode() for a in argv))


def main():
    for target, make in (("loader", loader_seeds), ("tokenizer", tokenizer_seeds), ("chat", chat_seeds),
                         ("args", args_seeds)):
        out = os.path.join(CORPUS, target)
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):  # the crash reproducers (regress-*) stay
            if not name.startswith("regress-"):
                os.unlink(os.path.join(out, name))
        make(out)
        print(f"{target}: {len(os.listdir(out))} seeds, {sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))} bytes")


if __name__ == "__main__":
    main()
