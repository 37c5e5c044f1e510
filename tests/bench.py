#!/usr/bin/env python3
"""make bench: speed and memory of ./run on random-weight models of the MiniMind shapes.

    python3 tests/bench.py [--runs 3] [--shapes m2small,m3,m2] [--dtypes f32,f16,bf16,q8_0]
                           [--threads 1,2] [--md FILE]
    python3 tests/bench.py --wall [--runs 7] [--shapes m3,m2] [--dtypes f32,f16,bf16] [--threads 1,2]
    python3 tests/bench.py --busy [--runs 5] [--busy-models demo,m2small.q8_0] [--md FILE]

Python standard library only: no torch, no downloads. Each shape's checkpoint is written as a
safetensors file of random fp16 weights (seeded, so every run benchmarks the same numbers) and
goes through the real export path (export.py) once per dtype; the model files are kept in
tests/bench-models/ for the next run. For every shape x dtype x threads, `./run -m bench` runs
--runs times and the table gives the medians of:

  prefill     tokens/s over a 512-token prompt (logits of the last token only, as generate)
  ttft        time to first token of that prompt: prefill + sampling, in ms
  decode      tokens/s of 128 tokens after a 16-token prompt
  @2048/@4096 tokens/s of 128 tokens decoded after 2048 / 4096 tokens of context
  rss         peak resident memory of the process, MB (weights + KV cache + buffers)
  reads       what decoding reads, the model file's bytes once per token (x decode tokens/s), in
              GB/s and as a share of what tests/stream reads of the same file mapped the same
              way with the same threads in its fastest pass: the memory ceiling of decoding on
              this machine (the wall).
              tests/stream runs before each run and after the last, and each run's share is of
              the mean of the two either side of it (this machine's speed moves by a third
              within minutes, so a ceiling measured once, at another moment, said anything from
              61% to 118%); the table gives the median share and the median ceiling.

--wall (make bench-wall) measures decoding alone against the memory wall: for each shape x dtype
x threads, --runs rounds in which ./run -m bench -n 128 -c 600 runs once at each width the build
reads f32, f16 and bf16 weight rows in (--row-bits: 512 and 256 on AVX-512, whose best differs by
processor), every run between two of tests/stream's; the table gives the median decode tokens/s
and the median share (the run's reads over the mean of the walls either side of it), and the
median share of tests/stream's sustained read (all its passes, over half a second or more: a
mean, as a decoding run's tokens/s is, where the fastest pass catches the machine's quiet
moments). After each round, `tests/stream MODEL THREADS --decode 64` decodes 64 tokens at each
width with run.c's forward pass, every token between two passes over the file, in one process:
the last two columns are the median over the rounds of its median token share, and of its
median pass (this wall, a few milliseconds from each token, is the one the machine's moods tilt
least, though its level still moves with them: docs/speed.md).
tests/sidebyside.py --wall does the same beside llama.cpp or another build.

--export (make bench runs it after the speed table) times export.py itself: the minimind-3-MoE
shape's random fp16 safetensors (198M parameters) to each dtype, --runs times, with ./quantize (the
default) and, once each, with the Python encodings alone (MINIMIND_QUANTIZE=, --export-python); the
table gives the median seconds and the peak resident memory of the largest process (export.py or
./quantize, from wait4), beside the output's size.

--busy (make bench-busy) measures what other work on the machine does to the default thread
count (measured as the program runs, run.c's "Threads") beside --threads 1: for each model and 0,
1 and 2 busy processes (a Python loop each, started before and stopped after the pair), the
default and --threads 1 run one after the other, each first in turn, --runs times (the busy
processes have run for a second before each pair); the table gives the median decode (tg128)
and prefill (pp512) of each and the median ratio of the pairs. Then make run's command at the
default context against -c 64, alternately, 10 times each: its first token (the prompt's 7
tokens, the stats line's prefill) and its peak RSS (-v), medians.
"""
import argparse
import json
import os
import random
import re
import statistics
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "tests", "bench-models")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer")

# the three shapes of issue 5: hidden, layers, heads, kv heads, head_dim, FFN, q/k norm
SHAPES = {
    "m2small": dict(label="minimind2-small 26M", dim=512, layers=8, heads=8, kv_heads=2, head_dim=64,
                    ffn=1408, qk_norm=False),
    "m3": dict(label="minimind-3 64M", dim=768, layers=8, heads=8, kv_heads=4, head_dim=96,
               ffn=2432, qk_norm=True),
    "m2": dict(label="minimind2 104M", dim=768, layers=16, heads=8, kv_heads=2, head_dim=96,
               ffn=2048, qk_norm=False),
    # minimind-3-MoE: 4 experts of minimind-3's FFN, top-1 (export's speed: make bench times it)
    "m3moe": dict(label="minimind-3-MoE 198M", dim=768, layers=8, heads=8, kv_heads=4, head_dim=96,
                  ffn=2432, qk_norm=True, experts=4),
}
VOCAB = 6400

# random fp16 weights: random sign and mantissa, exponent 9 (|w| in [2^-6, 2^-5)), like a trained
# model's scale; the high byte of each little-endian fp16 is sign(1) exponent(5) mantissa(2)
HIGH_BYTE = bytes((b & 0x83) | (9 << 2) for b in range(256))


def random_f16(rng, n):
    data = bytearray(rng.randbytes(2 * n))
    data[1::2] = data[1::2].translate(HIGH_BYTE)
    return bytes(data)


def write_checkpoint(path, shape, seed=5):
    """A MiniMind-style state dict (tied embeddings) as one safetensors file."""
    rng = random.Random(seed)
    d, hd = shape["dim"], shape["head_dim"]
    q_dim, kv_dim = shape["heads"] * hd, shape["kv_heads"] * hd
    tensors = [("model.embed_tokens.weight", "F16", (VOCAB, d))]
    for l in range(shape["layers"]):
        p = f"model.layers.{l}."
        tensors += [(p + "input_layernorm.weight", "F32", (d,)),
                    (p + "self_attn.q_proj.weight", "F16", (q_dim, d)),
                    (p + "self_attn.k_proj.weight", "F16", (kv_dim, d)),
                    (p + "self_attn.v_proj.weight", "F16", (kv_dim, d)),
                    (p + "self_attn.o_proj.weight", "F16", (d, q_dim))]
        if shape["qk_norm"]:
            tensors += [(p + "self_attn.q_norm.weight", "F32", (hd,)),
                        (p + "self_attn.k_norm.weight", "F32", (hd,))]
        tensors.append((p + "post_attention_layernorm.weight", "F32", (d,)))
        ffns = [p + "mlp."]
        if shape.get("experts"):
            tensors.append((p + "mlp.gate.weight", "F16", (shape["experts"], d)))
            ffns = [f"{p}mlp.experts.{e}." for e in range(shape["experts"])]
        for q in ffns:
            tensors += [(q + "gate_proj.weight", "F16", (shape["ffn"], d)),
                        (q + "up_proj.weight", "F16", (shape["ffn"], d)),
                        (q + "down_proj.weight", "F16", (d, shape["ffn"]))]
    tensors.append(("model.norm.weight", "F32", (d,)))
    header, blobs, offset = {}, [], 0
    for name, dt, dims in tensors:
        n = 1
        for x in dims:
            n *= x
        blob = random_f16(rng, n) if dt == "F16" else struct.pack(f"<{n}f", *([1.0] * n))
        header[name] = {"dtype": dt, "shape": list(dims), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for b in blobs:
            f.write(b)
    os.replace(path + ".tmp", path)


def format_version():
    """MM_VERSION of this checkout's model.h: model files of another version are exported again"""
    with open(os.path.join(ROOT, "model.h")) as f:
        for line in f:
            if line.startswith("#define MM_VERSION"):
                return int(line.split()[2].rstrip("u"))
    raise SystemExit("bench: no MM_VERSION in model.h")


def file_version(path):
    with open(path, "rb") as f:
        return struct.unpack("<II", f.read(8))[1]


def model_file(shape_name, dtype):
    os.makedirs(MODELS, exist_ok=True)
    ckpt = os.path.join(MODELS, f"{shape_name}.safetensors")
    out = os.path.join(MODELS, f"{shape_name}.{dtype}.bin")
    if not os.path.exists(ckpt):
        print(f"bench: writing random {SHAPES[shape_name]['label']} checkpoint", file=sys.stderr)
        write_checkpoint(ckpt, SHAPES[shape_name])
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(ckpt) or \
            file_version(out) != format_version():
        print(f"bench: export.py {shape_name} --dtype {dtype}", file=sys.stderr)
        subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), ckpt, out, "--tokenizer",
                        TOKENIZER, "--dtype", dtype, "--n-heads", str(SHAPES[shape_name]["heads"])],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def bench_once(binary, model, threads, extra):
    """one -m bench run; threads None: the default (measured as it runs)"""
    flags = ["--threads", str(threads)] if threads else []
    p = subprocess.run([binary, model, "-m", "bench", "-n", "128"] + flags + extra, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench: {binary} {model} failed: {p.stderr.strip()}")
    header, row = p.stdout.strip().splitlines()[-2:]
    return {k: float(v) if v else float("nan") for k, v in zip(header.split(","), row.split(","))}


def stream_both(model, threads):
    """GB/s at which tests/stream reads the model file: (its fastest pass, the wall; sustained
    over all its passes, half a second or more)"""
    p = subprocess.run([os.path.join(ROOT, "tests", "stream"), model, str(threads)], capture_output=True, text=True)
    fields = p.stdout.split()
    if p.returncode != 0 or len(fields) != 2:
        sys.exit(f"bench: tests/stream {model} failed: {p.stderr.strip()} (make tests/stream)")
    return float(fields[1]), float(fields[0])


def wall_cell(engines, stream_file, threads, rounds, progress=None):
    """Decoding against the memory wall, for one cell: `rounds` rounds in which each engine (name,
    run: () -> decode tokens/s, bytes: the bytes one token reads) runs once, in an order that
    turns by one each round, every run between two of tests/stream's on stream_file. Returns
    ({name: [(tokens/s, share, share of sustained)]}, [walls]): a run's share is its reads over
    the mean of the walls (tests/stream's fastest pass) either side of it; the last, over the mean
    of their sustained reads."""
    runs, walls = {name: [] for name, _, _ in engines}, []
    for r in range(rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        before = stream_both(stream_file, threads)
        walls.append(before[0])
        for name, run, size in order:
            tps = run()
            after = stream_both(stream_file, threads)
            reads = tps * size / 1e9
            runs[name].append((tps, reads / ((before[0] + after[0]) / 2), reads / ((before[1] + after[1]) / 2)))
            walls.append(after[0])
            before = after
        if progress:
            progress(r)
    return runs, walls


def token_shares(model, threads, tokens=64):
    """tests/stream MODEL THREADS --decode: each token decoded between two passes over the file, the
    build's row widths in turn; {width ("512", "256"; "" for q8_0's panels): (median share, median
    pass GB/s)}"""
    p = subprocess.run([os.path.join(ROOT, "tests", "stream"), model, str(threads), "--decode", str(tokens)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench: tests/stream {model} {threads} --decode failed: {p.stderr.strip()} (make tests/stream)")
    out = {}
    for line in p.stdout.strip().splitlines():
        bits, pass_gbs, _, share = line.split()
        out["" if bits == "0" else bits] = (float(share), float(pass_gbs))
    return out


def row_widths(binary, model):
    """the --row-bits this build takes (decoding's weight rows: 512 and 256 on AVX-512)"""
    return [w for w in ("512", "256", "128") if subprocess.run(
        [binary, model, "-m", "logits", "--ids", "1", "-o", os.devnull, "-c", "16", "--row-bits", w],
        capture_output=True).returncode == 0]


def wall_table(a):
    """--wall: decode tg128 and its share of the wall, for each cell and each row width the build has"""
    lines = ["| shape | dtype | threads | rows | decode tg128 tok/s | share of wall | share of sustained read "
             "| wall GB/s | share, token by token | pass GB/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for shape in a.shapes.split(","):
        for dtype in a.dtypes.split(","):
            model = model_file(shape, dtype)
            widths = row_widths(a.binary, model) if dtype != "q8_0" else [""]
            for threads in [int(t) for t in a.threads.split(",")]:
                def engine(w):
                    flags = ["-c", "600"] + (["--row-bits", w] if w else []) + a.extra
                    return (w, lambda: bench_once(a.binary, model, threads, flags)["decode_tps"],
                            os.path.getsize(model))
                tokens = []
                runs, walls = wall_cell([engine(w) for w in widths], model, threads, a.runs,
                                        lambda r: tokens.append(token_shares(model, threads)))
                for w in widths:
                    line = (f"| {SHAPES[shape]['label']} | {dtype} | {threads} | {w + '-bit' if w else 'panels'} | "
                            f"{statistics.median(x[0] for x in runs[w]):.1f} | "
                            f"{statistics.median(x[1] for x in runs[w]):.2f} | "
                            f"{statistics.median(x[2] for x in runs[w]):.2f} | {statistics.median(walls):.1f} | "
                            f"{statistics.median(t[w][0] for t in tokens):.2f} | "
                            f"{statistics.median(t[w][1] for t in tokens):.1f} |")
                    lines.append(line)
                    print(line, flush=True)
    return lines


def cpu_name():
    """this machine's processor, as /proc/cpuinfo names it, with AMD's generation where known"""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = (s.strip() for s in line.split(":", 1))
                    info.setdefault(k, v)
    except OSError:
        pass
    family, model = info.get("cpu family", "?"), info.get("model", "?")
    generation = ""
    if info.get("vendor_id") == "AuthenticAMD" and family.isdigit() and model.isdigit():
        f, m = int(family), int(model)
        zen4 = 0x10 <= m <= 0x1f or 0x60 <= m <= 0x7f or 0xa0 <= m <= 0xaf
        generation = {26: "Zen 5, ", 25: "Zen 4, " if zen4 else "Zen 3, ", 23: "Zen 2 or earlier, "}.get(f, "")
    return (f"{info.get('model name', 'unknown')} ({generation}cpu family {family}, model {model}), "
            f"{os.cpu_count()} logical cores")


def build_line(binary):
    """the processor and the kernels of this build (the last line of ./run --help)"""
    p = subprocess.run([binary, "--help"], capture_output=True, text=True)
    kernels = next((l.split(": ", 1)[1] for l in p.stdout.splitlines() if l.startswith("this build:")), "?")
    return f"processor: {cpu_name()}; {kernels}"


def busy_loops(n):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def busy_table(a):
    """--busy: default threads vs --threads 1 under 0, 1, 2 busy processes; make run's first token"""
    lines = ["| model | busy processes | decode tg128 tok/s: default | --threads 1 | ratio "
             "| prefill pp512 tok/s: default | --threads 1 | ratio |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in filter(None, a.busy_models.split(",")):
        model = os.path.join(ROOT, "demo", "model.bin") if name == "demo" else model_file(*name.split("."))
        label = "demo (minimind-3 2.7M, f16)" if name == "demo" else \
            f"{SHAPES[name.split('.')[0]]['label']} {name.split('.')[1]}"
        for n_busy in (0, 1, 2):
            pairs = []
            for r in range(a.runs):
                loops = busy_loops(n_busy)
                try:
                    time.sleep(1 if n_busy else 0)  # (new processes get the scheduler's favour at first)
                    first, second = (None, 1) if r % 2 == 0 else (1, None)  # each goes first in turn
                    x, y = bench_once(a.binary, model, first, a.extra), bench_once(a.binary, model, second, a.extra)
                    pairs.append((x, y) if first is None else (y, x))
                finally:
                    for p in loops:
                        p.kill()
                        p.wait()
            med = lambda i, c: statistics.median(p[i][c] for p in pairs)
            ratio = lambda c: statistics.median(p[0][c] / p[1][c] for p in pairs)
            line = (f"| {label} | {n_busy} | {med(0, 'decode_tps'):.0f} | {med(1, 'decode_tps'):.0f} | "
                    f"{ratio('decode_tps'):.2f} | {med(0, 'prefill_tps'):.0f} | {med(1, 'prefill_tps'):.0f} | "
                    f"{ratio('prefill_tps'):.2f} |")
            lines.append(line)
            print(line, flush=True)
    cmd = [a.binary, os.path.join(ROOT, "demo", "model.bin"), "-i", "春眠不覺曉，", "-n", "48", "-s", "42", "-v"]
    runs = {"default": [], "-c 64": []}
    for _ in range(10):
        for key, extra in (("default", []), ("-c 64", ["-c", "64"])):
            t0 = time.time()
            p = subprocess.run(cmd + extra, capture_output=True, text=True)
            wall = time.time() - t0
            m = re.search(r"prompt (\d+) tokens.*prefill ([0-9.]+) tokens/s", p.stderr)
            rss = re.search(r"peak RSS ([0-9.]+) MB", p.stderr)
            if p.returncode != 0 or not m or not rss:
                sys.exit(f"bench: {' '.join(cmd + extra)} failed: {p.stderr.strip()}")
            runs[key].append((int(m.group(1)) / float(m.group(2)) * 1e3, float(rss.group(1)), wall * 1e3))
    more = ["", "make run's command (`./run demo/model.bin -i \"春眠不覺曉，\" -n 48 -s 42`), 10 runs each, "
            "alternated, medians:", "",
            "| context | first token (7-token prompt) ms | peak RSS MB | whole run ms |", "|---|---|---|---|"]
    for key, r in runs.items():
        more.append(f"| {key if key != 'default' else 'default (32768)'} | "
                    f"{statistics.median(x[0] for x in r):.2f} | {statistics.median(x[1] for x in r):.1f} | "
                    f"{statistics.median(x[2] for x in r):.0f} |")
    print("\n".join(more), flush=True)
    return lines + more


def export_once(ckpt, out, dtype, quantize):
    """seconds and the peak RSS (MB) of the largest process of one export.py run"""
    env = dict(os.environ)
    if not quantize:
        env["MINIMIND_QUANTIZE"] = ""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "export.py"), ckpt, out, "--tokenizer", TOKENIZER,
                          "--dtype", dtype, "--n-heads", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=env)
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        sys.exit(f"bench: export.py --dtype {dtype} failed: {p.stderr.read().decode().strip()}")
    return seconds, usage.ru_maxrss / 1024


def export_table(a):
    os.makedirs(MODELS, exist_ok=True)
    ckpt = os.path.join(MODELS, "m3moe.safetensors")
    if not os.path.exists(ckpt):
        print(f"bench: writing random {SHAPES['m3moe']['label']} checkpoint", file=sys.stderr)
        write_checkpoint(ckpt, SHAPES["m3moe"])
    out = os.path.join(MODELS, "export-bench.bin")
    if not os.path.exists(os.path.join(ROOT, "quantize")):
        sys.exit("bench: ./quantize is not built (make)")
    lines = ["", f"export.py: {SHAPES['m3moe']['label']}, fp16 safetensors "
             f"({os.path.getsize(ckpt) / 1e6:.0f} MB) to each dtype",
             "", "| dtype | encodings | seconds | peak RSS MB | output MB |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for dtype in a.dtypes.split(","):
        for quantize in (True, False) if a.export_python else (True,):
            runs = [export_once(ckpt, out, dtype, quantize) for _ in range(a.runs if quantize else 1)]
            line = (f"| {dtype} | {'./quantize' if quantize else 'Python alone'} | "
                    f"{statistics.median(r[0] for r in runs):.2f} | {statistics.median(r[1] for r in runs):.0f} | "
                    f"{os.path.getsize(out) / 1e6:.0f} |")
            lines.append(line)
            print(line, flush=True)
    os.unlink(out)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per cell; the table shows medians")
    ap.add_argument("--shapes", default="m2small,m3,m2")
    ap.add_argument("--dtypes", default="f32,f16,bf16,q8_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--binary", default=os.path.join(ROOT, "run"))
    ap.add_argument("--md", help="also write the table to this Markdown file")
    ap.add_argument("--busy", action="store_true",
                    help="the default thread count vs --threads 1 beside 0, 1 and 2 busy processes, and "
                         "make run's first token and peak RSS at the default context (see above)")
    ap.add_argument("--busy-models", default="demo,m2small.q8_0",
                    help="--busy: demo, or SHAPE.DTYPE of the random-weight models (none: make run's "
                         "first token only)")
    ap.add_argument("--wall", action="store_true",
                    help="decoding only (-c 600), each run between two of tests/stream's, at every row width "
                         "the build has (--row-bits): the share of the memory wall (see above)")
    ap.add_argument("--export", action="store_true", help="export.py's time and memory only (see above)")
    ap.add_argument("--export-python", action="store_true", help="--export: also the Python encodings alone, "
                    "once per dtype (minutes)")
    ap.add_argument("extra", nargs="*", help="more flags for ./run (after --), e.g. --kv f16")
    a = ap.parse_args()
    print(build_line(a.binary), flush=True)
    if a.export:
        lines = export_table(a)
        if a.md:
            with open(a.md, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    if a.wall or a.busy:
        lines = [build_line(a.binary), ""] + (wall_table(a) if a.wall else busy_table(a))
        if a.md:
            with open(a.md, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    cols = ["prefill_tps", "ttft_ms", "decode_tps", "decode_tps_2048", "decode_tps_4096", "peak_rss_mb"]
    lines = [build_line(a.binary), "",
             "| shape | dtype | threads | prefill pp512 tok/s | ttft ms | decode tg128 tok/s "
             "| decode @2048 tok/s | decode @4096 tok/s | peak RSS MB | tg128 reads GB/s (of stream) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines[2:]), flush=True)
    for shape in a.shapes.split(","):
        for dtype in a.dtypes.split(","):
            model = model_file(shape, dtype)
            for threads in [int(t) for t in a.threads.split(",")]:
                ceilings, runs = [stream_both(model, threads)[0]], []
                for _ in range(a.runs):
                    runs.append(bench_once(a.binary, model, threads, a.extra))
                    ceilings.append(stream_both(model, threads)[0])
                med = {c: statistics.median(r[c] for r in runs) for c in cols}
                reads = med["decode_tps"] * os.path.getsize(model) / 1e9
                share = statistics.median(r["decode_tps"] * os.path.getsize(model) / 1e9 / ((c0 + c1) / 2)
                                          for r, c0, c1 in zip(runs, ceilings, ceilings[1:]))
                ceiling = statistics.median(ceilings)
                line = (f"| {SHAPES[shape]['label']} | {dtype} | {threads} | {med['prefill_tps']:.0f} | "
                        f"{med['ttft_ms']:.1f} | {med['decode_tps']:.1f} | {med['decode_tps_2048']:.1f} | "
                        f"{med['decode_tps_4096']:.1f} | {med['peak_rss_mb']:.0f} | "
                        f"{reads:.1f} ({100 * share:.0f}% of {ceiling:.1f}) |")
                lines.append(line)
                print(line, flush=True)
    if a.md:
        with open(a.md, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
