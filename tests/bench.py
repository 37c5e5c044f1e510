#!/usr/bin/env python3
"""make bench: speed and memory of ./run on random-weight models of the MiniMind shapes.

    python3 tests/bench.py [--runs 3] [--shapes m2small,m3,m2] [--dtypes f32,f16,bf16,q8_0]
                           [--threads 1,2] [--md FILE]

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
              way with the same threads: the memory ceiling of decoding on this machine.
              tests/stream runs before each run and after the last, and each run's share is of
              the mean of the two either side of it (this machine's speed moves by a third
              within minutes, so a ceiling measured once, at another moment, said anything from
              61% to 118%); the table gives the median share and the median ceiling.
"""
import argparse
import json
import os
import random
import statistics
import struct
import subprocess
import sys

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
        tensors += [(p + "post_attention_layernorm.weight", "F32", (d,)),
                    (p + "mlp.gate_proj.weight", "F16", (shape["ffn"], d)),
                    (p + "mlp.up_proj.weight", "F16", (shape["ffn"], d)),
                    (p + "mlp.down_proj.weight", "F16", (d, shape["ffn"]))]
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
    p = subprocess.run([binary, model, "-m", "bench", "-n", "128", "--threads", str(threads)] + extra,
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench: {binary} {model} failed: {p.stderr.strip()}")
    header, row = p.stdout.strip().splitlines()[-2:]
    return {k: float(v) if v else float("nan") for k, v in zip(header.split(","), row.split(","))}


def stream_gbs(model, threads):
    """GB/s at which tests/stream reads the model file (best of its 10 passes)"""
    p = subprocess.run([os.path.join(ROOT, "tests", "stream"), model, str(threads)], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench: tests/stream {model} failed: {p.stderr.strip()} (make tests/stream)")
    return float(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per cell; the table shows medians")
    ap.add_argument("--shapes", default="m2small,m3,m2")
    ap.add_argument("--dtypes", default="f32,f16,bf16,q8_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--binary", default=os.path.join(ROOT, "run"))
    ap.add_argument("--md", help="also write the table to this Markdown file")
    ap.add_argument("extra", nargs="*", help="more flags for ./run (after --), e.g. --kv f16")
    a = ap.parse_args()
    cols = ["prefill_tps", "ttft_ms", "decode_tps", "decode_tps_2048", "decode_tps_4096", "peak_rss_mb"]
    lines = ["| shape | dtype | threads | prefill pp512 tok/s | ttft ms | decode tg128 tok/s "
             "| decode @2048 tok/s | decode @4096 tok/s | peak RSS MB | tg128 reads GB/s (of stream) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for shape in a.shapes.split(","):
        for dtype in a.dtypes.split(","):
            model = model_file(shape, dtype)
            for threads in [int(t) for t in a.threads.split(",")]:
                ceilings, runs = [stream_gbs(model, threads)], []
                for _ in range(a.runs):
                    runs.append(bench_once(a.binary, model, threads, a.extra))
                    ceilings.append(stream_gbs(model, threads))
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
