#!/usr/bin/env python3
"""Side by side: the speed of ./run and of llama.cpp (or of another build of ./run) on the same
random-weight MiniMind models.

    /usr/bin/python3 tests/sidebyside.py --llama PATH_TO_LLAMA_CPP [--shapes m2small,m3,m2]
        [--dtypes f32,q8_0] [--threads 1,2] [--rounds 5] [--run ./run] [--md FILE]
        [--run-args "--kv f16"] [--llama-args "-fa off"] [--wall]
    /usr/bin/python3 tests/sidebyside.py --versus OTHER_RUN [--shapes m2small,m3,m2]
        [--dtypes f32,q8_0] [--threads 1,2] [--rounds 5] [--run ./run] [--md FILE]
        [--run-args "--kv f16"]

Exactly one of --llama and --versus is given. With --llama, ./run is compared with llama.cpp (below).

For each shape of tests/bench.py (m2small and m2 are minimind2, Llama architecture; m3 is
minimind-3, Qwen3 architecture with q/k norms) this takes the random fp16 checkpoint that
`make bench` writes in tests/bench-models/ (it writes it, and our .bin files, itself when they are
missing) and writes the same weights as a GGUF file beside it, with llama.cpp's own gguf-py
(imported at run time from PATH/gguf-py): f32, f16 or bf16 tensors as the dtype asks (norms stay
f32), arch llama with the q/k row permutation llama.cpp's HF converter applies (its rope pairs
rows i, i+1 of a head where the checkpoint pairs i, i+head_dim/2), or arch qwen3 (no permutation:
neox rope), the hyperparameters read from our exported .bin (so both engines run the same model),
and the fixture tokenizer (tests/fixtures/tokenizer) as a gpt2-style BPE vocabulary padded to the
model's 6400 tokens. q8_0 is PATH/build/bin/llama-quantize of the f16 GGUF. GGUFs are cached in
tests/bench-models/ (git-ignored) and written again when older than the checkpoint; each new one
is loaded once by llama-bench before anything is timed. Only speed is compared, not logits.

Then for each shape x dtype x threads, --rounds times, alternately:
    ./run MODEL.bin -m bench -n 128 -c 4224 --threads T
    llama-bench -m MODEL.gguf -r 1 -t T -p 512 -n 128 -o csv
    llama-bench -m MODEL.gguf -r 1 -t T -p 0 -n 128 -d 2048 -o csv   (if llama-bench has -d)
and the table gives the medians over the rounds, ours and llama.cpp's tokens/s and their ratio,
for prefill pp512 (a 512-token prompt), decode tg128 (128 tokens; ours after a 16-token prompt,
llama.cpp's from an empty context) and decode @2048 (128 tokens after 2048 tokens of context).
The runs alternate one by one, ours then llama.cpp's, because this machine's speed moves by a
third within minutes: runs of one engine in a spell and of the other in the next would measure
the spells. Each engine runs as it runs by default (ours: f32 KV cache; llama-bench: f16 KV cache,
flash attention auto, its warm-up run); --run-args and --llama-args add flags to either.

llama.cpp is built outside this repository, CPU only (the commands this was written against):

    cd PATH_TO_LLAMA_CPP
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
          -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_UI=OFF \\
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    nice -n 19 cmake --build build -j2 --target llama-bench llama-quantize

(LLAMA_CURL is only a deprecation warning in recent llama.cpp; the other OFFs keep its configure
step from downloading anything.) Needs numpy (Debian: apt-get install python3-numpy) for gguf-py.

With --wall, decoding alone, against the memory wall: for each shape x dtype x threads, --rounds
rounds, each engine once a round (ours first, then the other first, in turn), every run between two
of `tests/stream MODEL.bin T` (its fastest pass over our model file: how fast this machine reads
memory at that moment; and its sustained read over half a second or more):
    ./run MODEL.bin -m bench -n 128 -c 600 --threads T      (no deep decoding at -c 600)
    llama-bench -m MODEL.gguf -r 1 -t T -p 0 -n 128          (or OTHER_RUN as ./run, with --versus)
and the table gives each engine's median decode tokens/s, the median ratio, and each one's median
share of the wall: its model file's bytes x tokens/s (one token reads every weight once) over the
mean of the walls either side of the run; and the same share of the sustained reads. tests/bench.py --wall (make bench-wall) does the same
for ./run alone, at each width it can read weight rows in.

With --versus OTHER_RUN (another build of ./run, say of an older commit: before/after a change, to
see that nothing got slower) no llama.cpp and no GGUF is needed: for each shape x dtype x threads,
--rounds times, alternately (ours, then the other),
    ./run MODEL.bin -m bench -n 128 -c 4224 --threads T
    OTHER_RUN MODEL.bin -m bench -n 128 -c 4224 --threads T
on the same .bin files (tests/bench.py's, in tests/bench-models/: in this checkout's format, which
the other build must read), and the table gives the medians, ours, the other's and their ratio, for
prefill pp512, decode tg128 (after a 16-token prompt, both), decode @2048 and decode @4096 (128
tokens after 2048 and 4096 tokens of context; "-" where a build does not print it). --run-args
goes to both binaries. Both are copied to a temporary directory at the start, and the copies run:
a rebuild of either meanwhile changes nothing in the table.
"""
import argparse
import csv
import datetime
import io
import json
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import bench  # noqa: E402  (tests/bench.py: the shapes, the checkpoints, our model files)

TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
LLAMA_ARCH = {"m2small": "llama", "m2": "llama", "m3": "qwen3"}
PROMPT, GEN, DEPTH, CTX = 512, 128, 2048, 4224
WALL_CTX = 600  # --wall: -m bench times no deep decoding below a context of DEPTH + GEN
STREAM = os.path.join(ROOT, "tests", "stream")


def die(msg):
    print(f"sidebyside: {msg}", file=sys.stderr)
    sys.exit(1)


# ----------------------------------------------------------------------------------------------
# Inputs: the checkpoint's tensors, our .bin's hyperparameters, the tokenizer

def read_safetensors(path, np):
    """{name: numpy array} of a safetensors file (F16/F32/BF16 only), arrays backed by one read"""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        lo, hi = t["data_offsets"]
        if t["dtype"] == "F16":
            a = np.frombuffer(data, dtype="<f2", count=(hi - lo) // 2, offset=lo)
        elif t["dtype"] == "F32":
            a = np.frombuffer(data, dtype="<f4", count=(hi - lo) // 4, offset=lo)
        elif t["dtype"] == "BF16":
            a = np.frombuffer(data, dtype="<u2", count=(hi - lo) // 2, offset=lo)
            a = (a.astype(np.uint32) << 16).view(np.float32)
        else:
            die(f"{path}: tensor {name} is {t['dtype']}, not F16/F32/BF16")
        out[name] = a.reshape(t["shape"])
    return out


def bin_config(path):
    """the hyperparameters at the head of our exported model file (mm_header of model.h, version 2:
    magic, version, header_size, generation, flags, dim, n_layers, n_heads, n_kv_heads, head_dim,
    hidden_dim, vocab_size, max_seq_len as uint32, then rms_eps, rope_theta as float)"""
    with open(path, "rb") as f:
        v = struct.unpack("<13I2f", f.read(60))
    if v[0] != 0x444E4D4D:
        die(f"{path}: not a minimind.c model file")
    keys = ["magic", "version", "header_size", "generation", "flags", "dim", "n_layers", "n_heads",
            "n_kv_heads", "head_dim", "hidden_dim", "vocab_size", "max_seq_len", "rms_eps", "rope_theta"]
    return dict(zip(keys, v))


def tokenizer_vocab(vocab_size, gguf):
    """tokens, token types, merges, bos/eos/pad ids, chat template of the fixture tokenizer, as
    llama.cpp's converter writes a gpt2-style BPE vocabulary: ids the tokenizer lacks are [PADi]"""
    with open(os.path.join(TOKENIZER, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    with open(os.path.join(TOKENIZER, "tokenizer_config.json"), encoding="utf-8") as f:
        tc = json.load(f)
    if tj["model"]["type"] != "BPE":
        die("tokenizer.json: not a BPE tokenizer")
    by_id = {i: s for s, i in tj["model"]["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    ids = {s: i for i, s in enumerate(tokens)}

    def token_id(key):
        v = tc.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return ids.get(v)
    return dict(tokens=tokens, types=types, merges=merges, bos=token_id("bos_token"),
                eos=token_id("eos_token"), pad=token_id("pad_token"), template=tc.get("chat_template"))


# ----------------------------------------------------------------------------------------------
# The GGUF files

def permute(w, n_head):
    """llama.cpp's q/k row order for arch llama: within each head, rows (i, i + hd/2) -> (2i, 2i+1)"""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, shape_name, dtype, ckpt, binfile, np, gguf):
    cfg = bin_config(binfile)
    shape = bench.SHAPES[shape_name]
    if (cfg["dim"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]) != \
            (shape["dim"], shape["layers"], shape["heads"], shape["kv_heads"], shape["head_dim"]):
        die(f"{binfile}: its shape is not {shape_name}'s: run make bench again")
    arch = LLAMA_ARCH[shape_name]
    st = read_safetensors(ckpt, np)
    w = gguf.GGUFWriter(path + ".tmp", arch)
    w.add_name(f"{bench.SHAPES[shape_name]['label']} random ({dtype})")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_seq_len"])
    w.add_embedding_length(cfg["dim"])
    w.add_block_count(cfg["n_layers"])
    w.add_feed_forward_length(shape["ffn"])
    w.add_head_count(cfg["n_heads"])
    w.add_head_count_kv(cfg["n_kv_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_eps"]))
    if arch == "llama":
        w.add_rope_dimension_count(cfg["head_dim"])
    v = tokenizer_vocab(cfg["vocab_size"], gguf)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    w.add_token_merges(v["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if v[key] is not None:
            add(v[key])
    w.add_add_bos_token(False)
    if v["template"]:
        w.add_chat_template(v["template"])

    def weight(name, a):
        a = np.ascontiguousarray(a)
        if a.ndim == 1 or dtype == "f32":  # norms stay f32, as llama.cpp's converter keeps them
            w.add_tensor(name, a.astype(np.float32))
        elif dtype == "f16":
            w.add_tensor(name, a.astype(np.float16))
        else:  # bf16: round to nearest even, as gguf-py does
            w.add_tensor(name, gguf.quants.quantize(a.astype(np.float32), gguf.GGMLQuantizationType.BF16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)

    weight("token_embd.weight", st["model.embed_tokens.weight"])
    if "lm_head.weight" in st:
        weight("output.weight", st["lm_head.weight"])
    weight("output_norm.weight", st["model.norm.weight"])
    for l in range(cfg["n_layers"]):
        p, b = f"model.layers.{l}.", f"blk.{l}."
        q, k = st[p + "self_attn.q_proj.weight"], st[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = permute(q, cfg["n_heads"]), permute(k, cfg["n_kv_heads"])
        weight(b + "attn_norm.weight", st[p + "input_layernorm.weight"])
        weight(b + "attn_q.weight", q)
        weight(b + "attn_k.weight", k)
        weight(b + "attn_v.weight", st[p + "self_attn.v_proj.weight"])
        weight(b + "attn_output.weight", st[p + "self_attn.o_proj.weight"])
        if arch == "qwen3":
            weight(b + "attn_q_norm.weight", st[p + "self_attn.q_norm.weight"])
            weight(b + "attn_k_norm.weight", st[p + "self_attn.k_norm.weight"])
        weight(b + "ffn_norm.weight", st[p + "post_attention_layernorm.weight"])
        weight(b + "ffn_gate.weight", st[p + "mlp.gate_proj.weight"])
        weight(b + "ffn_up.weight", st[p + "mlp.up_proj.weight"])
        weight(b + "ffn_down.weight", st[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(path + ".tmp", path)


def stale(out, src):
    return not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src)


def gguf_file(shape_name, dtype, binfile, tools, np, gguf):
    """the GGUF of shape x dtype in tests/bench-models/, written (and checked) when missing or stale"""
    ckpt = os.path.join(bench.MODELS, f"{shape_name}.safetensors")
    src_dtype = "f16" if dtype == "q8_0" else dtype
    src = os.path.join(bench.MODELS, f"{shape_name}.{src_dtype}.gguf")
    made = False
    if stale(src, ckpt):
        print(f"sidebyside: writing {os.path.relpath(src, ROOT)}", file=sys.stderr)
        write_gguf(src, shape_name, src_dtype, ckpt, binfile, np, gguf)
        made = True
    out = src
    if dtype == "q8_0":
        out = os.path.join(bench.MODELS, f"{shape_name}.q8_0.gguf")
        if stale(out, src):
            print(f"sidebyside: llama-quantize {os.path.relpath(out, ROOT)} Q8_0", file=sys.stderr)
            p = subprocess.run([tools["llama-quantize"], src, out + ".tmp", "Q8_0"], capture_output=True, text=True)
            if p.returncode != 0:
                die(f"llama-quantize {src} failed: {last_lines(p.stderr)}")
            os.replace(out + ".tmp", out)
            made = True
    if made:  # it must load: a short llama-bench run
        p = subprocess.run([tools["llama-bench"], "-m", out, "-r", "1", "-t", "1", "-p", "8", "-n", "4",
                            "--no-warmup", "-o", "csv"], capture_output=True, text=True)
        if p.returncode != 0 or not parse_llama_csv(p.stdout):
            os.remove(out)
            die(f"llama-bench cannot load {out}: {last_lines(p.stderr)}")
    return out


# ----------------------------------------------------------------------------------------------
# The runs

def last_lines(text, n=3):
    return " | ".join(text.strip().splitlines()[-n:]) or "(no output)"


def run_cmd(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        die(f"cannot run {cmd[0]}: {e.strerror}")


def run_ours(binary, model, threads, extra, ctx=CTX):
    cmd = [binary, model, "-m", "bench", "-n", str(GEN), "-c", str(ctx), "--threads", str(threads)] + extra
    p = run_cmd(cmd)
    if p.returncode != 0:
        die(f"{shlex.join(cmd)} failed: {last_lines(p.stderr)}")
    header, row = p.stdout.strip().splitlines()[-2:]
    r = {k: float(v) if v else float("nan") for k, v in zip(header.split(","), row.split(","))}
    return {"pp": r["prefill_tps"], "tg": r["decode_tps"], "tg_d": r.get("decode_tps_2048", float("nan")),
            "tg_d4": r.get("decode_tps_4096", float("nan"))}


def parse_llama_csv(text):
    rows = list(csv.DictReader(io.StringIO(text)))
    return [r for r in rows if r.get("avg_ts")]


def run_llama(tools, model, threads, extra, depth, prompt=PROMPT):
    base = [tools["llama-bench"], "-m", model, "-r", "1", "-t", str(threads), "-o", "csv"]
    out = {}
    cmds = [base + ["-p", str(prompt), "-n", str(GEN)] + extra]
    if depth:
        cmds.append(base + ["-p", "0", "-n", str(GEN), "-d", str(DEPTH)] + extra)
    for cmd in cmds:
        p = run_cmd(cmd)
        rows = parse_llama_csv(p.stdout) if p.returncode == 0 else []
        if not rows:
            die(f"{shlex.join(cmd)} failed: {last_lines(p.stderr)}")
        for r in rows:
            n_p, n_g, d = int(r["n_prompt"]), int(r["n_gen"]), int(r.get("n_depth") or 0)
            key = "pp" if n_p and not n_g else "tg" if n_g and not n_p and not d else "tg_d" if n_g and d else None
            if key:
                out[key] = float(r["avg_ts"])
                out["build"] = r.get("build_commit", "")
    return out


# ----------------------------------------------------------------------------------------------

def git_commit(path):
    try:
        p = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if p.returncode != 0 or not p.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return p.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def fmt(x, digits):
    return "-" if x != x else f"{x:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama", help="a llama.cpp checkout with a cmake build in PATH/build")
    ap.add_argument("--versus", metavar="OTHER_RUN",
                    help="another build of ./run to compare ours with, instead of llama.cpp")
    ap.add_argument("--shapes", default="m2small,m3,m2")
    ap.add_argument("--dtypes", default="f32,q8_0", help="of f32, f16, bf16, q8_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5, help="alternated runs of each engine per cell; medians")
    ap.add_argument("--run", default=os.path.join(ROOT, "run"), help="our binary (default ./run)")
    ap.add_argument("--md", help="also write the output to this Markdown file")
    ap.add_argument("--run-args", default="",
                    help="more flags for ./run (and OTHER_RUN with --versus), one string: --run-args='--kv f16'")
    ap.add_argument("--llama-args", default="", help="more flags for llama-bench, one string: --llama-args='-fa off'")
    ap.add_argument("--wall", action="store_true",
                    help="decoding only, each run between two of tests/stream's: each engine's share of the "
                         "memory wall (see above)")
    a = ap.parse_args()

    if (a.llama is None) == (a.versus is None):
        die("give exactly one of --llama PATH_TO_LLAMA_CPP and --versus OTHER_RUN")
    versus = a.versus is not None
    if versus and a.llama_args:
        die("--llama-args goes with --llama, not --versus")
    shapes, dtypes = a.shapes.split(","), a.dtypes.split(",")
    for s in shapes:
        if s not in bench.SHAPES:
            die(f"unknown shape {s!r} (of {', '.join(bench.SHAPES)})")
    for d in dtypes:
        if d not in ("f32", "f16", "bf16", "q8_0"):
            die(f"unknown dtype {d!r} (of f32, f16, bf16, q8_0)")
    try:
        threads = [int(t) for t in a.threads.split(",")]
    except ValueError:
        die(f"--threads {a.threads!r}: not a list of numbers")
    if a.rounds < 1:
        die("--rounds must be at least 1")
    other = other_copy = None
    if versus:
        other = os.path.abspath(a.versus)
        if not os.path.isfile(other) or not os.access(other, os.X_OK):
            die(f"--versus {a.versus}: no such executable file")
        llama = tools = np = gguf = None
        has_depth = True
    else:
        llama = os.path.abspath(a.llama)
        if not os.path.isdir(llama):
            die(f"--llama {a.llama}: no such directory")
        tools = {t: os.path.join(llama, "build", "bin", t) for t in ("llama-bench", "llama-quantize")}
        for t, path in tools.items():
            if not os.access(path, os.X_OK) and (t == "llama-bench" or "q8_0" in dtypes):
                die(f"no {path}: build it (cmake --build build --target llama-bench llama-quantize in {llama})")
        if not os.path.isdir(os.path.join(llama, "gguf-py", "gguf")):
            die(f"no {os.path.join(llama, 'gguf-py', 'gguf')}: --llama must be a llama.cpp source checkout")
        try:
            import numpy as np
        except ImportError:
            die("no numpy for this python (Debian: apt-get install python3-numpy; run /usr/bin/python3)")
        sys.path.insert(0, os.path.join(llama, "gguf-py"))
        try:
            import gguf
        except Exception as e:  # noqa: BLE001  (whatever its import raises)
            die(f"cannot import gguf-py from {llama}/gguf-py: {e}")
    binary = os.path.abspath(a.run)
    if not os.access(binary, os.X_OK):
        die(f"no {a.run}: build it with make")
    if a.wall and not os.access(STREAM, os.X_OK):
        die("no tests/stream: build it with make tests/stream")
    if not versus:
        helptext = subprocess.run([tools["llama-bench"], "--help"], capture_output=True, text=True)
        has_depth = "--n-depth" in helptext.stdout + helptext.stderr
    run_extra, llama_extra = shlex.split(a.run_args), shlex.split(a.llama_args)

    # copies of ./run (and of OTHER_RUN), taken now, run every round: a rebuild of either meanwhile
    # (make replaces the file) neither stops the comparison nor mixes two builds in one table
    tmpdir = tempfile.mkdtemp(prefix="sidebyside-")
    try:
        copies = [(binary, a.run, "run")] + ([(other, a.versus, "other")] if versus else [])
        for src, name, dst in copies:
            try:
                shutil.copy2(src, os.path.join(tmpdir, dst))
            except OSError as e:
                die(f"cannot copy {name}: {e.strerror}")
        binary = os.path.join(tmpdir, "run")
        if versus:
            other_copy = os.path.join(tmpdir, "other")
        compare(a, versus, shapes, dtypes, threads, binary, other_copy, other, llama, tools, np, gguf, has_depth,
                run_extra, llama_extra)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def compare(a, versus, shapes, dtypes, threads, binary, other_copy, other, llama, tools, np, gguf, has_depth,
            run_extra, llama_extra):
    """write the models, then time each shape x dtype x threads and print (and --md) the table; binary and
    other_copy are the copies that run, other the --versus path that the header names"""
    # the models first (writing them takes a while): ours through tests/bench.py, then the GGUFs
    models = {}
    for s in shapes:
        for d in dtypes:
            b = bench.model_file(s, d)
            models[s, d] = (b, None if versus else gguf_file(s, d, b, tools, np, gguf))

    if a.wall:
        return compare_wall(a, versus, shapes, dtypes, threads, binary, other_copy, other, llama, tools, models,
                            run_extra, llama_extra)
    ours_cmd = f"run MODEL.bin -m bench -n {GEN} -c {CTX} --threads T{' ' + a.run_args if a.run_args else ''}"
    if versus:
        them = "other"
        head = [f"# ./run vs {other}, side by side",
                "",
                f"- command: `{shlex.join([sys.executable] + sys.argv)}`",
                f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
                f"- processor: {bench.cpu_name()}",
                f"- minimind.c commit: {git_commit(ROOT)}",
                f"- other: {other}",
                f"- ours and other: `{ours_cmd}`",
                f"- medians of {a.rounds} alternated run(s) each; tok/s; ratio = ours / other "
                f"(above 1: ours is faster); tg128 is after a 16-token prompt, both",
                ""]
    else:
        them = "llama.cpp"
        head = ["# ./run vs llama.cpp, side by side",
                "",
                f"- command: `{shlex.join([sys.executable] + sys.argv)}`",
                f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
                f"- processor: {bench.cpu_name()}",
                f"- minimind.c commit: {git_commit(ROOT)}",
                f"- llama.cpp commit: {git_commit(llama)} ({llama})",
                f"- ours: `{ours_cmd}`; "
                f"llama.cpp: `llama-bench -m MODEL.gguf -r 1 -t T -p {PROMPT} -n {GEN}"
                f"{' ' + a.llama_args if a.llama_args else ''}`"
                + (f" and `-p 0 -n {GEN} -d {DEPTH}`" if has_depth else " (this llama-bench has no -d: no @2048)"),
                f"- medians of {a.rounds} alternated run(s) each; tok/s; ratio = ours / llama.cpp "
                f"(above 1: ours is faster); tg128 is ours after a 16-token prompt, llama.cpp's from an empty context",
                ""]
    cols = [("pp", "prefill pp512", 0), ("tg", "decode tg128", 1)]
    if has_depth:
        cols.append(("tg_d", f"decode @{DEPTH}", 1))
    if versus:
        cols.append(("tg_d4", "decode @4096", 1))
    table = ["| shape | dtype | threads | "
             + " | ".join(f"{t} ours | {t} {them} | {t} ratio" for _, t, _ in cols) + " |",
             "|---|---|---|" + "---|---|---|" * len(cols)]
    print("\n".join(head + table), flush=True)
    for s in shapes:
        for d in dtypes:
            for t in threads:
                if versus:
                    def theirs_run():
                        return run_ours(other_copy, models[s, d][0], t, run_extra)
                else:
                    def theirs_run():
                        return run_llama(tools, models[s, d][1], t, llama_extra, has_depth)
                ours, theirs = cell(s, d, t, a.rounds, lambda: run_ours(binary, models[s, d][0], t, run_extra),
                                    theirs_run, them)
                cells = []
                for key, _, digits in cols:
                    mo = statistics.median(r.get(key, float("nan")) for r in ours)
                    ml = statistics.median(r.get(key, float("nan")) for r in theirs)
                    ratio = mo / ml if ml == ml and ml else float("nan")
                    cells += [fmt(mo, digits), fmt(ml, digits), fmt(ratio, 2)]
                line = f"| {bench.SHAPES[s]['label']} | {d} | {t} | " + " | ".join(cells) + " |"
                table.append(line)
                print(line, flush=True)
    if a.md:
        with open(a.md, "w") as f:
            f.write("\n".join(head + table) + "\n")


def compare_wall(a, versus, shapes, dtypes, threads, binary, other_copy, other, llama, tools, models, run_extra,
                 llama_extra):
    """--wall: decoding only, every run between two of tests/stream's; each engine's share of the wall"""
    them = "other" if versus else "llama.cpp"
    ours_cmd = f"run MODEL.bin -m bench -n {GEN} -c {WALL_CTX} --threads T{' ' + a.run_args if a.run_args else ''}"
    theirs_cmd = ours_cmd.replace("run ", "OTHER_RUN ", 1) if versus else \
        f"llama-bench -m MODEL.gguf -r 1 -t T -p 0 -n {GEN}{' ' + a.llama_args if a.llama_args else ''}"
    head = [f"# ./run vs {other if versus else 'llama.cpp'}: decoding against the memory wall, side by side",
            "",
            f"- command: `{shlex.join([sys.executable] + sys.argv)}`",
            f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- processor: {bench.cpu_name()}",
            f"- minimind.c commit: {git_commit(ROOT)}",
            f"- {them}: {other if versus else git_commit(llama) + ' (' + llama + ')'}",
            f"- ours: `{ours_cmd}`; {them}: `{theirs_cmd}`; the wall: `tests/stream MODEL.bin T` (its fastest "
            f"pass; and its sustained read, all its passes over half a second or more) before and after every run",
            f"- medians of {a.rounds} rounds (ours first, then {them} first, in turn); tok/s; ratio = ours / {them} "
            f"(the median of the rounds' ratios); "
            f"share = the run's reads (its model file's bytes x tokens/s) over the mean of the walls either side",
            ""]
    table = [f"| shape | dtype | threads | decode tg128 ours | decode tg128 {them} | ratio | share of wall: ours "
             f"| share of wall: {them} | share of sustained read: ours | share of sustained read: {them} "
             f"| wall GB/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(head + table), flush=True)
    for s in shapes:
        for d in dtypes:
            ours_file, theirs_file = models[s, d][0], models[s, d][1] or models[s, d][0]
            for t in threads:
                def theirs_run():
                    if versus:
                        return run_ours(other_copy, ours_file, t, run_extra, WALL_CTX)["tg"]
                    return run_llama(tools, theirs_file, t, llama_extra, False, prompt=0)["tg"]
                engines = [("ours", lambda: run_ours(binary, ours_file, t, run_extra, WALL_CTX)["tg"],
                            os.path.getsize(ours_file)),
                           ("theirs", theirs_run, os.path.getsize(theirs_file))]
                runs, walls = bench.wall_cell(engines, ours_file, t, a.rounds, lambda r: print(
                    f"sidebyside: {s} {d} {t} thread(s): round {r + 1} of {a.rounds}", file=sys.stderr, flush=True))
                med = {w: [statistics.median(x[i] for x in v) for i in (0, 1, 2)] for w, v in runs.items()}
                ratio = statistics.median(o[0] / h[0] for o, h in zip(runs["ours"], runs["theirs"]))
                line = (f"| {bench.SHAPES[s]['label']} | {d} | {t} | {med['ours'][0]:.1f} | {med['theirs'][0]:.1f} | "
                        f"{ratio:.2f} | {med['ours'][1]:.2f} | {med['theirs'][1]:.2f} | "
                        f"{med['ours'][2]:.2f} | {med['theirs'][2]:.2f} | "
                        f"{statistics.median(walls):.1f} |")
                table.append(line)
                print(line, flush=True)
    if a.md:
        with open(a.md, "w") as f:
            f.write("\n".join(head + table) + "\n")


def cell(shape, dtype, threads, rounds, ours_run, theirs_run, them):
    """rounds runs of each engine on one shape x dtype x threads, alternated: ours, then theirs"""
    ours, theirs = [], []
    for _ in range(rounds):
        t0 = time.time()
        ours.append(ours_run())
        t1 = time.time()
        theirs.append(theirs_run())
        print(f"sidebyside: {shape} {dtype} {threads} thread(s): ours {t1 - t0:.1f} s, {them} "
              f"{time.time() - t1:.1f} s", file=sys.stderr, flush=True)
    return ours, theirs


if __name__ == "__main__":
    main()
