#!/usr/bin/env python3
"""Passkey retrieval: can a model find a number hidden in filler text, at each context length and
depth, with each RoPE method?

    python3 demo/passkey.py MODEL.bin [--contexts 512,1024,2048,4096] [--depths 0.1,0.5,0.9]
        [--trials 5] [--methods none,linear,yarn,ntk,dynamic] [--train-len 256] [--md FILE]

Each trial hides a random 5-digit key in filler text (the classic "The grass is green. ..." lines,
or --filler FILE) at a depth (0: the start, 1: the end) of a prompt of about N tokens, asks for it
at the end, and lets the model continue greedily (`./run MODEL -i PROMPT -n 12 -t 0 -c ...`, with
the method's flags); the trial passes when the continuation starts with the key (spaces aside).
The methods are demo/extrapolate.py's: none (plain RoPE), linear, yarn and ntk scale by N /
train-len, dynamic by --dynamic-factor. Prints the accuracy of each context x method over the
depths and trials, as a Markdown table (also to --md FILE). Seeded (--seed): the same keys every
run. Time: one generation of about N tokens per trial, context, depth and method.
Standard library only.
"""
import argparse
import os
import random
import sys

from extrapolate import Failure, methods, run_cmd  # (demo/extrapolate.py: the methods' flags)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there. ")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"


def n_tokens(run, model, text):
    return len(run_cmd([run, model, "-m", "tokenize", "-i", text]).split())


def sentences(filler):
    """the filler's sentences, each with its trailing space: the units a prompt is filled with"""
    parts = [p.strip() for p in filler.replace("。", "。\n").replace(". ", ".\n").splitlines() if p.strip()]
    return [p + " " for p in parts] or [filler]


def prompt(run, model, filler, key, n, depth, cache):
    """a prompt of about n tokens (BOS included) with the key after that share of the filler"""
    needle = NEEDLE.format(key=key)
    units = sentences(filler)
    if (n, filler) not in cache:  # how many filler sentences fit beside the intro, needle and question
        fixed = n_tokens(run, model, INTRO + needle + QUESTION) + 1
        sample = units[:200]  # (a long --filler file: its first sentences, repeated to 50 or more)
        reps = max(1, -(-50 // len(sample)))
        per_unit = n_tokens(run, model, "".join(sample) * reps) / (reps * len(sample))
        if n < fixed + per_unit:
            raise Failure(f"a context of {n} tokens: the question alone takes {fixed} of this model's tokens, "
                          f"a sentence of filler {per_unit:.0f}; give longer --contexts")
        cache[n, filler] = int((n - fixed) / per_unit)
    count = cache[n, filler]
    fill = [units[i % len(units)] for i in range(count)]
    before = int(round(count * depth))
    return INTRO + "".join(fill[:before]) + needle + "".join(fill[before:]) + QUESTION


def numbers(text, what, kind):
    try:
        vals = [kind(x) for x in text.split(",")]
    except ValueError:
        raise Failure(f"{what} {text!r}: not a comma-separated list of numbers")
    if not vals:
        raise Failure(f"{what}: empty")
    return vals


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a model file exported by export.py")
    ap.add_argument("--contexts", default="512,1024,2048,4096", help="prompt lengths in tokens (default 512,1024,2048,4096)")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="where the key goes, 0 to 1 (default 0.1,0.5,0.9)")
    ap.add_argument("--trials", type=int, default=5, help="keys per context, depth and method (default 5)")
    ap.add_argument("--methods", default="none,yarn,ntk,dynamic", help="of none, linear, yarn, ntk, dynamic "
                    "(default none,yarn,ntk,dynamic)")
    ap.add_argument("--train-len", type=int, default=256, help="the model's training length (default 256)")
    ap.add_argument("--dynamic-factor", type=float, default=2.0, help="dynamic NTK's factor (default 2)")
    ap.add_argument("--filler", help="a text file whose text is repeated as filler (default: the classic lines)")
    ap.add_argument("--seed", type=int, default=1, help="for the keys (default 1)")
    ap.add_argument("--run", default=os.path.join(ROOT, "run"), help="the ./run to use (default: this checkout's)")
    ap.add_argument("--md", help="also write the table to this file")
    a = ap.parse_args()
    try:
        passkey(a)
    except Failure as e:
        sys.exit(f"passkey.py: error: {e}")
    except OSError as e:
        sys.exit(f"passkey.py: error: {e.filename or ''}: {e.strerror}")


def passkey(a):
    if not os.path.isfile(a.model):
        raise Failure(f"{a.model}: no such model file")
    if not (os.path.isfile(a.run) and os.access(a.run, os.X_OK)):
        raise Failure(f"{a.run}: no such program (build it with make, or give --run)")
    contexts = numbers(a.contexts, "--contexts", int)
    depths = numbers(a.depths, "--depths", float)
    if min(contexts) < 32 or not all(0 <= d <= 1 for d in depths) or a.trials < 1 or a.train_len < 1:
        raise Failure("contexts of 32 tokens or more, depths from 0 to 1, and --trials and --train-len above 0")
    filler = FILLER
    if a.filler:
        with open(a.filler, encoding="utf-8") as f:
            filler = " ".join(f.read().split()) + " "
        if not filler.strip():
            raise Failure(f"{a.filler}: no text")
    runs = methods(a.methods, a.train_len, dynamic_factor=a.dynamic_factor)
    rng = random.Random(a.seed)
    keys = {(n, d, t): str(rng.randrange(10000, 100000)) for n in contexts for d in depths for t in range(a.trials)}
    cache, score = {}, {}
    total, done = len(contexts) * len(depths) * a.trials * len(runs), 0
    for n in contexts:
        for d in depths:
            for t in range(a.trials):
                key = keys[n, d, t]
                text = prompt(a.run, a.model, filler, key, n, d, cache)
                ctx = n_tokens(a.run, a.model, text) + 1 + 12  # BOS, the prompt and the answer
                for name, flags in runs.items():
                    out = run_cmd([a.run, a.model, "-i", text, "-n", "12", "-t", "0", "-c", str(ctx)] + flags(n))
                    ok = out.replace(" ", "").startswith(key)
                    score.setdefault((n, name), []).append(ok)
                    done += 1
                    print(f"[{done}/{total}] {name} at {n}, depth {d}: key {key}, answer {out.strip()[:20]!r}"
                          f"{' (found)' if ok else ''}", file=sys.stderr)
    lines = [f"| method | " + " | ".join(str(n) for n in contexts) + " |", "|---|" + "---|" * len(contexts)]
    for name in runs:
        lines.append(f"| {name} | " + " | ".join(f"{sum(score[n, name])}/{len(score[n, name])}" for n in contexts) + " |")
    table = "\n".join(lines)
    print(table)
    if a.md:
        with open(a.md, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
