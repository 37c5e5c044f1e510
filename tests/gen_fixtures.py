#!/usr/bin/python3
"""Generate tests/fixtures: tiny random MiniMind checkpoints in every input form, a tiny
tokenizer the project owns, and reference logits from an independent PyTorch implementation
of ../shared/spec/minimind-architecture.md (written here from the spec, not upstream's code).

Rerun with:   make fixtures      (= /usr/bin/python3 tests/gen_fixtures.py)
Needs Debian's PyTorch (apt-get install python3-torch). The output is deterministic for a given
torch version; tests/run_tests.py reads tests/fixtures/cases.json and needs no torch.
"""
import json
import math
import os
import shutil
import struct

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ----------------------------------------------------------------------------------------------
# The reference model, from the spec

def rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def inv_freq(cfg, rope):
    hd, theta = cfg["head_dim"], rope.get("theta", cfg["rope_theta"])
    kind = rope.get("scaling", "none")
    if kind == "ntk":  # NTK-aware: a larger base, theta F^(d/(d-2))
        theta = theta * rope["factor"] ** (hd / (hd - 2))
    elif kind == "dynamic" and rope["window"] > rope["orig_ctx"]:  # transformers' dynamic NTK, for the window
        F, L, C = rope["factor"], rope["window"], rope["orig_ctx"]
        theta = theta * ((F * L / C) - (F - 1)) ** (hd / (hd - 2))
    f = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    if kind == "linear":
        f = f / rope["factor"]
    elif kind == "yarn":
        L, s = rope.get("orig_ctx", 2048), rope.get("factor", 16.0)
        bf, bs = rope.get("beta_fast", 32.0), rope.get("beta_slow", 1.0)
        if cfg["max_pos"] / L > 1:
            dim_of = lambda b: hd * math.log(L / (b * 2 * math.pi)) / (2 * math.log(theta))
            low, high = max(math.floor(dim_of(bf)), 0), min(math.ceil(dim_of(bs)), hd // 2 - 1)
            ramp = torch.clamp((torch.arange(hd // 2).float() - low) / max(high - low, 0.001), 0, 1)
            f = f * (1 - ramp + ramp / s)
    return f


def rope_rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def swiglu(x, p):
    return torch.nn.functional.silu(x @ p["gate_proj.weight"].T) * (x @ p["up_proj.weight"].T) \
        @ p["down_proj.weight"].T


def reference_logits(sd, cfg, ids, rope=None):
    """logits [len(ids), vocab] of the whole sequence, fp32, causal attention from position 0."""
    rope = rope or {}
    w = {k: v.float() for k, v in sd.items()}
    T, hd, H, KV = len(ids), cfg["head_dim"], cfg["n_heads"], cfg["n_kv_heads"]
    eps = cfg["rms_eps"]
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    angles = torch.outer(torch.arange(T).float(), inv_freq(cfg, rope))  # fp32, as upstream
    attn = rope.get("attn_factor", 1.0) if rope.get("scaling") == "yarn" else 1.0
    cos, sin = torch.cos(angles) * attn, torch.sin(angles) * attn
    if rope.get("off"):  # no positions at all: every rotation the identity
        cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
    mask = torch.full((T, T), float("-inf")).triu(1)
    for l in range(cfg["n_layers"]):
        p = lambda n: w[f"model.layers.{l}.{n}"]
        h = rmsnorm(x, p("input_layernorm.weight"), eps)
        q = (h @ p("self_attn.q_proj.weight").T).view(T, H, hd)
        k = (h @ p("self_attn.k_proj.weight").T).view(T, KV, hd)
        v = (h @ p("self_attn.v_proj.weight").T).view(T, KV, hd)
        if cfg["qk_norm"]:
            q, k = rmsnorm(q, p("self_attn.q_norm.weight"), eps), rmsnorm(k, p("self_attn.k_norm.weight"), eps)
        q, k = rope_rotate(q, cos[:, None], sin[:, None]), rope_rotate(k, cos[:, None], sin[:, None])
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        o = torch.einsum("hts,shd->thd", torch.softmax(scores, -1), v).reshape(T, H * hd)
        x = x + o @ p("self_attn.o_proj.weight").T
        h = rmsnorm(x, p("post_attention_layernorm.weight"), eps)
        pre = f"model.layers.{l}.mlp."
        sub = lambda q_: {k[len(q_):]: t for k, t in w.items() if k.startswith(q_)}
        if cfg["n_experts"]:
            probs = torch.softmax(h @ p("mlp.gate.weight").T, -1)
            topw, topi = torch.topk(probs, cfg["top_k"], dim=-1)
            if cfg["generation"] == 3 or cfg["top_k"] > 1:
                topw = topw / (topw.sum(-1, keepdim=True) + 1e-20)
            y = torch.zeros_like(x)
            for e in range(cfg["n_experts"]):
                wt = (topw * (topi == e)).sum(-1, keepdim=True)
                y = y + wt * swiglu(h, sub(f"{pre}experts.{e}."))
            for e in range(cfg["n_shared"]):
                y = y + swiglu(h, sub(f"{pre}shared_experts.{e}."))
        else:
            y = swiglu(h, sub(pre))
        x = x + y
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rmsnorm(x, w["model.norm.weight"], eps) @ head.T


def check_spec_vectors():
    """The spec's YaRN test vectors (head_dim 64, theta 1e6, MiniMind defaults)."""
    f = inv_freq({"head_dim": 64, "rope_theta": 1e6, "max_pos": 32768}, {"scaling": "yarn"})
    for i, want in ((1, 0.649381632), (5, 0.115478198), (14, 0.000148210857)):
        assert abs(f[i].item() - want) < 1e-6 * max(want, 1e-3), (i, f[i].item(), want)
    a = torch.tensor(2048.0) * f[0]
    assert abs(torch.cos(a).item() - 0.949734335) < 1e-5 and abs(torch.sin(a).item() + 0.313057013) < 1e-5


# ----------------------------------------------------------------------------------------------
# Random weights, as MiniMind's shapes; norm weights not all ones

def make_state(cfg, seed, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    d, hd, L = cfg["dim"], cfg["head_dim"], cfg["n_layers"]
    lin = lambda o, i: torch.randn(o, i, generator=g) / math.sqrt(i)
    norm = lambda n: torch.rand(n, generator=g) + 0.5
    sd = {"model.embed_tokens.weight": torch.randn(vocab, d, generator=g)}
    for l in range(L):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = norm(d)
        sd[p + "self_attn.q_proj.weight"] = lin(cfg["n_heads"] * hd, d)
        sd[p + "self_attn.k_proj.weight"] = lin(cfg["n_kv_heads"] * hd, d)
        sd[p + "self_attn.v_proj.weight"] = lin(cfg["n_kv_heads"] * hd, d)
        sd[p + "self_attn.o_proj.weight"] = lin(d, cfg["n_heads"] * hd)
        if cfg["qk_norm"]:
            sd[p + "self_attn.q_norm.weight"] = norm(hd)
            sd[p + "self_attn.k_norm.weight"] = norm(hd)
        sd[p + "post_attention_layernorm.weight"] = norm(d)
        ffns = [p + "mlp."]
        if cfg["n_experts"]:
            sd[p + "mlp.gate.weight"] = lin(cfg["n_experts"], d)
            ffns = [f"{p}mlp.experts.{e}." for e in range(cfg["n_experts"])] + \
                   [f"{p}mlp.shared_experts.{e}." for e in range(cfg["n_shared"])]
        for q in ffns:
            sd[q + "gate_proj.weight"] = lin(cfg["ffn"], d)
            sd[q + "up_proj.weight"] = lin(cfg["ffn"], d)
            sd[q + "down_proj.weight"] = lin(d, cfg["ffn"])
    sd["model.norm.weight"] = norm(d)
    # every weight exactly representable in fp16, so fp16 and fp32 checkpoints hold the same model
    return {k: v.half().float() for k, v in sd.items()}


BASE = dict(dim=64, n_layers=2, n_kv_heads=2, max_pos=32768, rope_theta=1e6, n_experts=0,
            n_shared=0, top_k=0)
M2_DENSE = dict(BASE, generation=2, qk_norm=False, n_heads=8, head_dim=8, ffn=192, rms_eps=1e-5)
M2_MOE = dict(M2_DENSE, n_experts=4, top_k=2, n_shared=1, ffn=64)
M3_DENSE = dict(BASE, generation=3, qk_norm=True, n_heads=4, head_dim=24, ffn=128, rms_eps=1e-6)
M3_UNTIED = dict(M3_DENSE, head_dim=16, ffn=96)
M3_MOE = dict(M3_UNTIED, n_experts=4, top_k=1, ffn=64)


def minimind_config(cfg):
    c = {"model_type": "minimind", "hidden_size": cfg["dim"], "num_hidden_layers": cfg["n_layers"],
         "num_attention_heads": cfg["n_heads"], "num_key_value_heads": cfg["n_kv_heads"],
         "vocab_size": VOCAB, "rms_norm_eps": cfg["rms_eps"], "rope_theta": cfg["rope_theta"],
         "max_position_embeddings": cfg["max_pos"], "intermediate_size": cfg["ffn"],
         "use_moe": bool(cfg["n_experts"]), "tie_word_embeddings": True,
         "inference_rope_scaling": False, "head_dim": cfg["head_dim"]}
    return c


# ----------------------------------------------------------------------------------------------
# Writers: the checkpoint forms people have

def save_safetensors(path, sd, dtype):
    names = sorted(sd)
    header, offset, blobs = {}, 0, []
    for n in names:
        t = sd[n].to(dtype).contiguous()
        raw = t.view(torch.int16).numpy().tobytes() if dtype != torch.float32 else t.numpy().tobytes()
        header[n] = {"dtype": {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[dtype],
                     "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_tokenizer(folder):
    """A tiny byte-level BPE tokenizer: 3 specials, the 256 byte symbols, and merges learned
    greedily from a fixed English sample (a project-owned stand-in for MiniMind's 6400)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_char = {b: chr(c) for b, c in zip(bs, cs)}
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[byte_char[b]] = len(vocab)
    sample = ("the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun "
              "and the birds sing their songs in the trees near the river bank ") * 4
    words = [[byte_char[b] for b in (" " + w if i else w).encode()] for i, w in enumerate(sample.split())]
    merges = []
    added = ["<think>", "</think>"]  # added tokens that are not special, as minimind-3 has
    while len(vocab) < VOCAB - len(added):
        counts = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append([a, b])
        if a + b not in vocab:  # two splits of one string can merge to the same token
            vocab[a + b] = len(vocab)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, s in enumerate(SPECIALS)] +
                           [{"id": VOCAB - len(added) + i, "content": s, "single_word": False,
                             "lstrip": False, "rstrip": False, "normalized": False, "special": False}
                            for i, s in enumerate(added)],
           "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                             "use_regex": True},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                       "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None,
                     "continuing_subword_prefix": None, "end_of_word_suffix": None,
                     "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     # like MiniMind's, the vocab lists the special and added tokens with their ids
                     "vocab": dict(vocab, **{s: VOCAB - len(added) + i for i, s in enumerate(added)}),
                     "merges": merges}}
    # MiniMind2's chat template, less its tool-calling branches
    template = ("{%- if messages[0]['role'] == 'system' -%}{{- '<|im_start|>system\\n' + "
                "messages[0]['content'] + '<|im_end|>\\n' }}{%- else -%}{{- '<|im_start|>system\\n"
                "You are a helpful assistant<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}"
                "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
                "message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\\n' + "
                "message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if "
                "add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "unk_token": "<|endoftext|>", "chat_template": template,
           "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False, indent=1)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)


def write_f32(path, t):
    with open(path, "wb") as f:
        f.write(t.float().contiguous().numpy().astype("<f4").tobytes())


# ----------------------------------------------------------------------------------------------

def main():
    torch.manual_seed(0)
    check_spec_vectors()
    # a clean folder, but for what the other generators write there (gen_text_fixtures.mjs's
    # text_expected.json, gen_gguf_fixtures.py's gguf/)
    keep = {"text_expected.json", "gguf"}
    os.makedirs(OUT, exist_ok=True)
    for name in set(os.listdir(OUT)) - keep:
        path = os.path.join(OUT, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    write_tokenizer(os.path.join(OUT, "tokenizer"))
    g = torch.Generator().manual_seed(7)
    ids = lambda n: [1] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist()
    cases = []

    def case(name, checkpoint, cfg, sd, n_ids, flags=(), rope=None, rows=None, export=(),
             dtypes=("f32",)):
        seq = ids(n_ids)
        ref = reference_logits(sd, cfg, seq, rope)
        rows = list(range(n_ids)) if rows is None else rows
        write_f32(os.path.join(OUT, name + ".logits.f32"), ref[rows])
        # the reference ppl of the whole sequence as one window, for ppl mode
        logp = torch.log_softmax(ref.double(), -1)
        nll = -logp[torch.arange(n_ids - 1), torch.tensor(seq[1:])].mean().item()
        cases.append({"name": name, "checkpoint": checkpoint, "export_args": list(export),
                      "flags": list(flags), "ids": seq, "rows": rows, "vocab": VOCAB,
                      "logits": name + ".logits.f32", "ppl": math.exp(nll), "dtypes": list(dtypes)})

    # MiniMind2 dense: fp16 .pth as MiniMind's trainer writes it (two equal copies of the
    # tied embedding), the same weights as an fp32 .pth with one shared storage, and a LoRA file
    sd = make_state(M2_DENSE, 1)
    trainer = {k: v.half() for k, v in sd.items()}
    trainer["lm_head.weight"] = trainer["model.embed_tokens.weight"].clone()
    torch.save(trainer, os.path.join(OUT, "m2_dense.pth"))
    shared = dict(sd)
    shared["lm_head.weight"] = shared["model.embed_tokens.weight"]
    torch.save(shared, os.path.join(OUT, "m2_dense_fp32.pth"))
    case("m2_dense", "m2_dense.pth", M2_DENSE, sd, 24, dtypes=("f32", "f16", "bf16", "q8_0"))
    case("m2_dense_fp32", "m2_dense_fp32.pth", M2_DENSE, sd, 24)
    case("m2_dense_rope_base", "m2_dense.pth", M2_DENSE, sd, 2100, flags=("--rope-base", "10000"),
         rope={"theta": 10000.0}, rows=[0, 1, 1000, 2047, 2048, 2049, 2099])
    lg = torch.Generator().manual_seed(11)
    lora, merged = {}, dict(sd)
    for l in range(M2_DENSE["n_layers"]):
        for proj in ("q_proj", "o_proj"):  # MiniMind's LoRA covers the square linear layers
            m = f"model.layers.{l}.self_attn.{proj}"
            A = (torch.randn(4, 64, generator=lg) * 0.05).half()
            B = (torch.randn(64, 4, generator=lg) * 0.05).half()
            lora[m + ".lora.A.weight"], lora[m + ".lora.B.weight"] = A, B
            merged[m + ".weight"] = sd[m + ".weight"] + B.float() @ A.float()
    torch.save(lora, os.path.join(OUT, "m2_lora.pth"))
    case("m2_dense_lora", "m2_dense.pth", M2_DENSE, merged, 24, export=("--lora", "m2_lora.pth"))

    # MiniMind2 MoE: a *_resume.pth training checkpoint (state dict under "model", DDP prefix)
    sd = make_state(M2_MOE, 2)
    resume = {"model": {"module." + k: v.half() for k, v in sd.items()},
              "optimizer": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}},
                            "param_groups": [{"lr": 1e-4, "params": [0]}]},
              "epoch": 1, "step": 100, "world_size": 1, "wandb_id": None}
    torch.save(resume, os.path.join(OUT, "m2_moe_resume.pth"))
    case("m2_moe", "m2_moe_resume.pth", M2_MOE, sd, 40, dtypes=("f32", "q8_0"))

    # minimind-3 dense: a transformers folder (config.json + fp16 safetensors without lm_head),
    # head_dim 24 from config.json (not hidden / heads); and YaRN past 2048 on the same weights
    sd = make_state(M3_DENSE, 3)
    folder = os.path.join(OUT, "m3_dense")
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(minimind_config(M3_DENSE), f, indent=1)
    save_safetensors(os.path.join(folder, "model.safetensors"), sd, torch.float16)
    case("m3_dense", "m3_dense", M3_DENSE, sd, 24, dtypes=("f32", "f16", "bf16", "q8_0"))
    # the same model as a folder that does carry the tied lm_head, and as pytorch_model.bin
    for name, writer in (("m3_dense_lm_head", lambda p, d: save_safetensors(
            os.path.join(p, "model.safetensors"), d, torch.float16)),
            ("m3_dense_bin", lambda p, d: torch.save({k: v.half() for k, v in d.items()},
                                                     os.path.join(p, "pytorch_model.bin")))):
        os.makedirs(os.path.join(OUT, name))
        shutil.copy(os.path.join(folder, "config.json"), os.path.join(OUT, name))
        writer(os.path.join(OUT, name), dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"]}))
        case(name, name, M3_DENSE, sd, 24)
    case("m3_dense_yarn", "m3_dense", M3_DENSE, sd, 2100, flags=("--rope-scaling", "yarn"),
         rope={"scaling": "yarn"}, rows=[0, 1, 2, 1500, 2047, 2048, 2049, 2098, 2099])
    case("m3_dense_yarn_flags", "m3_dense", M3_DENSE, sd, 300,
         flags=("--rope-scaling", "yarn", "--rope-scale", "4", "--yarn-orig-ctx", "128",
                "--yarn-beta-fast", "16", "--yarn-beta-slow", "2", "--yarn-attn-factor", "1.1"),
         rope={"scaling": "yarn", "factor": 4.0, "orig_ctx": 128, "beta_fast": 16.0,
               "beta_slow": 2.0, "attn_factor": 1.1}, rows=[0, 127, 128, 200, 299])

    # minimind-3 with an untied output head: a single bf16 .safetensors file, no config.json
    sd = make_state(M3_UNTIED, 4)
    sd["lm_head.weight"] = torch.randn(VOCAB, 64, generator=g).half().float()
    sd = {k: v.bfloat16().float() for k, v in sd.items()}
    save_safetensors(os.path.join(OUT, "m3_untied.safetensors"), sd, torch.bfloat16)
    case("m3_untied", "m3_untied.safetensors", M3_UNTIED, sd, 24)
    case("m3_untied_linear", "m3_untied.safetensors", M3_UNTIED, sd, 300,
         flags=("--rope-scaling", "linear", "--rope-scale", "4"),
         rope={"scaling": "linear", "factor": 4.0}, rows=[0, 100, 299])

    # minimind-3 MoE: fp32 .pth saved from a torch.compile'd model (_orig_mod. prefix)
    sd = make_state(M3_MOE, 5)
    torch.save({"_orig_mod." + k: v for k, v in sd.items()}, os.path.join(OUT, "m3_moe.pth"))
    case("m3_moe", "m3_moe.pth", M3_MOE, sd, 40, dtypes=("f32", "f16", "q8_0"))

    # NTK-aware and dynamic NTK scaling past 2048 on the dense models' weights (last, so that the
    # ids of every case before them stay as they were)
    case("m3_dense_ntk", "m3_dense", M3_DENSE, make_state(M3_DENSE, 3), 2100,
         flags=("--rope-scaling", "ntk", "--rope-scale", "4"), rope={"scaling": "ntk", "factor": 4.0},
         rows=[0, 1, 1000, 2047, 2048, 2049, 2099])
    case("m2_dense_dynamic", "m2_dense.pth", M2_DENSE, make_state(M2_DENSE, 1), 2100,
         flags=("--rope-scaling", "dynamic", "--rope-scale", "4", "--yarn-orig-ctx", "512", "-c", "2100"),
         rope={"scaling": "dynamic", "factor": 4.0, "orig_ctx": 512, "window": 2100},
         rows=[0, 1, 511, 512, 1000, 2047, 2048, 2099])
    case("m3_dense_no_rope", "m3_dense", M3_DENSE, make_state(M3_DENSE, 3), 24, flags=("--no-rope",),
         rope={"off": True})

    # a minimal model with MiniMind's vocab of 6400, to carry the real tokenizers into a model
    # file for the tokenizer tests (its weights do not matter)
    tiny = dict(M2_DENSE, dim=16, n_layers=1, head_dim=2, ffn=64)
    torch.save({k: v.half() for k, v in make_state(tiny, 6, vocab=6400).items()},
               os.path.join(OUT, "vocab6400.pth"))

    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"generator": "tests/gen_fixtures.py", "torch": torch.__version__,
                   "cases": cases}, f, indent=1)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
