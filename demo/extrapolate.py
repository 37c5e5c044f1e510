#!/usr/bin/env python3
"""What happens to a RoPE model past its training length: perplexity by context length.

    python3 demo/extrapolate.py MODEL.bin TEXT [--train-len 256] [--contexts 256,512,...]
                                [--bases 10000,100000,10000000] [--yarn-factor F] [--out PREFIX]

For each context length N, the text (BOS + its tokens, the first --max-tokens of them) is cut
into windows of N tokens, each run from position 0 (`./run -m ppl -c N --csv`), with:
  none      plain RoPE, the model's theta
  linear    positions divided by N / train-len (Position Interpolation)
  yarn      MiniMind's YaRN with original context train-len and factor N / train-len
            (or a fixed --yarn-factor: MiniMind's own inference_rope_scaling is 16 over 2048)
  base=B    plain RoPE with theta B (--rope-base)
Writes PREFIX.csv, PREFIX.md (the table) and PREFIX.svg (the plot); --from-csv PREFIX.csv redraws
the table and plot of an earlier run without running anything. Standard library only.
For a MiniMind release: --train-len 2048 --contexts 2048,4096,8192,16384,32768 --yarn-factor 16
"""
import argparse
import csv
import io
import math
import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tokenize(run, model, text, max_tokens, ids_path):
    """BOS + the text's first max_tokens - 1 tokens, written as an --ids file: tokenized once"""
    p = subprocess.run([run, model, "-m", "tokenize", "-f", text], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"extrapolate.py: {run} -m tokenize failed: {p.stderr.strip()}")
    ids = [str(bos_id(model))] + p.stdout.split()[:max_tokens - 1]
    with open(ids_path, "w") as f:
        f.write(",".join(ids))
    return len(ids)


def ppl(run, model, ids_path, ctx, flags):
    p = subprocess.run([run, model, "-m", "ppl", "-c", str(ctx), "--ids", "@" + ids_path, "--csv"] + flags,
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"extrapolate.py: {run} failed: {p.stderr.strip()}")
    return float(next(csv.DictReader(io.StringIO(p.stdout)))["ppl"])


def bos_id(model):
    """mm_header.bos_id (model.h): the 27th uint32 of the header"""
    with open(model, "rb") as f:
        return struct.unpack_from("<I", f.read(256), 26 * 4)[0]


def svg_plot(series, contexts, path, title):
    W, H, L, R, T, B = 720, 420, 70, 170, 40, 50
    ys = [v for s in series.values() for v in s if v and math.isfinite(v)]
    lo, hi = math.log10(min(ys)), math.log10(max(ys))
    hi = hi if hi > lo else lo + 1
    lo, hi = lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo)  # a margin, so no line runs on an axis
    xs = {c: L + (W - L - R) * i / max(len(contexts) - 1, 1) for i, c in enumerate(contexts)}
    y = lambda v: T + (H - T - B) * (1 - (math.log10(v) - lo) / (hi - lo))
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">context length (tokens)</text>',
           f'<text x="16" y="{(T + H - B) / 2}" transform="rotate(-90 16 {(T + H - B) / 2})" text-anchor="middle">perplexity (log scale)</text>']
    for c, x in xs.items():
        out.append(f'<text x="{x}" y="{H - B + 16}" text-anchor="middle">{c}</text>')
    # gridlines at 10^e on a long range, 1, 2, 5 x 10^e on a shorter one, finer within a decade
    steps = (1,) if hi - lo > 3 else (1, 2, 5) if hi - lo > 1 else (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8)
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in steps:
            v = m * 10 ** e
            if lo <= math.log10(v) <= hi:
                label = f"{v:g}" if -3 <= e <= 5 else f"{m:g}e{e}"
                out.append(f'<line x1="{L - 4}" y1="{y(v):.1f}" x2="{W - R}" y2="{y(v):.1f}" stroke="#ddd"/>')
                out.append(f'<text x="{L - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{label}</text>')
    for i, (name, vals) in enumerate(series.items()):
        col = colors[i % len(colors)]
        pts = " ".join(f"{xs[c]:.1f},{y(v):.1f}" for c, v in zip(contexts, vals) if v and math.isfinite(v))
        out.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="{pts}"/>')
        ly = T + 18 * i
        out.append(f'<line x1="{W - R + 12}" y1="{ly}" x2="{W - R + 32}" y2="{ly}" stroke="{col}" stroke-width="2"/>')
        out.append(f'<text x="{W - R + 38}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--contexts", default="256,512,1024,2048,4096,8192")
    ap.add_argument("--bases", default="10000,100000,10000000", help="extra --rope-base values")
    ap.add_argument("--yarn-factor", type=float, help="fixed YaRN factor (default N / train-len)")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--run", default=os.path.join(ROOT, "run"))
    ap.add_argument("--out", default=os.path.join(ROOT, "demo", "extrapolation"))
    ap.add_argument("--from-csv", help="redraw the table and plot from an earlier PREFIX.csv, running nothing")
    a = ap.parse_args()
    if a.from_csv:
        with open(a.from_csv, newline="") as f:
            rows = list(csv.reader(f))
        contexts = [int(c) for c in rows[0][1:]]
        return report({r[0]: [float(v) for v in r[1:]] for r in rows[1:]}, contexts, a)
    contexts = [int(c) for c in a.contexts.split(",")]
    runs = {"none": lambda n: ["--rope-scaling", "none"],
            "linear": lambda n: ["--rope-scaling", "linear", "--rope-scale", str(max(1.0, n / a.train_len))],
            "yarn": lambda n: ["--rope-scaling", "yarn", "--yarn-orig-ctx", str(a.train_len), "--rope-scale",
                               str(a.yarn_factor or max(1.0, n / a.train_len))]}
    for b in filter(None, a.bases.split(",")):
        runs[f"base={float(b):g}"] = lambda n, b=b: ["--rope-scaling", "none", "--rope-base", b]
    series = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = os.path.join(tmp, "ids.txt")
        n_ids = tokenize(a.run, a.model, a.text, a.max_tokens, ids_path)
        print(f"{a.text}: {n_ids} tokens (BOS included)", file=sys.stderr)
        for name, flags in runs.items():
            series[name] = []
            for n in contexts:
                series[name].append(ppl(a.run, a.model, ids_path, n, flags(n)))
                print(f"{name:>12} ctx {n:>6}: ppl {series[name][-1]:.3f}", file=sys.stderr)
    report(series, contexts, a)


def report(series, contexts, a):
    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method"] + contexts)
        for name, vals in series.items():
            w.writerow([name] + [f"{v:.4f}" for v in vals])
    lines = ["| method | " + " | ".join(str(c) for c in contexts) + " |",
             "|---|" + "---|" * len(contexts)]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |" for name, vals in series.items()]
    table = "\n".join(lines)
    with open(a.out + ".md", "w") as f:
        f.write(table + "\n")
    svg_plot(series, contexts, a.out + ".svg",
             f"{a.model}: perplexity by context length (trained at {a.train_len})")
    print(table)


if __name__ == "__main__":
    main()
