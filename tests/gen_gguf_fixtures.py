#!/usr/bin/env python3
"""Write tests/fixtures/gguf/: fixture checkpoints as GGUF files in the forms llama.cpp writes,
each one checked with llama.cpp itself.

    python3 tests/gen_gguf_fixtures.py --llama PATH_TO_LLAMA_CPP

The files are written with the Python standard library (the checkpoints read by export.py's own
readers), laid out as llama.cpp's convert_hf_to_gguf.py and llama-quantize lay theirs out:

  m2_dense.q8_0.gguf   MiniMind2 (tests/fixtures/m2_dense.pth), arch llama: the rows of every
                       q_proj and k_proj reordered for llama.cpp's RoPE (per head, the two halves of
                       rotate-half interleaved); 2-D weights Q8_0, norms F32
  m3_dense.bf16.gguf   minimind-3 (tests/fixtures/m3_dense), arch qwen3, q/k norms, BF16
  m3_moe.q8_0.gguf     minimind-3 MoE (tests/fixtures/m3_moe.pth), arch qwen3moe: router
                       ffn_gate_inp (F32, as llama-quantize leaves it), experts stacked in
                       ffn_{gate,up,down}_exps, Q8_0

each with the fixture tokenizer (tests/fixtures/tokenizer: tokens, merges, token types, bos/eos/pad
ids, chat template) in its metadata. Q8_0 is ggml's: per block of 32, d = max|x| / 127 stored as
f16, codes round(x / d) (half away from zero); BF16 rounds to nearest even.

Then each file is checked with llama.cpp: tests/reference/llama_logits.c is compiled against
PATH/include and PATH/build/bin/libllama.so (a CPU build of llama.cpp, as tests/sidebyside.py's
docstring makes) and run on the case's ids; its logits must agree with the PyTorch reference of the
twin case (tests/fixtures/cases.json) by the test suite's own rules: top-1 on every row for Q8_0,
max|diff| / max|ref| < 5e-3 for BF16. What llama.cpp gave is kept in tests/fixtures/gguf/cases.json
(its commit, the top-1 agreement and the difference), which tests/run_tests.py reads: it exports
each file with export.py (its own tokenizer) and checks ./run by the same rules, and that Q8_0
weights exported as q8_0 keep their codes and scales.
"""
import argparse
import array
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIX = os.path.join(HERE, "fixtures")
OUT = os.path.join(FIX, "gguf")
sys.path.insert(0, ROOT)
import export  # noqa: E402  (export.py: the checkpoint readers and the architecture from the shapes)

CASES = [  # (file, twin case of cases.json, arch, weight type)
    ("m2_dense.q8_0.gguf", "m2_dense", "llama", "q8_0"),
    ("m3_dense.bf16.gguf", "m3_dense", "qwen3", "bf16"),
    ("m3_moe.q8_0.gguf", "m3_moe", "qwen3moe", "q8_0"),
]
GGML = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}
FILE_TYPE = {"q8_0": 7, "bf16": 32}  # general.file_type: LLAMA_FTYPE_MOSTLY_Q8_0, _BF16
ALIGN = 32


# ----------------------------------------------------------------------------------------------
# Encodings

def q8_0_blocks(values):
    """ggml's quantize_row_q8_0: per 32 values, an f16 scale d = max|x| / 127, codes round(x / d)"""
    out = bytearray()
    for g in range(0, len(values), 32):
        grp = values[g:g + 32]
        amax = max(abs(v) for v in grp)
        d = amax / 127.0
        inv = 1.0 / d if d else 0.0
        out += struct.pack("<e", d)
        out += bytes(int(math.copysign(math.floor(abs(v * inv) + 0.5), v)) & 0xFF for v in grp)
    return bytes(out)


def bf16(values):
    bits = array.array("I")
    bits.frombytes(array.array("f", values).tobytes())
    return array.array("H", [((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF for b in bits]).tobytes()


def encode(values, kind):
    if kind == "f32":
        return array.array("f", values).tobytes()
    return q8_0_blocks(values) if kind == "q8_0" else bf16(values)


def permute(values, rows, cols, n_head):
    """llama.cpp's LlamaModel.permute: HF row h*hd + j*hd/2 + i becomes row h*hd + 2i + j"""
    hd = rows // n_head
    out = [None] * rows
    for h in range(n_head):
        for j in range(2):
            for i in range(hd // 2):
                out[h * hd + 2 * i + j] = values[(h * hd + j * (hd // 2) + i) * cols:
                                                 (h * hd + j * (hd // 2) + i + 1) * cols]
    return [v for row in out for v in row]


# ----------------------------------------------------------------------------------------------
# The GGUF file

def gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


class I32(int):
    """an int32 metadata value (token types are int32 in llama.cpp's files; other ints uint32)"""


def gguf_value(v):
    """(type, bytes) of a metadata value: str, bool, int (u32), I32, float (f32), or a list of one of them"""
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, I32):
        return 5, struct.pack("<i", v)
    if isinstance(v, str):
        return 8, gguf_string(v)
    if isinstance(v, int):
        return (4, struct.pack("<I", v)) if v >= 0 else (5, struct.pack("<i", v))
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, list):
        item = gguf_value(v[0])[0] if v else 8
        body = b"".join(gguf_value(x)[1] for x in v)
        return 9, struct.pack("<IQ", item, len(v)) + body
    raise TypeError(v)


def write_gguf(path, meta, tensors):
    """tensors: [(name, shape in PyTorch order, kind, data)]"""
    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)))
    for k, v in meta.items():
        t, b = gguf_value(v)
        head += gguf_string(k) + struct.pack("<I", t) + b
    offset, blobs = 0, []
    for name, shape, kind, data in tensors:
        dims = list(reversed(shape))  # ggml: the fastest-moving dimension first
        head += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", GGML[kind], offset)
        blobs.append((offset, data))
        offset = (offset + len(data) + ALIGN - 1) // ALIGN * ALIGN
    head += b"\0" * (-len(head) % ALIGN)
    with open(path, "wb") as f:
        f.write(head)
        for at, data in blobs:
            f.write(b"\0" * (len(head) + at - f.tell()))
            f.write(data)


def tokenizer_meta():
    with open(os.path.join(FIX, "tokenizer", "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    with open(os.path.join(FIX, "tokenizer", "tokenizer_config.json"), encoding="utf-8") as f:
        tcfg = json.load(f)
    vocab = tok["model"]["vocab"]
    n = max(list(vocab.values()) + [a["id"] for a in tok["added_tokens"]]) + 1
    tokens, types = [""] * n, [1] * n
    for s, i in vocab.items():
        tokens[i] = s
    for a in tok["added_tokens"]:
        tokens[a["id"]], types[a["id"]] = a["content"], 3 if a.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    def token_id(key):
        v = tcfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return tokens.index(v) if v in tokens else None
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [I32(t) for t in types], "tokenizer.ggml.merges": merges}
    for key, gk in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding")):
        if token_id(key) is not None:
            meta[f"tokenizer.ggml.{gk}_token_id"] = token_id(key)
    if tcfg.get("chat_template"):
        meta["tokenizer.chat_template"] = tcfg["chat_template"]
    return meta


def gguf_of(case, arch, kind):
    state, config = export.load_checkpoint(os.path.join(FIX, case["checkpoint"]), None)
    c = export.infer_config(state, config, None, case["checkpoint"])
    a = arch
    meta = {"general.architecture": arch, "general.name": f"minimind.c fixture {case['name']}",
            "general.file_type": FILE_TYPE[kind], "general.alignment": ALIGN,
            f"{a}.context_length": c["max_seq_len"], f"{a}.embedding_length": c["dim"],
            f"{a}.block_count": c["n_layers"], f"{a}.attention.head_count": c["n_heads"],
            f"{a}.attention.head_count_kv": c["n_kv_heads"], f"{a}.rope.freq_base": float(c["rope_theta"]),
            f"{a}.attention.layer_norm_rms_epsilon": float(c["rms_eps"]),
            f"{a}.attention.key_length": c["head_dim"], f"{a}.attention.value_length": c["head_dim"],
            f"{a}.vocab_size": c["vocab_size"]}
    if arch == "llama":
        meta[f"{a}.rope.dimension_count"] = c["head_dim"]
    if c["n_experts"]:
        meta.update({f"{a}.expert_count": c["n_experts"], f"{a}.expert_used_count": c["n_experts_per_tok"],
                     f"{a}.expert_feed_forward_length": c["moe_hidden_dim"],
                     f"{a}.feed_forward_length": c["moe_hidden_dim"]})
    else:
        meta[f"{a}.feed_forward_length"] = c["hidden_dim"]
    meta.update(tokenizer_meta())

    def weight(name):
        t = state[name]
        return list(t.shape), t.floats().tolist()

    def matrix(gname, hname, permute_heads=0):
        shape, v = weight(hname)
        if permute_heads:
            v = permute(v, shape[0], shape[1], permute_heads)
        return (gname, shape, kind, encode(v, kind))

    def norm(gname, hname):
        shape, v = weight(hname)
        return (gname, shape, "f32", encode(v, "f32"))

    tensors = [matrix("token_embd.weight", "model.embed_tokens.weight")]
    for l in range(c["n_layers"]):
        p, b = f"model.layers.{l}.", f"blk.{l}."
        tensors += [norm(b + "attn_norm.weight", p + "input_layernorm.weight"),
                    matrix(b + "attn_q.weight", p + "self_attn.q_proj.weight", c["n_heads"] if arch == "llama" else 0),
                    matrix(b + "attn_k.weight", p + "self_attn.k_proj.weight",
                           c["n_kv_heads"] if arch == "llama" else 0),
                    matrix(b + "attn_v.weight", p + "self_attn.v_proj.weight"),
                    matrix(b + "attn_output.weight", p + "self_attn.o_proj.weight")]
        if arch != "llama":
            tensors += [norm(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight"),
                        norm(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight")]
        tensors.append(norm(b + "ffn_norm.weight", p + "post_attention_layernorm.weight"))
        if c["n_experts"]:
            tensors.append(norm(b + "ffn_gate_inp.weight", p + "mlp.gate.weight"))  # (F32 in llama-quantize)
            for part, gname in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                                ("down_proj", "ffn_down_exps")):
                rows, vals = None, []
                for e in range(c["n_experts"]):
                    shape, v = weight(f"{p}mlp.experts.{e}.{part}.weight")
                    rows, vals = shape, vals + v
                tensors.append((b + gname + ".weight", [c["n_experts"]] + rows, kind, encode(vals, kind)))
        else:
            tensors += [matrix(b + "ffn_gate.weight", p + "mlp.gate_proj.weight"),
                        matrix(b + "ffn_up.weight", p + "mlp.up_proj.weight"),
                        matrix(b + "ffn_down.weight", p + "mlp.down_proj.weight")]
    tensors.append(norm("output_norm.weight", "model.norm.weight"))
    if "lm_head.weight" in state and state["lm_head.weight"].data != state["model.embed_tokens.weight"].data:
        tensors.append(matrix("output.weight", "lm_head.weight"))
    return meta, tensors


# ----------------------------------------------------------------------------------------------
# The check with llama.cpp

def read_f32(path):
    a = array.array("f")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    return a


def argmax(row):
    return max(range(len(row)), key=row.__getitem__)


def build_verifier(llama, work):
    exe = os.path.join(work, "llama_logits")
    lib = os.path.join(llama, "build", "bin")
    cmd = ["cc", "-O2", "-I" + os.path.join(llama, "include"), "-I" + os.path.join(llama, "ggml", "include"),
           os.path.join(HERE, "reference", "llama_logits.c"), "-L" + lib, "-lllama", "-Wl,-rpath," + lib, "-o", exe]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"gen_gguf_fixtures: cannot build the llama.cpp check: {p.stderr.strip()[-500:]}")
    return exe


def llama_commit(llama):
    p = subprocess.run(["git", "-C", llama, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama", required=True, help="a llama.cpp checkout with a CPU build in PATH/build")
    a = ap.parse_args()
    with open(os.path.join(FIX, "cases.json")) as f:
        cases = {c["name"]: c for c in json.load(f)["cases"]}
    os.makedirs(OUT, exist_ok=True)
    record = {"generator": "tests/gen_gguf_fixtures.py", "llama.cpp": llama_commit(os.path.abspath(a.llama)),
              "cases": []}
    with tempfile.TemporaryDirectory() as work:
        verifier = build_verifier(os.path.abspath(a.llama), work)
        for file, twin, arch, kind in CASES:
            case = cases[twin]
            meta, tensors = gguf_of(case, arch, kind)
            path = os.path.join(work, file)  # (moved into tests/fixtures/gguf once llama.cpp agrees)
            write_gguf(path, meta, tensors)
            out = os.path.join(work, "logits.f32")
            p = subprocess.run([verifier, path, out] + [str(i) for i in case["ids"]], capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"gen_gguf_fixtures: llama.cpp does not read {file}: {p.stderr.strip()[-500:]}")
            got, ref, V = read_f32(out), read_f32(os.path.join(FIX, case["logits"])), case["vocab"]
            rows = case["rows"]
            top1 = sum(argmax(got[r * V:(r + 1) * V]) == argmax(ref[i * V:(i + 1) * V]) for i, r in enumerate(rows))
            diff = max(max(abs(got[r * V + j] - ref[i * V + j]) for j in range(V)) for i, r in enumerate(rows)) / \
                max(abs(x) for x in ref)
            ok = top1 == len(rows) if kind == "q8_0" else diff < 5e-3
            print(f"{file}: llama.cpp top-1 {top1}/{len(rows)}, max|diff|/max|ref| {diff:.2e}: "
                  f"{'agrees' if ok else 'DISAGREES'} with the PyTorch reference of {twin}")
            if not ok:
                sys.exit(f"gen_gguf_fixtures: llama.cpp's logits for {file} disagree with {twin}'s reference")
            os.replace(path, os.path.join(OUT, file))
            record["cases"].append({"name": file.rsplit(".", 2)[0] + "_gguf_" + kind, "gguf": file, "twin": twin,
                                    "arch": arch, "weights": kind, "export_dtype": "q8_0" if kind == "q8_0" else "f32",
                                    "llama_cpp_top1": f"{top1}/{len(rows)}", "llama_cpp_rel_diff": float(f"{diff:.3e}")})
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
