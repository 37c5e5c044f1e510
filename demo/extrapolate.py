#!/usr/bin/env python3
"""What happens to a RoPE model past its training length: perplexity by context length, and the
loss at each position of the longest window.

    python3 demo/extrapolate.py MODEL.bin TEXT [--train-len 256] [--contexts 256,512,...]
        [--methods none,linear,yarn,ntk,dynamic] [--bases 10000,100000,10000000] [--out DIR]

For each context length N, the text (BOS + its tokens, the first --max-tokens of them) is cut
into windows of N tokens, each run from position 0 (`./run -m ppl -c N --csv`), with:
  none      plain RoPE, the model's theta
  linear    positions divided by N / train-len (Position Interpolation)
  yarn      MiniMind's YaRN with original context train-len and factor N / train-len
            (or a fixed --yarn-factor: MiniMind's own inference_rope_scaling is 16 over 2048)
  ntk       NTK-aware: base theta x F^(d/(d-2)), F = N / train-len
  dynamic   transformers' dynamic NTK for a window of N past train-len, factor --dynamic-factor
  base=B    plain RoPE with theta B (--rope-base), one method per --bases value
At the longest context every method also writes the loss at each position of the window,
averaged over the windows (`--per-position`): where past the training length the loss climbs.

Writes into DIR (default: a new folder extrapolation-DATE-TIME in the current directory; an
existing DIR is written into): extrapolation.csv, .md (the table), .svg (the plot),
loss_by_position.csv, .md (the mean loss over positions 0 to train-len, then each doubling),
.svg, and frequencies.csv, .svg: each dimension pair's wavelength in
tokens as each method sets it for the longest context (`./run -m rope`), against the training
length. --from DIR redraws the tables and plots of an earlier run without
running anything. Each context needs at least as many tokens of text as it is long. Time: one
./run -m ppl over the text per method and context; the demo model's default run (6 contexts x
8 methods over 32,768 tokens) took four and a half minutes on a 2-core machine.
For a MiniMind release: --train-len 2048 --contexts 2048,4096,8192,16384,32768 --yarn-factor 16
Standard library only.
"""
import argparse
import csv
import datetime
import io
import math
import os
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Failure(Exception):
    """a one-line error for the user"""


def run_cmd(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise Failure(f"cannot run {cmd[0]}: {e.strerror}")
    if p.returncode != 0:
        raise Failure(f"{' '.join(cmd[:4])} ... failed: {(p.stderr.strip().splitlines() or ['(no message)'])[-1]}")
    return p.stdout


def tokenize(run, model, text, max_tokens, ids_path):
    """BOS + the text's first max_tokens - 1 tokens, written as an --ids file: tokenized once"""
    ids = [str(bos_id(model))] + run_cmd([run, model, "-m", "tokenize", "-f", text]).split()[:max_tokens - 1]
    with open(ids_path, "w") as f:
        f.write(",".join(ids))
    return len(ids)


def ppl(run, model, ids_path, ctx, flags, per_position=None):
    extra = ["--per-position", per_position] if per_position else []
    out = run_cmd([run, model, "-m", "ppl", "-c", str(ctx), "--ids", "@" + ids_path, "--csv"] + flags + extra)
    return float(next(csv.DictReader(io.StringIO(out)))["ppl"])


def bos_id(model):
    """mm_header.bos_id (model.h): the 27th uint32 of the header"""
    try:
        with open(model, "rb") as f:
            header = f.read(256)
    except OSError as e:
        raise Failure(f"{model}: {e.strerror}")
    if len(header) < 256:
        raise Failure(f"{model}: too short for a model file")
    return struct.unpack_from("<I", header, 26 * 4)[0]


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]


def start_svg(W, H, L, R, T, B, title, xlabel, ylabel):
    """a plot's first elements: W x H, the plot area inset by L, R, T, B; title, axes and labels"""
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
            f'<rect width="{W}" height="{H}" fill="white"/>',
            f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
            f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
            f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
            f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>',
            f'<text x="16" y="{(T + H - B) / 2}" transform="rotate(-90 16 {(T + H - B) / 2})" '
            f'text-anchor="middle">{ylabel}</text>']


def svg_plot(series, contexts, path, title):
    W, H, L, R, T, B = 720, 420, 70, 170, 40, 50
    ys = [v for s in series.values() for v in s if v and math.isfinite(v)]
    lo, hi = math.log10(min(ys)), math.log10(max(ys))
    hi = hi if hi > lo else lo + 1
    lo, hi = lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo)  # a margin, so no line runs on an axis
    xs = {c: L + (W - L - R) * i / max(len(contexts) - 1, 1) for i, c in enumerate(contexts)}
    y = lambda v: T + (H - T - B) * (1 - (math.log10(v) - lo) / (hi - lo))
    out = start_svg(W, H, L, R, T, B, title, "context length (tokens)", "perplexity (log scale)")
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
        col = COLORS[i % len(COLORS)]
        pts = " ".join(f"{xs[c]:.1f},{y(v):.1f}" for c, v in zip(contexts, vals) if v and math.isfinite(v))
        out.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="{pts}"/>')
    finish_svg(out, series, W - R, T, path)


def line_plot(series, path, title, xlabel, ylabel, mark=None, log_y=False, hline=None):
    """series {name: [(x, y)]} as polylines; mark: an x to draw a dashed line at; hline: a y"""
    W, H, L, R, T, B = 720, 420, 70, 170, 40, 50
    xs_all = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts if math.isfinite(y) and (y > 0 or not log_y)]
    f = math.log10 if log_y else (lambda v: v)
    x0, x1 = min(xs_all), max(xs_all)
    lo, hi = f(min(ys)), f(max(ys))
    hi = hi if hi > lo else lo + 1
    lo, hi = lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo)
    px = lambda x: L + (W - L - R) * (x - x0) / max(x1 - x0, 1)
    py = lambda y: T + (H - T - B) * (1 - (f(y) - lo) / (hi - lo))
    out = start_svg(W, H, L, R, T, B, title, xlabel, ylabel)
    for i in range(5):
        x = x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{px(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x:.0f}</text>')
    for i in range(6):
        v = lo + (hi - lo) * i / 5
        y = 10 ** v if log_y else v
        out.append(f'<line x1="{L - 4}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    if hline is not None and lo <= f(hline) <= hi:
        out.append(f'<line x1="{L}" y1="{py(hline):.1f}" x2="{W - R}" y2="{py(hline):.1f}" stroke="black" '
                   f'stroke-dasharray="4 4"/>')
        out.append(f'<text x="{L + 4}" y="{py(hline) - 4:.1f}">training length {hline}</text>')
    if mark is not None and x0 <= mark <= x1:
        out.append(f'<line x1="{px(mark):.1f}" y1="{T}" x2="{px(mark):.1f}" y2="{H - B}" stroke="black" '
                   f'stroke-dasharray="4 4"/>')
        out.append(f'<text x="{px(mark) + 4:.1f}" y="{T + 12}">training length {mark}</text>')
    for i, (name, pts) in enumerate(series.items()):
        col = COLORS[i % len(COLORS)]
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts if math.isfinite(y))
        out.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.5" points="{line}"/>')
    finish_svg(out, series, W - R, T, path)


def finish_svg(out, names, x, top, path):
    """a plot's legend (each series' colour and name, in a column from (x, top)), then the file"""
    for i, name in enumerate(names):
        ly = top + 18 * i
        out.append(f'<line x1="{x + 12}" y1="{ly}" x2="{x + 32}" y2="{ly}" stroke="{COLORS[i % len(COLORS)]}" '
                   f'stroke-width="2"/>')
        out.append(f'<text x="{x + 38}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def methods(names, train_len, yarn_factor=None, dynamic_factor=2.0, bases=""):
    """{name: ./run's flags for a context of n} for the comma-separated method names and RoPE bases
    (demo/passkey.py takes them from here too)"""
    scale = lambda n: str(max(1.0, n / train_len))
    known = {"none": lambda n: ["--rope-scaling", "none"],
             "linear": lambda n: ["--rope-scaling", "linear", "--rope-scale", scale(n)],
             "yarn": lambda n: ["--rope-scaling", "yarn", "--yarn-orig-ctx", str(train_len), "--rope-scale",
                                str(yarn_factor) if yarn_factor else scale(n)],
             "ntk": lambda n: ["--rope-scaling", "ntk", "--rope-scale", scale(n)],
             "dynamic": lambda n: ["--rope-scaling", "dynamic", "--rope-scale", str(dynamic_factor),
                                   "--yarn-orig-ctx", str(train_len)]}
    out = {}
    for m in filter(None, names.split(",")):
        if m not in known:
            raise Failure(f"--methods: unknown method {m!r} (of {', '.join(known)})")
        out[m] = known[m]
    for b in filter(None, bases.split(",")):
        try:
            if not float(b) > 1:
                raise ValueError
        except ValueError:
            raise Failure(f"--bases: {b!r} is not a RoPE base (a number above 1)")
        out[f"base={float(b):g}"] = lambda n, b=b: ["--rope-scaling", "none", "--rope-base", b]
    if not out:
        raise Failure("no methods to run (--methods and --bases are both empty)")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="a model file exported by export.py")
    ap.add_argument("text", nargs="?", help="a text file: its first --max-tokens tokens are the test text")
    ap.add_argument("--train-len", type=int, default=256, help="the length the model was trained at (default 256, "
                    "the demo model's); linear, yarn and ntk scale by N / train-len")
    ap.add_argument("--contexts", default="256,512,1024,2048,4096,8192",
                    help="the context lengths N, comma-separated (default 256,512,1024,2048,4096,8192)")
    ap.add_argument("--methods", default="none,linear,yarn,ntk,dynamic",
                    help="of none, linear, yarn, ntk, dynamic (default: all five)")
    ap.add_argument("--bases", default="10000,100000,10000000",
                    help="plain RoPE with these thetas too, one method each (default 10000,100000,10000000; "
                         "empty: none)")
    ap.add_argument("--yarn-factor", type=float, help="a fixed YaRN factor (default: N / train-len)")
    ap.add_argument("--dynamic-factor", type=float, default=2.0, help="dynamic NTK's factor F (default 2)")
    ap.add_argument("--max-tokens", type=int, default=32768, help="tokens of the text to use (default 32768)")
    ap.add_argument("--run", default=os.path.join(ROOT, "run"), help="the ./run to use (default: this checkout's)")
    ap.add_argument("--out", help="the folder to write into (default: a new extrapolation-DATE-TIME here)")
    ap.add_argument("--from", dest="from_dir", metavar="DIR",
                    help="redraw the tables and plots of an earlier run in DIR, running nothing (MODEL, if given, "
                         "names the plots)")
    a = ap.parse_args()
    try:
        experiment(a, ap)
    except Failure as e:
        sys.exit(f"extrapolate.py: error: {e}")
    except OSError as e:
        sys.exit(f"extrapolate.py: error: {e.filename or ''}: {e.strerror}")


def experiment(a, ap):
    if a.from_dir:
        series = read_table(os.path.join(a.from_dir, "extrapolation.csv"))
        per = read_per_position(os.path.join(a.from_dir, "loss_by_position.csv"))
        return report(series, per, a, a.from_dir)
    if not a.model or not a.text:
        ap.print_usage(sys.stderr)
        raise Failure("give MODEL.bin and TEXT (or --from DIR)")
    for path, what in ((a.model, "model file"), (a.text, "text file")):
        if not os.path.isfile(path):
            raise Failure(f"{path}: no such {what}")
    if not (os.path.isfile(a.run) and os.access(a.run, os.X_OK)):
        raise Failure(f"{a.run}: no such program (build it with make, or give --run)")
    try:
        contexts = [int(c) for c in a.contexts.split(",")]
    except ValueError:
        raise Failure(f"--contexts {a.contexts!r}: not a comma-separated list of token counts")
    if not contexts or min(contexts) < 2 or contexts != sorted(set(contexts)):
        raise Failure(f"--contexts {a.contexts!r}: give increasing lengths of 2 tokens or more")
    if a.train_len < 1 or a.max_tokens < 2 or a.dynamic_factor <= 0 or (a.yarn_factor is not None and
                                                                          a.yarn_factor <= 0):
        raise Failure("--train-len, --max-tokens and the factors must be positive")
    runs = methods(a.methods, a.train_len, a.yarn_factor, a.dynamic_factor, a.bases)
    out = a.out or f"extrapolation-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    series, per = {}, {}
    longest = contexts[-1]
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = os.path.join(tmp, "ids.txt")
        n_ids = tokenize(a.run, a.model, a.text, a.max_tokens, ids_path)
        if longest > n_ids:
            raise Failure(f"{a.text}: {n_ids} tokens (BOS included, at most --max-tokens), shorter than the "
                          f"context of {longest}: give a longer text or shorter --contexts")
        os.makedirs(out, exist_ok=True)
        print(f"{a.text}: {n_ids} tokens (BOS included); writing into {out}", file=sys.stderr)
        total, done, t0 = len(runs) * len(contexts), 0, time.time()
        for name, flags in runs.items():
            series[name] = []
            for n in contexts:
                pp = os.path.join(tmp, "per_position.csv") if n == longest else None
                series[name].append(ppl(a.run, a.model, ids_path, n, flags(n), pp))
                if pp:
                    per[name] = read_per_position(pp)[None]
                done += 1
                left = (time.time() - t0) / done * (total - done)
                print(f"[{done}/{total}] {name} at {n}: ppl {series[name][-1]:.3f} ({time.time() - t0:.0f} s, "
                      f"about {left:.0f} s to go)", file=sys.stderr)
        freqs = {}
        for name, flags in runs.items():  # the frequencies each method uses at the longest context
            rows = list(csv.DictReader(io.StringIO(run_cmd([a.run, a.model, "-m", "rope", "-c", str(longest)] +
                                                          frequency_flags(flags(longest), a.train_len)))))
            freqs[name] = [(int(r["pair"]), float(r["scaled_wavelength"])) for r in rows]
    with open(os.path.join(out, "frequencies.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "context", "pair", "wavelength"])
        for name, rows in freqs.items():
            for pair, wl in rows:
                w.writerow([name, longest, pair, f"{wl:.6g}"])
    with open(os.path.join(out, "loss_by_position.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "context", "position", "count", "mean_nll"])
        for name, rows in per.items():
            for pos, count, nll in rows:
                w.writerow([name, longest, pos, count, f"{nll:.6f}"])
    report(series, {name: rows for name, rows in per.items()}, a, out, contexts)


def frequency_flags(flags, train_len):
    """a method's flags for -m rope: the training length as the original context it counts in"""
    return flags if "--yarn-orig-ctx" in flags else flags + ["--yarn-orig-ctx", str(train_len)]


def read_frequencies(path):
    out = {}
    if os.path.exists(path):
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                out.setdefault(r["method"], []).append((int(r["pair"]), float(r["wavelength"])))
    return out


def read_table(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return {"contexts": [int(c) for c in rows[0][1:]], **{r[0]: [float(v) for v in r[1:]] for r in rows[1:]}}


def read_per_position(path):
    """{method (None for ./run's own file): [(position, count, mean_nll)]}"""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault(r.get("method"), []).append((int(r["position"]), int(r["count"]), float(r["mean_nll"])))
    return out


def report(series, per, a, out, contexts=None):
    if contexts is None:
        contexts = series.pop("contexts")
    with open(os.path.join(out, "extrapolation.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method"] + contexts)
        for name, vals in series.items():
            w.writerow([name] + [f"{v:.4f}" for v in vals])
    lines = ["| method | " + " | ".join(str(c) for c in contexts) + " |",
             "|---|" + "---|" * len(contexts)]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |" for name, vals in series.items()]
    table = "\n".join(lines)
    with open(os.path.join(out, "extrapolation.md"), "w") as f:
        f.write(table + "\n")
    model = a.model or "the model"
    svg_plot(series, contexts, os.path.join(out, "extrapolation.svg"),
             f"{os.path.basename(model)}: perplexity by context length (trained at {a.train_len})")
    if per:
        longest = contexts[-1]
        buckets = max(1, longest // 128)  # the mean over runs of positions: 128 points a curve
        curves = {}
        for name, rows in per.items():
            pts = []
            for b0 in range(0, longest, buckets):
                grp = [(c, n) for p, c, n in rows if b0 <= p < b0 + buckets]
                if grp:
                    pts.append((b0 + buckets / 2, sum(c * n for c, n in grp) / sum(c for c, _ in grp)))
            curves[name] = pts
        edges = [0, a.train_len]  # the mean loss over [0, T), [T, 2T), [2T, 4T), ... of the window
        while edges[-1] < longest:
            edges.append(min(2 * edges[-1], longest))
        spans = list(zip(edges, edges[1:]))
        rows = ["| method | " + " | ".join(f"{lo}-{hi - 1}" for lo, hi in spans) + " |", "|---|" + "---|" * len(spans)]
        for name, pts in per.items():
            means = []
            for lo, hi in spans:
                grp = [(c, n) for p, c, n in pts if lo <= p < hi]
                means.append(f"{sum(c * n for c, n in grp) / sum(c for c, _ in grp):.3f}" if grp else "-")
            rows.append(f"| {name} | " + " | ".join(means) + " |")
        with open(os.path.join(out, "loss_by_position.md"), "w") as f:
            f.write("\n".join(rows) + "\n")
        print("\n".join(rows))
        line_plot(curves, os.path.join(out, "loss_by_position.svg"),
                  f"{os.path.basename(model)}: loss by position in windows of {longest}",
                  f"position in the window (mean over {buckets} positions)", "loss (nats per token)",
                  mark=a.train_len)
    freqs = read_frequencies(os.path.join(out, "frequencies.csv"))
    if freqs:
        line_plot(freqs, os.path.join(out, "frequencies.svg"),
                  f"{os.path.basename(model)}: RoPE wavelengths at a context of {contexts[-1]}",
                  "dimension pair", "wavelength (tokens, log scale)", log_y=True, hline=a.train_len)
    print(table)


if __name__ == "__main__":
    main()
