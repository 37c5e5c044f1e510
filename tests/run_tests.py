#!/usr/bin/env python3
"""The minimind.c test suite (Python standard library only; no torch).

    python3 tests/run_tests.py ./run:tests/tokenizer_test:tests/kernel_test [./run-asan:... ...]

Runs every engine test against each binary given: RUN[:TOKENIZER_TEST[:KERNEL_TEST]]; a binary
given without a tokenizer driver gets the numerical tests only, and a spec with no RUN
(::KERNEL_TEST) the kernel tests only. A spec marked optional (?RUN...) is skipped when its files
are missing (make test marks the NEON builds, run under qemu, which it makes only where it can;
under CI=true a missing one is a failure), any other spec with missing files fails. make test
passes the normal build, the AddressSanitizer/UBSan build, the portable build (no fast kernels), a build without OpenMP,
the AVX2 build, the AVX-VNNI build (where the processor has it) and the NEON builds. Fixtures
come from tests/gen_fixtures.py (make fixtures); the MiniMind conformance cases in
../shared/conformance run when that folder exists.
The last line is "N passed, M failed, K skipped".
"""
import array
import csv
import io
import math
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
TMP = os.path.join(ROOT, "tests", "tmp")
SHARED = os.path.join(ROOT, "..", "shared")
EXPORT = [sys.executable, os.path.join(ROOT, "export.py")]
ENV = dict(os.environ, ASAN_OPTIONS="exitcode=99:detect_leaks=1",
           UBSAN_OPTIONS="halt_on_error=1:exitcode=98:print_stacktrace=1", OMP_WAIT_POLICY="passive")
TOL = {"f32": 1e-4, "f16": 5e-3, "bf16": 5e-3}

results = {"passed": 0, "failed": 0, "skipped": 0}


def report(name, ok, detail=""):
    detail = " | ".join(str(detail).splitlines())
    if ok is None:
        results["skipped"] += 1
        print(f"SKIP {name}: {detail}")
    elif ok:
        results["passed"] += 1
        print(f"PASS {name}" + (f"  ({detail})" if detail else ""))
    else:
        results["failed"] += 1
        print(f"FAIL {name}: {detail}")


def test(name):
    """Decorator-free helper: run fn, turn exceptions into failures."""
    def wrap(fn):
        try:
            ok, detail = fn()
        except Exception as e:  # a broken test is a failed test, not a crashed suite
            ok, detail = False, f"{type(e).__name__}: {e}"
        report(name, ok, detail)
    return wrap


def run(cmd, **kw):
    if "input" not in kw:  # (./run reads a prompt from a standard input that is not a terminal)
        kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, **kw)


def read_f32(path):
    a = array.array("f")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    return a


def rel_diff(out, ref, rows, vocab):
    """max |out - ref| / max |ref| over the stored rows (out has every row)."""
    worst = 0.0
    for i, r in enumerate(rows):
        o, e = out[r * vocab:(r + 1) * vocab], ref[i * vocab:(i + 1) * vocab]
        worst = max(worst, max(abs(a - b) for a, b in zip(o, e)))
    return worst / max(abs(x) for x in ref)


def argmax(v):
    return max(range(len(v)), key=v.__getitem__)


def sanitizer_clean(p):
    bad = ("Sanitizer", "runtime error:", "Segmentation", "core dumped")
    return p.returncode >= 0 and p.returncode not in (98, 99) and not any(b in p.stderr for b in bad)


def expect_error(p, *words):
    """A clean failure: exit 1, one 'error' line on stderr naming the problem, no sanitizer report."""
    lines = [l for l in p.stderr.strip().splitlines() if l]
    if not sanitizer_clean(p):
        return False, f"crash or sanitizer report (exit {p.returncode}): {p.stderr[-400:]}"
    if p.returncode != 1:
        return False, f"exit {p.returncode}, expected 1; stderr: {p.stderr[-300:]}"
    if not lines or "error" not in lines[-1]:
        return False, f"no error line: {p.stderr[-300:]}"
    if "Traceback" in p.stderr:
        return False, "Python traceback: " + p.stderr[-300:]
    missing = [w for w in words if w.lower() not in lines[-1].lower()]
    if missing:
        return False, f"error line lacks {missing}: {lines[-1]}"
    return True, lines[-1][:110]


def ids_arg(ids):
    return ",".join(map(str, ids))


# ----------------------------------------------------------------------------------------------
# Model files, exported once per (checkpoint, dtype, args) for all binaries

_exports = {}


def export(checkpoint, out_name, dtype="f32", args=(), tokenizer=None, cwd=FIX):
    """tokenizer: None, the fixtures' tokenizer; "", the one the checkpoint carries (GGUF)"""
    key = (checkpoint, dtype, tuple(args), tokenizer)
    if key not in _exports:
        out = os.path.join(TMP, out_name)
        tok = [] if tokenizer == "" else ["--tokenizer", tokenizer or os.path.join(FIX, "tokenizer")]
        p = subprocess.run(EXPORT + [checkpoint, out] + tok + ["--dtype", dtype] + list(args),
                           capture_output=True, text=True, cwd=cwd)
        if p.returncode != 0:
            raise RuntimeError(f"export of {checkpoint} failed: {p.stderr.strip()}")
        _exports[key] = out
    return _exports[key]


def logits(binary, model, ids, flags=(), name="out"):
    out = os.path.join(TMP, f"{name}.{os.path.basename(binary)}.f32")
    args = ["--ids", ids_arg(ids)] if len(ids) < 4000 else ["--ids", "@" + write_ids(ids)]
    p = run([binary, model, "-m", "logits", "-o", out] + args + list(flags))
    if p.returncode != 0 or not sanitizer_clean(p):
        raise RuntimeError(f"run exited {p.returncode}: {p.stderr[-500:]}")
    return read_f32(out)


def write_ids(ids):
    path = os.path.join(TMP, "ids.txt")
    with open(path, "w") as f:
        f.write(ids_arg(ids))
    return path


# ----------------------------------------------------------------------------------------------
# Parity with the reference: fixtures, every dtype; batched vs token-by-token; threads; ppl

def parity_tests(binary, cases):
    tag = os.path.basename(binary)
    for c in cases:
        ref = read_f32(os.path.join(FIX, c["logits"]))
        for dtype in c["dtypes"]:
            name = f"{tag}: parity {c['name']} {dtype}"

            @test(name)
            def _():
                model = export(c["checkpoint"], f"{c['name']}.{dtype}.bin", dtype, c["export_args"])
                out = logits(binary, model, c["ids"], c["flags"], c["name"])
                if dtype == "q8_0":
                    V = c["vocab"]
                    agree = sum(argmax(out[r * V:(r + 1) * V]) == argmax(ref[i * V:(i + 1) * V])
                                for i, r in enumerate(c["rows"]))
                    return agree == len(c["rows"]), f"top-1 agrees on {agree}/{len(c['rows'])} rows"
                d = rel_diff(out, ref, c["rows"], c["vocab"])
                return d < TOL[dtype], f"rel {d:.2e} < {TOL[dtype]:g}"


def gguf_cases():
    """tests/fixtures/gguf/cases.json (tests/gen_gguf_fixtures.py): GGUF files of fixture cases, each
    checked with llama.cpp when it was written"""
    with open(os.path.join(FIX, "gguf", "cases.json")) as f:
        return json.load(f)["cases"]


def gguf_parity_tests(binary, cases):
    tag = os.path.basename(binary)
    for g in gguf_cases():
        c = next(x for x in cases if x["name"] == g["twin"])

        @test(f"{tag}: parity {g['gguf']} ({g['arch']}, {g['weights']}; llama.cpp: top-1 {g['llama_cpp_top1']}, "
              f"rel {g['llama_cpp_rel_diff']:.1e}) as {g['export_dtype']}, its own tokenizer, vs {g['twin']}")
        def _():
            model = export(os.path.join(FIX, "gguf", g["gguf"]), f"{g['name']}.bin", g["export_dtype"], tokenizer="")
            out, ref, V = logits(binary, model, c["ids"], c["flags"], g["name"]), read_f32(
                os.path.join(FIX, c["logits"])), c["vocab"]
            agree = sum(argmax(out[r * V:(r + 1) * V]) == argmax(ref[i * V:(i + 1) * V]) for i, r in enumerate(c["rows"]))
            d = rel_diff(out, ref, c["rows"], V)
            ok = agree == len(c["rows"]) if g["weights"] == "q8_0" else d < TOL[g["weights"]]
            return ok, f"top-1 agrees on {agree}/{len(c['rows'])} rows, rel {d:.1e}"


def position_tests(binary, cases):
    """the position-encoding lab: loss by position, the frequency table, positions from an offset"""
    tag = os.path.basename(binary)
    c = next(x for x in cases if x["name"] == "m3_dense_yarn")  # 2100 ids
    model = export(c["checkpoint"], "m3_dense.f32.bin", "f32", c["export_args"])

    @test(f"{tag}: ppl --per-position: counts add up to N and their mean loss is ppl's (3 windows of 700)")
    def _():
        csv_path = os.path.join(TMP, "per_position.csv")
        p = run([binary, model, "-m", "ppl", "--csv", "-c", "700", "--per-position", csv_path, "--ids",
                 "@" + write_ids(c["ids"])])
        row = list(csv.DictReader(io.StringIO(p.stdout)))[0]
        per = list(csv.DictReader(open(csv_path)))
        n = sum(int(r["count"]) for r in per)
        mean = sum(int(r["count"]) * float(r["mean_nll"]) for r in per) / n
        ok = (p.returncode == 0 and n == int(row["tokens"]) and abs(mean / float(row["nll"]) - 1) < 1e-6
              and [int(r["position"]) for r in per] == list(range(699)) and int(per[0]["count"]) == 3)
        return ok, f"{len(per)} positions, N {n} vs {row['tokens']}, mean nll {mean:.8f} vs {row['nll']}"

    ids = c["ids"][:24]

    @test(f"{tag}: --pos-offset K: logits equal those at offset 0 up to the f32 rounding of the angles, "
          f"(K + n) 2^-24 rad")
    def _():
        base = logits(binary, model, ids, [], "off0")
        details = []
        for k in (1000, 100000):
            out = logits(binary, model, ids, ["--pos-offset", str(k)], "offk")
            d = rel_diff(out, base, range(len(ids)), c["vocab"])
            bound = (k + len(ids)) * 2.0 ** -24
            details.append(f"K {k}: rel {d:.1e} (bound {bound:.1e})")
            if not 0 < d <= bound:  # (0: the offset was not applied)
                return False, "; ".join(details)
        return True, "; ".join(details)

    @test(f"{tag}: -m rope: inverse frequencies, wavelengths, rotations, YaRN's ramp and NTK's base as defined")
    def _():
        hd, theta = 24, 1e6  # (m3_dense's head_dim and rope_theta)
        worst = 0.0
        for flags, scaled in ((["--yarn-orig-ctx", "512"], lambda i, f, r: f),
                              (["--rope-scaling", "yarn", "--rope-scale", "4", "--yarn-orig-ctx", "512"],
                               lambda i, f, r: f * ((1 - r) + r / 4)),
                              (["--rope-scaling", "ntk", "--rope-scale", "4"],
                               lambda i, f, r: 1 / (theta * 4 ** (hd / (hd - 2))) ** (2 * i / hd))):
            p = run([binary, model, "-m", "rope"] + flags)
            rows = list(csv.DictReader(io.StringIO(p.stdout)))
            if p.returncode != 0 or len(rows) != hd // 2:
                return False, f"{flags}: exit {p.returncode}, {len(rows)} rows: {p.stderr[-200:]}"
            C = 512 if "--yarn-orig-ctx" in flags else 2048
            for r in rows:
                i, f = int(r["pair"]), float(r["inv_freq"])
                ramp = float(r["ramp"]) if r["ramp"] else 0.0
                want = [(f, 1 / theta ** (2 * i / hd)), (float(r["wavelength"]), 2 * math.pi / f),
                        (float(r["rotations_in_original_context"]), C * f / (2 * math.pi)),
                        (float(r["scaled_inv_freq"]), scaled(i, f, ramp)),
                        (float(r["scaled_wavelength"]), 2 * math.pi / float(r["scaled_inv_freq"]))]
                worst = max([worst] + [abs(a / b - 1) for a, b in want])
            if "yarn" in flags and not (float(rows[0]["ramp"]) == 0 and float(rows[-1]["ramp"]) == 1):
                return False, "YaRN's ramp does not run from 0 (kept) to 1 (divided by F)"
        return worst < 1e-5, f"worst relative difference {worst:.1e} over 3 settings"


def consistency_tests(binary, cases):
    tag = os.path.basename(binary)
    for cname in ("m2_moe", "m3_dense", "m3_moe", "m3_untied"):
        c = next(x for x in cases if x["name"] == cname)

        @test(f"{tag}: blocks of tokens == token by token through the plain loops, {cname}")
        def _():
            model = export(c["checkpoint"], f"{c['name']}.f32.bin", "f32", c["export_args"])
            ref = logits(binary, model, c["ids"], ["--batch", "1", "--ref-kernels"], "ref")
            worst = 0.0
            for b in ("64", "5", "1"):  # one block, blocks that split the prompt, pure decode
                out = logits(binary, model, c["ids"], ["--batch", b], "b" + b)
                worst = max(worst, rel_diff(out, ref, range(len(c["ids"])), c["vocab"]))
            return worst < 1e-5, f"rel {worst:.1e} over --batch 64/5/1"

        for dtype in ("f32", "f16", "bf16", "q8_0"):  # with parity at 2 threads: parity at 1 too
            @test(f"{tag}: threads 1 and 2 give identical logits, {cname} {dtype}")
            def _():
                model = export(c["checkpoint"], f"{c['name']}.{dtype}.bin", dtype, c["export_args"])
                # single tokens (a decoded token's team, kernels.h); dot-product tiles; prompt tiles
                # (every fixture prompt has 16+ tokens)
                for b in ("1", "7", "64"):
                    t1 = logits(binary, model, c["ids"], ["--threads", "1", "--batch", b], "t1")
                    t2 = logits(binary, model, c["ids"], ["--threads", "2", "--batch", b], "t2")
                    if t1 != t2:
                        return False, f"outputs differ at --batch {b}"
                return True, "bit-identical at --batch 1, 7 and 64"

    c = next(x for x in cases if x["name"] == "m2_moe")

    @test(f"{tag}: ppl mode equals the reference perplexity")
    def _():
        model = export(c["checkpoint"], "m2_moe.f32.bin", "f32")
        p = run([binary, model, "-m", "ppl", "--ids", ids_arg(c["ids"])])
        line = p.stdout.strip().splitlines()[-1]
        got = float(line.split()[2])
        ok = line.endswith(f"over {len(c['ids']) - 1} tokens") and abs(got / c["ppl"] - 1) < 1e-4
        return ok, f"{line} vs reference {c['ppl']:.6f}"

    @test(f"{tag}: ppl windows (-c) equal separate runs of each window")
    def _():
        model = export(c["checkpoint"], "m2_moe.f32.bin", "f32")
        ids, W = c["ids"], 16
        whole = run([binary, model, "-m", "ppl", "-c", str(W), "--ids", ids_arg(ids)])
        nll, n = 0.0, 0
        import math
        for s in range(0, len(ids), W):
            win = ids[s:s + W]
            if len(win) < 2:
                continue
            p = run([binary, model, "-m", "ppl", "--ids", ids_arg(win)])
            fields = p.stdout.split()
            k = int(fields[4])
            nll += math.log(float(fields[2])) * k
            n += k
        got = whole.stdout.split()
        ok = int(got[4]) == n and abs(float(got[2]) / math.exp(nll / n) - 1) < 1e-5
        return ok, f"{whole.stdout.strip()} vs {math.exp(nll / n):.6f} over {n}"


def conformance_tests(binary):
    tag = os.path.basename(binary)
    conf = os.path.join(SHARED, "conformance")
    if not os.path.isdir(conf):
        report(f"{tag}: MiniMind conformance cases", None, "../shared/conformance is absent")
        return
    # and ../shared/interop: the same cases' weights in the forms other tools write
    interop = os.path.join(SHARED, "interop")
    cases = [("conformance", conf, c) for c in sorted(os.listdir(conf))]
    cases += [("interop", interop, c) for c in sorted(os.listdir(interop))] if os.path.isdir(interop) else []
    for kind, root, case in cases:
        folder = os.path.join(root, case)
        if not os.path.isfile(os.path.join(folder, "expected.json")):
            continue

        @test(f"{tag}: {kind} {case}")
        def _():
            with open(os.path.join(folder, "expected.json")) as f:
                exp = json.load(f)
            tok = "" if exp["tokenizer"] is None else os.path.normpath(os.path.join(folder, exp["tokenizer"]))
            if tok and not os.path.isdir(tok):  # ("": the checkpoint's own, a GGUF's)
                return None, f"tokenizer {tok} absent"
            model = export(os.path.normpath(os.path.join(folder, exp["checkpoint"])),
                           f"conf_{case}.bin", exp["export_dtype"], tokenizer=tok)
            with open(os.path.join(folder, "ids.txt")) as f:
                ids = [int(x) for x in f.read().replace(",", " ").split()]
            flags = open(os.path.join(folder, "flags.txt")).read().split()
            out = logits(binary, model, ids, flags, "conf")
            V = exp["shape"][1]
            rows = list(range(len(ids)))
            if exp.get("positions"):
                with open(os.path.join(folder, exp["positions"])) as f:
                    rows = [int(x) for x in f.read().replace(",", " ").split()]
            if len(out) != len(ids) * V:
                return False, f"{len(out) // V} rows, expected {len(ids)}"
            d = rel_diff(out, read_f32(os.path.join(folder, "logits.f32")), rows, V)
            return d < exp["tolerance"], f"rel {d:.2e} < {exp['tolerance']:g}"


    for case in sorted(os.listdir(interop)) if os.path.isdir(interop) else []:
        exp_path = os.path.join(interop, case, "expected.json")
        if not os.path.isfile(exp_path):
            continue
        with open(exp_path) as f:
            exp = json.load(f)
        if exp.get("tokenizer") is not None or not exp["checkpoint"].endswith(".gguf"):
            continue
        twin = exp.get("note", "").split(" ")[0]  # the conformance case whose weights it has

        @test(f"{tag}: interop {case}: the GGUF's own tokenizer == {twin}'s tokenizer.json (ids, bos/eos/pad, template)")
        def _():
            with open(os.path.join(conf, twin, "expected.json")) as f:
                twin_exp = json.load(f)
            twin_folder = os.path.join(conf, twin)
            ours = export(os.path.join(interop, case, exp["checkpoint"]), f"conf_{case}.bin", exp["export_dtype"],
                          tokenizer="")
            theirs = export(os.path.join(twin_folder, twin_exp["checkpoint"]), f"conf_{twin}.bin",
                            twin_exp["export_dtype"], tokenizer=os.path.normpath(os.path.join(twin_folder,
                                                                                              twin_exp["tokenizer"])))
            text = "<|im_start|>user\n你好，世界! Hello — 🙂 tabs\tand  spaces<|im_end|>\n<think>x</think>"
            a, b = (run([binary, m, "-m", "tokenize", "-i", text]) for m in (ours, theirs))
            fields = ("bos_id", "eos_id", "pad_id", "chat_template")
            ha, hb = (HDR.unpack_from(open(m, "rb").read(), 0) for m in (ours, theirs))
            same_hdr = all(ha[F[k]] == hb[F[k]] for k in fields)
            ok = a.returncode == 0 and a.stdout == b.stdout and len(a.stdout.split()) > 5 and same_hdr
            return ok, (f"{len(a.stdout.split())} ids alike; " if a.stdout == b.stdout else "ids differ; ") + \
                ", ".join(f"{k} {ha[F[k]]}/{hb[F[k]]}" for k in fields)


# ----------------------------------------------------------------------------------------------
# Hostile model files: every mutation is a clean one-line error, never a crash

HDR = struct.Struct("<32I4Q")   # mm_header's first 160 bytes: 32 uint32/float fields, 4 uint64
F = {n: i for i, n in enumerate(
    "magic version header_size generation flags dim n_layers n_heads n_kv_heads head_dim "
    "hidden_dim vocab_size max_seq_len rms_eps rope_theta n_experts n_experts_per_tok "
    "n_shared_experts moe_hidden_dim moe_norm rope_scaling rope_factor yarn_orig_ctx "
    "yarn_beta_fast yarn_beta_slow yarn_attn_factor bos_id eos_id pad_id chat_template "
    "n_tensors reserved0 tokenizer_offset tokenizer_size tensor_table_offset file_size".split())}
ENTRY = struct.Struct("<64sII4IQQ")


def mutate_header(data, **fields):
    vals = list(HDR.unpack_from(data, 0))
    for k, v in fields.items():
        if isinstance(v, float):
            v = struct.unpack("<I", struct.pack("<f", v))[0]
        vals[F[k]] = v
    out = bytearray(data)
    HDR.pack_into(out, 0, *vals)
    return bytes(out)


def mutate_entry(data, index, **fields):
    vals = list(HDR.unpack_from(data, 0))
    at = vals[F["tensor_table_offset"]] + index * ENTRY.size
    name, dtype, ndims, s0, s1, s2, s3, off, size = ENTRY.unpack_from(data, at)
    e = dict(name=name, dtype=dtype, n_dims=ndims, shape0=s0, shape1=s1, offset=off, size=size)
    e.update(fields)
    out = bytearray(data)
    ENTRY.pack_into(out, at, e["name"], e["dtype"], e["n_dims"], e["shape0"], e["shape1"], s2, s3,
                    e["offset"], e["size"])
    return bytes(out)


def entry_of(data, name):
    """(index, size) of the tensor table entry called name"""
    vals = HDR.unpack_from(data, 0)
    for i in range(vals[F["n_tensors"]]):
        e = ENTRY.unpack_from(data, vals[F["tensor_table_offset"]] + i * ENTRY.size)
        if e[0].rstrip(b"\0") == name.encode():
            return i, e[8]
    raise KeyError(name)


def as_f16(data, name):
    """the file with tensor `name` declared f16 (its first half read as such): a well-formed file
    whose matrices differ in dtype"""
    i, size = entry_of(data, name)
    return mutate_entry(data, i, dtype=1, size=size // 2)


def hostile_tests(binary):
    tag = os.path.basename(binary)
    good_path = export(os.path.join(FIX, "m3_moe.pth"), "m3_moe.f32.bin", "f32")
    with open(good_path, "rb") as f:
        good = f.read()
    size = len(good)
    untied = open(export(os.path.join(FIX, "m3_untied.safetensors"), "m3_untied.f32.bin", "f32"), "rb").read()
    q8 = open(export(os.path.join(FIX, "m3_moe.pth"), "m3_moe.q8_0.bin", "q8_0"), "rb").read()
    cases = [
        ("version 1 with q8_0 tensors (the old row layout)", mutate_header(q8, version=1),
         ["q8_0", "version 1", "re-export"]),
        ("empty file", b"", ["too short"]),
        ("truncated header", good[:100], ["too short"]),
        ("truncated tensor data", good[:size - 1000], ["truncated"]),
        ("truncated to the header", good[:256], ["truncated"]),
        ("one byte appended", good + b"\0", ["header says"]),
        ("wrong magic", b"GGUF" + good[4:], ["not a minimind.c model file"]),
        ("wrong version", mutate_header(good, version=99), ["version 99"]),
        ("wrong header size", mutate_header(good, header_size=300), ["header_size"]),
        ("n_tensors overflows", mutate_header(good, n_tensors=0xFFFFFFFF), ["tensor table"]),
        ("tensor table offset overflows", mutate_header(good, tensor_table_offset=2**64 - 8), ["tensor table"]),
        ("tokenizer block past the end", mutate_header(good, tokenizer_size=2**63), ["tokenizer block"]),
        ("dim 0", mutate_header(good, dim=0), ["dim"]),
        ("n_kv_heads not dividing n_heads", mutate_header(good, n_kv_heads=3), ["n_kv_heads"]),
        ("odd head_dim", mutate_header(good, head_dim=15), ["head_dim"]),
        ("huge vocab", mutate_header(good, vocab_size=2**31), ["vocab_size"]),
        ("huge n_layers", mutate_header(good, n_layers=10**6), ["n_layers"]),
        ("more layers than tensors", mutate_header(good, n_layers=3), ["missing tensor model.layers.2."]),
        ("NaN rms_eps", mutate_header(good, rms_eps=float("nan")), ["rms_eps"]),
        ("rope_theta 0", mutate_header(good, rope_theta=0.0), ["rope_theta"]),
        ("unknown generation", mutate_header(good, generation=7), ["generation"]),
        ("unknown flag bit", mutate_header(good, flags=0xFF), ["flags"]),
        ("top-k above expert count", mutate_header(good, n_experts_per_tok=9), ["n_experts_per_tok"]),
        ("bos id outside vocab", mutate_header(good, bos_id=10**6), ["outside the vocab"]),
        ("tensor shape mismatch", mutate_entry(good, 0, shape1=65), ["model.embed_tokens.weight", "expected"]),
        ("unsupported dtype", mutate_entry(good, 1, dtype=9), ["dtype"]),
        ("norm weight not f32", mutate_entry(good, 1, dtype=1, size=128), ["f32"]),
        ("tensor size mismatch", mutate_entry(good, 0, size=12), ["bytes"]),
        ("tensor offset past the end", mutate_entry(good, 2, offset=(size + 64) // 64 * 64), ["outside"]),
        ("tensor offset overflows", mutate_entry(good, 2, offset=2**64 - 64), ["outside"]),
        ("tensor offset misaligned", mutate_entry(good, 2, offset=64 * 3 + 4), ["aligned"]),
        ("duplicate tensor name", mutate_entry(good, 2, name=b"model.embed_tokens.weight"), ["twice"]),
        ("tensor renamed", mutate_entry(good, 2, name=b"model.layers.0.bogus.weight"), ["missing tensor"]),
        ("name without NUL", mutate_entry(good, 2, name=b"x" * 64), ["missing tensor"]),
        ("k_proj's dtype differs from q_proj's", as_f16(good, "model.layers.1.self_attn.k_proj.weight"),
         ["model.layers.1.self_attn.k_proj.weight", "dtype f16", "expected f32"]),
        ("an expert's up_proj dtype differs from its gate_proj's",
         as_f16(good, "model.layers.0.mlp.experts.3.up_proj.weight"),
         ["model.layers.0.mlp.experts.3.up_proj.weight", "dtype f16", "expected f32"]),
        ("unknown tensor", mutate_header(untied, flags=struct.unpack_from("<I", untied, 16)[0] | 2),
         ["unknown tensor lm_head.weight"]),
    ]
    for label, data, words in cases:
        @test(f"{tag}: hostile model file: {label}")
        def _():
            path = os.path.join(TMP, "hostile.bin")
            with open(path, "wb") as f:
                f.write(data)
            return expect_error(run([binary, path, "-m", "logits", "--ids", "1,2,3", "-o",
                                     os.path.join(TMP, "h.f32")]), *words)

    @test(f"{tag}: a version 1 file without q8_0 tensors still loads (only q8_0 changed in version 2)")
    def _():
        path = os.path.join(TMP, "v1.bin")
        with open(path, "wb") as f:
            f.write(mutate_header(good, version=1))
        out1, out2 = os.path.join(TMP, "v1.f32"), os.path.join(TMP, "v2.f32")
        p1 = run([binary, path, "-m", "logits", "--ids", "1,2,3", "-o", out1])
        p2 = run([binary, good_path, "-m", "logits", "--ids", "1,2,3", "-o", out2])
        same = p1.returncode == 0 and p2.returncode == 0 and open(out1, "rb").read() == open(out2, "rb").read()
        return same, "same logits as version 2" if same else p1.stderr.strip()[-200:]

    @test(f"{tag}: 150 random byte mutations of header and table: no crash")
    def _():
        rng = random.Random(1234)
        table_end = struct.unpack_from("<Q", good, 144)[0] + 104 * struct.unpack_from("<I", good, 120)[0]
        bad = []
        for i in range(150):
            data = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(table_end if rng.random() < 0.5 else 256)
                data[at] = rng.randrange(256)
            path = os.path.join(TMP, "fuzz.bin")
            with open(path, "wb") as f:
                f.write(data)
            p = run([binary, path, "-m", "logits", "--ids", "1,2,3", "-o", os.path.join(TMP, "f.f32")])
            if not sanitizer_clean(p) or p.returncode not in (0, 1) or \
                    (p.returncode == 1 and "error" not in p.stderr):
                bad.append((i, p.returncode, p.stderr[-200:]))
        return not bad, f"{len(bad)} bad: {bad[:1]}" if bad else "all clean"


# ----------------------------------------------------------------------------------------------
# Limits that protect the user: memory for the context, prompts longer than it, Ctrl-C, NaN

def tensor_data(data, name):
    """(offset, size) of a tensor in a model file"""
    hdr = HDR.unpack_from(data, 0)
    for i in range(hdr[F["n_tensors"]]):
        e = ENTRY.unpack_from(data, hdr[F["tensor_table_offset"]] + i * ENTRY.size)
        if e[0].rstrip(b"\0") == name.encode():
            return e[7], e[8]
    raise KeyError(name)


def limits_tests(binary):
    tag = os.path.basename(binary)
    demo = os.path.join(ROOT, "demo", "model.bin")
    model = export(os.path.join(FIX, "m3_moe.pth"), "m3_moe.f32.bin", "f32")

    def kv_bytes(path, ctx, elem=4):  # whole pages of 256 positions (kernels.h, KV_PAGE)
        h = HDR.unpack_from(open(path, "rb").read(256), 0)
        return 2 * h[F["n_layers"]] * -(-ctx // 256) * 256 * h[F["n_kv_heads"]] * h[F["head_dim"]] * elem

    @test(f"{tag}: a context larger than this machine's memory is refused up front, with the bytes it needs")
    def _():
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        kv = kv_bytes(demo, 1 << 24)
        if kv <= mem:
            return None, f"this machine has {mem} bytes, more than the {kv} the largest -c needs"
        t0 = time.time()
        p = run([binary, demo, "-i", "x", "-n", "1", "-c", str(1 << 24)])
        ok, detail = expect_error(p, "16777216 positions", "bytes of memory", "smaller -c")
        need = re.search(r"needs (\d+) bytes", p.stderr)
        if ok and not (need and int(need.group(1)) >= kv and str(mem) in p.stderr and time.time() - t0 < 20):
            ok, detail = False, f"needs {need and need.group(1)}, expected >= {kv} vs {mem}: {p.stderr[-200:]}"
        return ok, detail

    if "asan" not in tag:  # (AddressSanitizer reserves terabytes of address space: no ulimit -v)
        @test(f"{tag}: under ulimit -v, a context beyond the address space is refused up front")
        def _():
            limit = 2 << 30
            p = subprocess.run([binary, demo, "-i", "x", "-n", "1", "-c", "1000000"], capture_output=True,
                               text=True, env=ENV, timeout=60,
                               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
            ok, detail = expect_error(p, "1000000 positions", "ulimit -v")
            if ok and str(kv_bytes(demo, 1000000)) not in p.stderr:
                ok, detail = False, f"the KV cache's {kv_bytes(demo, 1000000)} bytes not named: {p.stderr}"
            return ok, detail

    @test(f"{tag}: a prompt file longer than the context is an error (1 MB of text, -c 16)")
    def _():
        path = os.path.join(TMP, "long_prompt.txt")
        with open(path, "w") as f:
            f.write("the quick brown fox jumps over the lazy dog. " * 23000)
        return expect_error(run([binary, model, "-f", path, "-c", "16", "-n", "1"]),
                            "does not fit the context of 16")

    @test(f"{tag}: Ctrl-C stops generation cleanly: the line and stats are finished, then death by SIGINT")
    def _():
        p = subprocess.Popen([binary, demo, "-i", "春", "-n", str(1 << 24), "-s", "1"], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([p.stdout], [], [], 60)  # some text has come out: generating
        if ready:
            os.read(p.stdout.fileno(), 1)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        err = err.decode(errors="replace")
        ok = (ready and p.returncode == -signal.SIGINT and "[interrupted]" in err and "generated" in err
              and out.endswith(b"\n") and "Sanitizer" not in err and "runtime error" not in err)
        return ok, f"exit {p.returncode}: " + err.strip().replace("\n", " | ")[-150:]

    @test(f"{tag}: NaN weights: generation stops with an error, not garbage or a crash")
    def _():
        data = bytearray(open(model, "rb").read())
        off, size = tensor_data(data, "model.norm.weight")
        data[off:off + size] = struct.pack("<f", float("nan")) * (size // 4)
        path = os.path.join(TMP, "nan.bin")
        with open(path, "wb") as f:
            f.write(data)
        return expect_error(run([binary, path, "-i", "the", "-n", "4", "-s", "1"]), "NaN logit")

    @test(f"{tag}: weights that overflow f32: ppl stops with an error, not a NaN or infinite perplexity")
    def _():
        data = bytearray(open(model, "rb").read())
        off, size = tensor_data(data, "model.norm.weight")
        data[off:off + size] = struct.pack("<f", 1e37) * (size // 4)  # logits past f32's 3.4e38
        path = os.path.join(TMP, "overflow.bin")
        with open(path, "wb") as f:
            f.write(data)
        return expect_error(run([binary, path, "-m", "ppl", "-i", "the cat sat on the mat"]), "logit for token")

    @test(f"{tag}: a huge perplexity prints with an exponent, not as a 60-digit number")
    def _():
        data = bytearray(open(model, "rb").read())
        off, size = tensor_data(data, "model.norm.weight")
        data[off:off + size] = struct.pack("<f", 4.0) * (size // 4)  # sharp logits: ppl about 1e62
        path = os.path.join(TMP, "sharp.bin")
        with open(path, "wb") as f:
            f.write(data)
        p = run([binary, path, "-m", "ppl", "-i", "the cat sat on the mat"])
        q = run([binary, path, "-m", "ppl", "-i", "the cat sat on the mat", "--csv"])
        m = re.fullmatch(r"ppl = (\d\.\d{6}e\+\d+) over \d+ tokens", p.stdout.strip())
        rows = list(csv.DictReader(io.StringIO(q.stdout)))
        ok = p.returncode == 0 and m is not None and float(m.group(1)) > 1e6 and \
            rows and rows[0]["ppl"] == m.group(1)
        return ok, repr(p.stdout.strip())

    @test(f"{tag}: an error quoting a newline stays on one line")
    def _():
        p = run([binary, model, "-m", "da\nnce", "-i", "x"])
        ok, detail = expect_error(p, "da\\nnce")
        if ok and len(p.stderr.strip().splitlines()) != 1:
            ok, detail = False, f"{len(p.stderr.strip().splitlines())} lines: {p.stderr!r}"
        return ok, detail


# ----------------------------------------------------------------------------------------------
# What the process may use: threads and memory (CPU affinity, OMP_NUM_THREADS, cgroup limits),
# and a KV cache that costs only the positions used

def peak_rss_mb(p):
    m = re.search(r"peak RSS ([0-9.]+) MB", p.stderr)
    return float(m.group(1)) if m else None


def in_cgroup(controller, v1, v2):
    """A preexec_fn that moves the child into a new cgroup under this process's own (v1's
    `controller` with the settings v1 {file: value}, else v2 with v2), and a cleanup. None where
    this process cannot make one (not root, no writable hierarchy)."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if ctrls and controller not in ctrls.split(","):
            continue
        roots = [f"/sys/fs/cgroup/{controller}"] if ctrls else ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        for root in roots:
            d = os.path.join(root + path, f"minimind-test-{os.getpid()}")
            try:
                os.mkdir(d)
            except OSError:
                continue
            try:
                for k, v in (v1 if ctrls else v2).items():
                    with open(os.path.join(d, k), "w") as f:
                        f.write(v)
            except OSError:
                os.rmdir(d)
                continue

            def enter(d=d):
                with open(os.path.join(d, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            return enter, lambda d=d: os.rmdir(d)
    return None


def single_thread_tests(binary):
    """A build without OpenMP: --threads above 1 is an error, not ignored."""
    tag = os.path.basename(binary)
    cmd = [binary, os.path.join(ROOT, "demo", "model.bin"), "-i", "春", "-n", "4", "-s", "1"]

    @test(f"{tag}: threads: --threads above 1 is an error in a build without OpenMP")
    def _():
        ok, detail = expect_error(run(cmd + ["--threads", "2"]), "--threads 2", "without OpenMP")
        if ok and run(cmd + ["--threads", "1"]).returncode != 0:
            ok, detail = False, "--threads 1 refused"
        return ok, detail


def machine_tests(binary):
    tag = os.path.basename(binary)
    demo = os.path.join(ROOT, "demo", "model.bin")
    cmd = [binary, demo, "-i", "春眠不覺曉，", "-n", "48", "-s", "42"]  # make run's
    ncpu = len(os.sched_getaffinity(0))

    @test(f"{tag}: the default context costs only the positions used: peak RSS of make run's command "
          "within 4 MB of -c 64's")
    def _():
        a, b = run(cmd + ["-v"]), run(cmd + ["-v", "-c", "64"])
        ra, rb = peak_rss_mb(a), peak_rss_mb(b)
        ok = a.returncode == b.returncode == 0 and ra is not None and rb is not None and ra - rb < 4 and \
            a.stdout == b.stdout and "for 32768 positions" in a.stderr
        return ok, f"{ra} MB at the default context (32768), {rb} MB at -c 64"

    @test(f"{tag}: threads: OMP_NUM_THREADS fixes the count when --threads is not given; --threads wins")
    def _():
        env = dict(ENV, OMP_NUM_THREADS="1")
        a = subprocess.run(cmd + ["-v"], capture_output=True, text=True, env=env, timeout=120)
        b = subprocess.run(cmd + ["-v", "--threads", "2"], capture_output=True, text=True, env=env,
                           timeout=120)
        c = run(cmd + ["-v"])
        tuned = f"threads up to {ncpu}," if ncpu > 1 else "threads 1,"
        ok = "threads 1," in a.stderr and "threads 2," in b.stderr and tuned in c.stderr and \
            "threads for" not in a.stderr and a.stdout == b.stdout == c.stdout
        return ok, f"{ncpu} usable CPUs: " + "; ".join(re.findall(r"threads [a-z ]*\d+", a.stderr + b.stderr
                                                                         + c.stderr))

    @test(f"{tag}: threads: more than the usable CPUs is a one-line warning, and the output is the same")
    def _():
        a = run(cmd + ["--threads", str(ncpu + 2)])
        b = run(cmd + ["--threads", "1"])
        warn = [l for l in a.stderr.splitlines() if "warning" in l]
        ok = a.returncode == 0 and len(warn) == 1 and f"{ncpu} CPUs" in warn[0] and a.stdout == b.stdout
        return ok, warn[0] if warn else a.stderr[-200:]

    @test(f"{tag}: threads: with a busy process beside it, the measured thread count gives the same "
          "tokens as --threads 1 and 2 (generate and ppl)")
    def _():
        gen = [binary, demo, "-i", "春", "-n", "600", "-s", "7", "-c", "640"]
        text = os.path.join(TMP, "heldout_part.txt")
        with open(os.path.join(ROOT, "demo", "heldout.txt"), encoding="utf-8") as f, \
                open(text, "w", encoding="utf-8") as g:
            g.write(f.read()[:3000])
        ppl = [binary, demo, "-m", "ppl", "-f", text, "-c", "128"]
        ref = [run(gen + ["--threads", "1"]), run(gen + ["--threads", "2"]),
               run(ppl + ["--threads", "1"]), run(ppl + ["--threads", "2"])]
        got = [run(gen + ["-v"]), run(ppl + ["-v"])]  # (idle: probes of fewer threads)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            got += [run(gen + ["-v"]), run(ppl + ["-v"])]
        finally:
            busy.kill()
            busy.wait()
        ok = all(p.returncode == 0 for p in ref + got) and len(ref[0].stdout) > 100 and \
            got[0].stdout == got[2].stdout == ref[0].stdout == ref[1].stdout and \
            got[1].stdout == got[3].stdout == ref[2].stdout == ref[3].stdout
        probes = sum(int(n) for p in got for n in re.findall(r"(\d+) probes", p.stderr))
        switches = sum(int(n) for p in got for n in re.findall(r"(\d+) switches", p.stderr))
        return ok, f"{probes} probes, {switches} switches of thread count in the measured runs"

    @test(f"{tag}: threads: the default count is no more than a cgroup's CPU quota (half a CPU: 1)")
    def _():
        group = in_cgroup("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"},
                          {"cpu.max": "50000 100000"})
        if group is None:
            return None, "cannot make a cpu cgroup here (needs root and a writable cgroup hierarchy)"
        enter, remove = group
        try:
            a = subprocess.run(cmd + ["-v"], capture_output=True, text=True, env=ENV, timeout=120,
                               preexec_fn=enter)
            b = subprocess.run(cmd + ["--threads", "2"], capture_output=True, text=True, env=ENV,
                               timeout=120, preexec_fn=enter)
        finally:
            remove()
        ok = a.returncode == b.returncode == 0 and "threads 1," in a.stderr and \
            "the 1 CPUs this process may use" in b.stderr and a.stdout == b.stdout
        return ok, "; ".join(re.findall(r"threads [a-z ]*\d+|warning.*", a.stderr + b.stderr))[:200]

    if "asan" in tag:  # (AddressSanitizer's shadow memory would count against the limit)
        return

    @test(f"{tag}: a cgroup's memory limit: the default context is cut to fit and said; -c beyond it is "
          "an error naming the limit")
    def _():
        group = in_cgroup("memory", {"memory.limit_in_bytes": str(64 << 20)}, {"memory.max": str(64 << 20)})
        if group is None:
            return None, "cannot make a memory cgroup here (needs root and a writable cgroup hierarchy)"
        enter, remove = group
        try:
            a = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120, preexec_fn=enter)
            b = subprocess.run(cmd + ["-c", "32768"], capture_output=True, text=True, env=ENV, timeout=120,
                               preexec_fn=enter)
        finally:
            remove()
        note = [l for l in a.stderr.splitlines() if "note" in l]
        cut = re.search(r"using -c (\d+)", note[0]) if note else None
        ok = a.returncode == 0 and cut and 1024 < int(cut.group(1)) < 32768 and "this cgroup's limit leaves" in note[0] \
            and a.stdout == run(cmd).stdout
        ok2, detail = expect_error(b, "32768 positions", "this cgroup's limit leaves", "smaller -c")
        return ok and ok2, (note[0][:150] if note else a.stderr[-150:]) + " | " + detail


# ----------------------------------------------------------------------------------------------
# Command-line errors

def cli_tests(binary, cases):
    tag = os.path.basename(binary)
    model = export(os.path.join(FIX, "m3_moe.pth"), "m3_moe.f32.bin", "f32")
    out = os.path.join(TMP, "cli.f32")
    ok_args = [model, "-m", "logits", "-o", out, "--ids", "1,2,3"]

    @test(f"{tag}: --help lists every flag with its default")
    def _():
        p = run([binary, "--help"])
        flags = ["-m", "-i", "-f", "-n", "-t", "-p", "-k", "--repeat-penalty", "-s", "-y", "--think",
                 "--show-tokens", "--csv", "--history", "--verbose-prompt", "--messages", "--tools", "--ids", "-o",
                 "--ctx", "--threads",
                 "--batch", "--rope-base", "--ref-kernels", "--row-bits", "--per-position", "--pos-offset", "--no-rope",
                 "--rope-scaling", "--rope-scale", "--yarn-orig-ctx", "--yarn-beta-fast",
                 "--yarn-beta-slow", "--yarn-attn-factor", "--verbose", "--version", "--help"]
        missing = [f for f in flags if f not in p.stdout]
        return p.returncode == 0 and not missing, f"missing {missing}" if missing else "all listed"

    bad = [
        ("no arguments", [], ["no model file"]),
        ("missing model file", [os.path.join(TMP, "nope.bin"), "--ids", "1"], ["nope.bin", "cannot open"]),
        ("unknown flag", ok_args + ["--frobnicate", "1"], ["unknown option", "--frobnicate"]),
        ("flag without value", ok_args + ["-c"], ["needs a value"]),
        ("unknown mode", [model, "-m", "dance", "--ids", "1"], ["-m", "dance"]),
        ("ctx 0", ok_args + ["-c", "0"], ["-c", "'0'"]),
        ("ctx not a number", ok_args + ["--ctx", "12x"], ["--ctx", "12x"]),
        ("threads 0", ok_args + ["--threads", "0"], ["--threads"]),
        ("negative rope base", ok_args + ["--rope-base", "-5"], ["--rope-base"]),
        ("NaN rope scale", ok_args + ["--rope-scale", "nan"], ["--rope-scale"]),
        ("unknown rope scaling", ok_args + ["--rope-scaling", "ntk-by-parts"], ["--rope-scaling", "ntk-by-parts"]),
        ("linear scaling without a factor", ok_args + ["--rope-scaling", "linear"], ["--rope-scale"]),
        ("id not a number", [model, "-o", out, "--ids", "1,two,3"], ["--ids", "two"]),
        ("id outside the vocab", [model, "-o", out, "--ids", "1,320"], ["320", "vocab"]),
        ("negative id", [model, "-o", out, "--ids", "1,-4"], ["--ids"]),
        ("no ids", [model, "-o", out, "--ids", " , "], ["no token ids"]),
        ("ids file missing", [model, "-o", out, "--ids", "@" + os.path.join(TMP, "none.txt")], ["none.txt"]),
        ("prompt longer than the context", [model, "-m", "logits", "-o", out, "--ids", "1,2,3,4,5", "-c", "4"],
         ["5 tokens", "context of 4"]),
        ("logits without -o", [model, "-m", "logits", "--ids", "1,2"], ["-o"]),
        ("output file not writable", [model, "-m", "logits", "-o", "/nonexistent/dir/x.f32", "--ids", "1"],
         ["/nonexistent/dir/x.f32"]),
        ("ppl with one token", [model, "-m", "ppl", "--ids", "5"], ["ppl needs at least 2 tokens"]),
        ("an unknown flag in last place", ok_args + ["-x"], ["unknown option", "-x"]),
        ("--rope-scale with no RoPE scaling", ok_args + ["--rope-scale", "4"], ["--rope-scale", "--rope-scaling"]),
        ("--yarn-orig-ctx with no YaRN", ok_args + ["--yarn-orig-ctx", "256"], ["--yarn-orig-ctx", "yarn"]),
        ("a YaRN flag with linear scaling", ok_args + ["--rope-scaling", "linear", "--rope-scale", "2",
                                                       "--yarn-beta-fast", "8"], ["--yarn-beta-fast", "yarn"]),
        ("-i in chat mode", [model, "-m", "chat", "-i", "hello"], ["-m chat", "-i"]),
        ("-y outside chat", [model, "-i", "hello", "-y", "be brief"], ["-y", "chat"]),
        ("--think outside chat", [model, "-i", "hello", "--think"], ["--think", "chat"]),
        ("--history outside chat", [model, "-i", "hello", "--history", "2"], ["--history", "chat"]),
        ("-f on a folder", [model, "-f", TMP], [TMP, "folder"]),
        ("--row-bits not a width", ok_args + ["--row-bits", "384"], ["--row-bits"]),
        ("-t in ppl", [model, "-m", "ppl", "--ids", "1,2,3", "-t", "0.5"], ["-t", "ppl"]),
        ("-n in logits", ok_args + ["-n", "5"], ["-n", "logits"]),
        ("-s in tokenize", [model, "-m", "tokenize", "-i", "x", "-s", "3"], ["-s", "tokenize"]),
        ("--repeat-penalty in ppl", [model, "-m", "ppl", "--ids", "1,2,3", "--repeat-penalty", "1.1"],
         ["--repeat-penalty", "ppl"]),
        ("--per-position outside ppl", ok_args + ["--per-position", os.path.join(TMP, "x.csv")],
         ["--per-position", "ppl"]),
        ("--per-position to a folder that is not there", [model, "-m", "ppl", "--ids", "1,2,3", "--per-position",
                                                          "/nonexistent/dir/x.csv"], ["/nonexistent/dir/x.csv"]),
        ("--pos-offset in tokenize", [model, "-m", "tokenize", "-i", "x", "--pos-offset", "5"],
         ["--pos-offset", "tokenize"]),
        ("--no-rope with a RoPE scaling", ok_args + ["--no-rope", "--rope-scaling", "yarn"],
         ["--no-rope", "--rope-scaling"]),
        ("ntk without a factor", ok_args + ["--rope-scaling", "ntk"], ["ntk", "--rope-scale"]),
        ("--yarn-beta-fast with dynamic", ok_args + ["--rope-scaling", "dynamic", "--rope-scale", "2",
                                                     "--yarn-beta-fast", "8"], ["--yarn-beta-fast", "yarn"]),
        ("--row-bits with --ref-kernels", ok_args + ["--ref-kernels", "--row-bits", "256"],
         ["--row-bits", "--ref-kernels"]),
    ]
    for label, args, words in bad:
        @test(f"{tag}: bad command line: {label}")
        def _():
            return expect_error(run([binary] + args), *words)

    @test(f"{tag}: the prompt from standard input: piped, or -f -; an empty one is no prompt")
    def _():
        demo = os.path.join(ROOT, "demo", "model.bin")
        gen = [binary, demo, "-n", "8", "-s", "1"]
        want = run(gen + ["-i", "春眠"])
        a = run(gen, input="春眠")
        b = run(gen + ["-f", "-"], input="春眠")
        c = run(gen, input="")
        ok, detail = expect_error(c, "needs a prompt")
        ok = ok and want.returncode == 0 and a.stdout == b.stdout == want.stdout and len(want.stdout) > 3
        return ok, f"{a.stdout.strip()!r} | {detail}"

    @test(f"{tag}: --version names the build and the model file format, with or without a model")
    def _():
        a, b = run([binary, "--version"]), run([binary, model, "--version"])
        version = re.search(r"#define MM_VERSION (\d+)", open(os.path.join(ROOT, "model.h")).read()).group(1)
        ok = a.returncode == b.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("minimind.c ") \
            and f"format version {version}" in a.stdout and "kernels" in a.stdout
        return ok, a.stdout.strip()

    @test(f"{tag}: the RoPE scaling flags apply where the model's config has the scaling")
    def _():
        yarn = os.path.join(TMP, "m3_moe.yarn.bin")  # as a config.json with inference_rope_scaling exports
        with open(yarn, "wb") as f:
            f.write(mutate_header(open(model, "rb").read(), rope_scaling=2, rope_factor=16.0))
        p = run([binary, yarn, "-m", "logits", "-o", out, "--ids", "1,2,3", "--yarn-orig-ctx", "256",
                 "--rope-scale", "4", "--yarn-beta-fast", "16"])
        q = run([binary, yarn, "-m", "logits", "-o", out, "--ids", "1,2,3", "--rope-scaling", "linear",
                 "--yarn-orig-ctx", "256", "--rope-scale", "4"])
        ok, detail = expect_error(q, "--yarn-orig-ctx", "yarn")
        return p.returncode == 0 and ok, (p.stderr.strip()[-100:] or "YaRN flags taken") + " | " + detail


# ----------------------------------------------------------------------------------------------
# Text in and out: tokenizer parity with Hugging Face tokenizers, chat templates, round trips,
# streaming, sampling, generation and chat

def token_table(model_path):
    """[(kind, bytes)] of every token, read from a model file's tokenizer block"""
    data = open(model_path, "rb").read()
    at = HDR.unpack_from(data, 0)[F["tokenizer_offset"]]
    n_vocab, _ = struct.unpack_from("<II", data, at)
    at += 8
    out = []
    for _ in range(n_vocab):
        kind, n = struct.unpack_from("<BI", data, at)
        out.append((kind, data[at + 5:at + 5 + n]))
        at += 5 + n
    return out


def tokenizer_models():
    """{name: model file} for each tokenizer of tokenizer_expected.json that is available here"""
    models = {"fixture": export(os.path.join(FIX, "m3_moe.pth"), "m3_moe.f32.bin", "f32"),
              "demo": os.path.join(ROOT, "demo", "model.bin")}
    for name in ("minimind2", "minimind-3"):
        folder = os.path.join(SHARED, "minimind", name)
        if os.path.isdir(folder):
            models[name] = export(os.path.join(FIX, "vocab6400.pth"), f"vocab6400_{name}.bin",
                                  "f32", tokenizer=folder)
    return models


def conversation_tests(binary, models, expected):
    """-m prompt, --messages and --tools through ./run itself, against Jinja's renders"""
    tag = os.path.basename(binary)
    chats = json.load(open(os.path.join(ROOT, "tests", "reference", "chats.json"), encoding="utf-8"))
    folder = os.path.join(TMP, "conversations")
    os.makedirs(folder, exist_ok=True)

    def files(i, c):  # the case's --messages and --tools files (a request object: both in one)
        m, t = os.path.join(folder, f"{i}.messages.json"), os.path.join(folder, f"{i}.tools.json")
        with open(m, "w", encoding="utf-8") as f:
            json.dump({"messages": c["messages"], "tools": c["tools"]} if c.get("request") else c["messages"],
                      f, ensure_ascii=False, indent=2)
        with open(t, "w", encoding="utf-8") as f:
            json.dump(c.get("tools"), f, ensure_ascii=False)
        return ["--messages", m] + (["--tools", t] if "tools" in c and not c.get("request") else [])

    for name in ("minimind2", "minimind-3"):
        if name not in models:
            report(f"{tag}: -m prompt renders {name}'s conversations as Jinja does", None, "../shared/minimind is absent")
            continue
        model, exp = models[name], expected["tokenizers"][name]["chat"]

        @test(f"{tag}: -m prompt: {name}'s template renders --messages and --tools files as Jinja does, "
              f"tools, tool calls and results, thinking or not")
        def _():
            done = 0
            for i, c in enumerate(chats):
                if not c.get("add_generation_prompt"):
                    continue
                think = ["--think"] if c.get("open_thinking") and name == "minimind-3" else []
                p = run([binary, model, "-m", "prompt"] + files(i, c) + think)
                if p.returncode != 0 or p.stdout != exp[i]["text"]:
                    return False, f"{c['name']}: exit {p.returncode} {p.stderr.strip()[-120:]} {p.stdout[-80:]!r} vs {exp[i]['text'][-80:]!r}"
                done += 1
            return True, f"{done} conversations byte for byte"

    if "minimind-3" in models:
        model = models["minimind-3"]

        @test(f"{tag}: -m prompt: -y and -i (or standard input) are a system and a user message; -v counts tokens")
        def _():
            p = run([binary, model, "-m", "prompt", "-y", "Be brief.", "-i", "Hi"])
            q = run([binary, model, "-m", "prompt", "-v"], input="Hi")
            want = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")
            ids = len(run([binary, model, "-m", "tokenize", "-i", q.stdout]).stdout.split())
            ok = p.stdout == want and q.stdout == want.split("<|im_end|>\n", 1)[1] and f"{ids} tokens" in q.stderr
            return ok, f"{p.stdout!r} / {q.stdout!r} / {q.stderr.strip()}"

        @test(f"{tag}: chat: from --messages it answers the last user message first; '/tool TEXT' is a tool's result")
        def _():
            m = os.path.join(folder, "chat.json")
            with open(m, "w") as f:
                json.dump([{"role": "user", "content": "Weather in Paris?"}], f)
            t = files(0, chats[[c["name"] for c in chats].index("tools, one user turn")])[-1]
            p = run([binary, model, "-m", "chat", "--messages", m, "--tools", t, "-n", "2", "-s", "1",
                     "--verbose-prompt"], input="/tool {\"temp\": 18}\n")
            prompts = re.findall(r"\[prompt, \d+ tokens\]\n(.*?)\n\[end of prompt\]", p.stderr, re.S)
            ok = p.returncode == 0 and len(prompts) == 2 and prompts[0].startswith("<|im_start|>system\n# Tools") and \
                prompts[0].endswith("Weather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n") and \
                "<|im_start|>user\n<tool_response>\n{\"temp\": 18}\n</tool_response><|im_end|>\n<|im_start|>assistant" in prompts[1]
            return ok, f"exit {p.returncode}, {len(prompts)} prompts: {[x[-90:] for x in prompts]} {p.stderr[-200:]}"

        def bad_file(text, name=None):  # each its own file: the cases run after all are written
            path = os.path.join(folder, name or f"bad{len(os.listdir(folder))}.json")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return path

        msgs = bad_file('[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]', "ok.json")
        bad = [
            ("JSON syntax", ["-m", "prompt", "--messages", bad_file('[{"role": "user",\n "content": "x"]')],
             ["bad", ".json", "line 2", "column", "expected ',' or '}'"]),
            ("unknown role", ["-m", "prompt", "--messages", bad_file('[{"role": "bot", "content": "x"}]')],
             ["bad", ".json", "message 1", "bot"]),
            ("content as a list of parts", ["-m", "prompt", "--messages",
                                            bad_file('[{"role": "user", "content": [{"type": "text"}]}]')],
             ["message 1", "content"]),
            ("a tool call without a name", ["-m", "prompt", "--messages", bad_file(
                '[{"role": "assistant", "content": null, "tool_calls": [{"function": {"arguments": "{}"}}]}]')],
             ["tool call 1", "name"]),
            ("an empty conversation", ["-m", "prompt", "--messages", bad_file("[]")], ["empty"]),
            ("a lone surrogate", ["-m", "prompt", "--messages", bad_file('[{"role": "user", "content": "\\ud800"}]')],
             ["surrogate"]),
            ("tools not a list", ["-m", "prompt", "--messages", msgs, "--tools", bad_file('{"type": "function"}')],
             ["tools"]),
            ("tools twice", ["-m", "prompt", "--messages", bad_file('{"messages": [{"role": "user", "content": "x"}], '
                                                                    '"tools": []}'), "--tools", bad_file("[]", "t.json")],
             ["--tools"]),
            ("-y beside a system message", ["-m", "prompt", "--messages", msgs, "-y", "other"], ["-y", "system"]),
            ("--messages and -i", ["-m", "prompt", "--messages", msgs, "-i", "x"], ["--messages", "-i"]),
            ("--messages outside chat and prompt", ["--messages", msgs, "-i", "x"], ["--messages", "chat"]),
            ("--tools outside chat and prompt", ["-m", "tokenize", "--tools", msgs, "-i", "x"], ["--tools"]),
            ("-m prompt without a conversation", ["-m", "prompt"], ["--messages", "-i"]),
            ("a missing messages file", ["-m", "prompt", "--messages", os.path.join(folder, "nope.json")],
             ["nope.json", "cannot open"]),
        ]
        for what, args, words in bad:
            @test(f"{tag}: conversation errors: {what}")
            def _(args=args, words=words):
                return expect_error(run([binary, model] + args), *words)

    if "minimind2" in models:
        @test(f"{tag}: conversation errors: --think on MiniMind2's template, which opens no thinking block")
        def _():
            return expect_error(run([binary, models["minimind2"], "-m", "prompt", "-i", "x", "--think"]),
                                "--think", "MiniMind2")

    @test(f"{tag}: conversation errors: tools for a template without them (MiniMind2's earlier one)")
    def _():
        t = os.path.join(folder, "tools.json")
        with open(t, "w") as f:
            json.dump([{"type": "function", "function": {"name": "f"}}], f)
        return expect_error(run([binary, models["fixture"], "-m", "prompt", "-i", "x", "--tools", t]), "no tools")


def write_cases(path, chunks):
    with open(path, "wb") as f:
        f.write(struct.pack("<I", len(chunks)) + b"".join(chunks))


def blob(b):
    return struct.pack("<I", len(b)) + b


def tokenizer_tests(binary, driver, models, expected):
    tag = os.path.basename(binary)
    corpus = json.load(open(os.path.join(ROOT, "tests", "reference", "corpus.json"), encoding="utf-8"))
    chats = json.load(open(os.path.join(ROOT, "tests", "reference", "chats.json"), encoding="utf-8"))
    enc_cases = os.path.join(TMP, "corpus.cases")
    write_cases(enc_cases, [blob(t.encode("utf-8")) for t in corpus])
    chat_cases = os.path.join(TMP, "chat.cases")
    def chat_case(c):  # the messages and tools as JSON text, for tokenizer.c's JSON reader
        messages = {"messages": c["messages"], "tools": c["tools"]} if c.get("request") else c["messages"]
        tools = json.dumps(c["tools"], ensure_ascii=False) if "tools" in c and not c.get("request") else ""
        return (struct.pack("<BB", bool(c.get("add_generation_prompt")), bool(c.get("open_thinking"))) +
                blob(json.dumps(messages, ensure_ascii=False).encode()) + blob(tools.encode()))
    write_cases(chat_cases, [chat_case(c) for c in chats])
    for name in ("fixture", "demo", "minimind2", "minimind-3"):
        if name not in models:
            report(f"{tag}: tokenizer {name}", None, "../shared/minimind is absent")
            continue
        model, exp = models[name], expected["tokenizers"][name]

        @test(f"{tag}: tokenizer {name}: ids equal Hugging Face tokenizers on {len(corpus)} texts")
        def _():
            p = run([driver, model, "encode", enc_cases])
            got = [[int(x) for x in line.split()] for line in p.stdout.split("\n")[:len(corpus)]]
            bad = [i for i, (g, e) in enumerate(zip(got, exp["encode"])) if g != e]
            if p.returncode != 0 or not sanitizer_clean(p) or len(got) != len(corpus):
                return False, f"driver exit {p.returncode}: {p.stderr[-300:]}"
            if bad:
                i = bad[0]
                return False, f"{len(bad)} differ; first {corpus[i][:40]!r}: {got[i][:12]} vs {exp['encode'][i][:12]}"
            return True, f"{sum(map(len, got))} ids"

        @test(f"{tag}: tokenizer {name}: chat template renders as Jinja does, {len(chats)} conversations")
        def _():
            if not exp["chat"]:
                return None, "the tokenizer has no chat template"
            p = subprocess.run([driver, model, "chat", chat_cases], capture_output=True, env=ENV, timeout=60)
            p.stderr = p.stderr.decode("utf-8", "replace")
            out, at, texts = p.stdout, 0, []
            while at + 4 <= len(out):  # each a render, or (length's top bit set) the driver's refusal
                n = struct.unpack_from("<I", out, at)[0]
                refused, n = bool(n >> 31), n & 0x7FFFFFFF
                body = out[at + 4:at + 4 + n].decode("utf-8")
                texts.append({"refused": body} if refused else body)
                at += 4 + n
            if p.returncode != 0 or len(texts) != len(chats) or not sanitizer_clean(p):
                return False, f"driver exit {p.returncode}, {len(texts)} renders: {p.stderr[-200:]}"
            # Jinja's render where it renders; where Jinja fails, or the template has no tools for
            # the conversation's, a refusal
            bad = [i for i, (g, e) in enumerate(zip(texts, exp["chat"]))
                   if (isinstance(g, dict)) != ("error" in e) or ("text" in e and g != e["text"])]
            if bad:
                i = bad[0]
                return False, (f"{len(bad)} differ; first {chats[i]['name']}: {str(texts[i])[-80:]!r} vs "
                               f"{str(exp['chat'][i].get('text', exp['chat'][i]))[-80:]!r}")
            rendered = [(i, t) for i, t in enumerate(texts) if isinstance(t, str)]
            # and the rendered prompts tokenize to the reference's ids
            rc = os.path.join(TMP, "rendered.cases")
            write_cases(rc, [blob(t.encode("utf-8")) for _, t in rendered])
            q = run([driver, model, "encode", rc])
            ids = [[int(x) for x in line.split()] for line in q.stdout.split("\n")[:len(rendered)]]
            bad_ids = [i for k, (i, _) in enumerate(rendered) if ids[k] != exp["chat"][i]["ids"]]
            return not bad_ids, (f"{len(rendered)} texts and ids equal, {len(texts) - len(rendered)} refused as "
                                 f"Jinja or the template does" if not bad_ids else f"ids differ for {len(bad_ids)}")

        @test(f"{tag}: tokenizer {name}: decode(encode(bytes)) == bytes on 1500 random byte strings, streaming == lossy decode")
        def _():
            p = run([driver, model, "roundtrip", "1500", "11"])
            return p.returncode == 0 and sanitizer_clean(p) and p.stdout.startswith("ok"), (p.stdout + p.stderr).strip()[-200:]

    model = models["fixture"]
    table = token_table(model)

    @test(f"{tag}: -m tokenize equals the reference, and --show-tokens escapes bytes")
    def _():
        i = next(k for k, t in enumerate(corpus) if "\n" in t and len(t) > 10)
        path = os.path.join(TMP, "text.txt")
        with open(path, "wb") as f:
            f.write(corpus[i].encode())
        p = run([binary, model, "-m", "tokenize", "-f", path])
        got = [int(x) for x in p.stdout.split()]
        q = run([binary, model, "-m", "tokenize", "-i", "a\nb", "--show-tokens"])
        return got == expected["tokenizers"]["fixture"]["encode"][i] and "\\n" in q.stdout, f"{len(got)} ids; {q.stdout.split()!r}"

    @test(f"{tag}: -m decode streams UTF-8 safely (random ids, split characters)")
    def _():
        rng = random.Random(5)
        ids = [rng.randrange(len(table)) for _ in range(400)]
        p = subprocess.run([binary, model, "-m", "decode", "--ids", ids_arg(ids)], capture_output=True, env=ENV)
        want = b"".join(table[i][1] for i in ids).decode("utf-8", "replace").encode()
        return p.returncode == 0 and p.stdout == want, f"{len(p.stdout)} bytes"

    gen = [binary, model, "-i", "the quick brown fox", "-n", "24"]

    @test(f"{tag}: generate: the same seed gives the same text, another seed another")
    def _():
        flat = ["-t", "4", "-k", "0", "-p", "1"]  # random weights are peaked: flatten them
        a = run(gen + flat + ["-s", "42"]).stdout
        b = run(gen + flat + ["-s", "42"]).stdout
        c = run(gen + flat + ["-s", "43"]).stdout
        return a == b and a != c and len(a) > 1, f"{a[:30]!r}"

    @test(f"{tag}: generate: 1 and 2 threads give the same text")
    def _():
        a = run(gen + ["-s", "7", "--threads", "1"]).stdout
        b = run(gen + ["-s", "7", "--threads", "2"]).stdout
        return a == b, "identical" if a == b else f"{a!r} vs {b!r}"

    @test(f"{tag}: generate: greedy equals the argmax chain of -m logits; -k 1 and -p 0 are greedy too")
    def _():
        prompt = [1] + [int(x) for x in run([binary, model, "-m", "tokenize", "-i", "the quick brown fox"]).stdout.split()]
        seq, V = list(prompt), len(table)
        for step in range(6):
            out = logits(binary, model, seq, (), "chain")
            nxt = argmax(out[(len(seq) - 1) * V:len(seq) * V])
            if nxt == 2:
                break
            seq.append(nxt)
        want = b"".join(table[i][1] for i in seq[len(prompt):] if table[i][0] != 2).decode("utf-8", "replace")
        greedy = run(gen[:4] + ["-n", str(len(seq) - len(prompt)), "-t", "0"])
        topk1 = run(gen[:4] + ["-n", str(len(seq) - len(prompt)), "-k", "1", "-s", "3"])
        topp0 = run(gen[:4] + ["-n", str(len(seq) - len(prompt)), "-p", "0", "-s", "3"])
        ok = greedy.stdout == want + "\n" == topk1.stdout == topp0.stdout
        return ok, f"{want!r} vs {greedy.stdout!r} / {topk1.stdout!r} / {topp0.stdout!r}"

    @test(f"{tag}: generate: stats on stderr, and a full context stops generation out loud")
    def _():
        p = run([binary, model, "-i", "the", "-n", "100", "-c", "12", "-s", "1", "-k", "0", "-p", "1"])
        prompt = 1 + len(run([binary, model, "-m", "tokenize", "-i", "the"]).stdout.split())
        ok = p.returncode == 0 and "context of 12 tokens is full" in p.stderr and \
            f"prompt {prompt} tokens, generated {12 - prompt} tokens" in p.stderr
        return ok, p.stderr.strip().replace("\n", " | ")[-160:]

    @test(f"{tag}: chat: piped turns reuse the KV cache (only new tokens run)")
    def _():
        p = run([binary, model, "-m", "chat", "-n", "5", "-s", "1", "-v"], input="hello there\nand again\n")
        turns = [l for l in p.stderr.splitlines() if l.startswith("prompt ")]
        first, second = (int(t.split()[1]) for t in turns[:2])
        rendered = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
        full = len(run([binary, model, "-m", "tokenize", "-i", rendered]).stdout.split())
        ok = p.returncode == 0 and len(turns) == 3 and first == full and 0 < second < first + 5
        return ok, f"turn prompts {first} (full render {full}), {second}"

    @test(f"{tag}: chat: a reply cut at -n says so; without -n a reply runs to its end (or the context's)")
    def _():
        p = run([binary, model, "-m", "chat", "-n", "3", "-t", "0"], input="hello there\n")
        q = run([binary, model, "-m", "chat", "-t", "0", "-c", "300", "-v"], input="hello there\n")
        gen = re.search(r"generated (\d+) tokens", q.stderr)
        ok = p.returncode == q.returncode == 0 and "[the reply stopped at -n 3 tokens]" in p.stderr and \
            gen and int(gen.group(1)) > 256 - 60 and "stopped at -n" not in q.stderr
        return ok, (p.stderr.strip().splitlines() or [""])[-1] + " | " + (gen.group(0) if gen else q.stderr[-100:])

    @test(f"{tag}: chat: --history N keeps the last N messages (--verbose-prompt shows each turn's prompt)")
    def _():
        def prompts(extra):
            p = run([binary, model, "-m", "chat", "-n", "2", "-t", "0", "--verbose-prompt"] + extra,
                    input="one\ntwo\nthree\n")
            return p.returncode, re.findall(r"\[prompt, \d+ tokens\]\n(.*?)\n\[end of prompt\]", p.stderr, re.S)
        rc0, none = prompts(["--history", "0"])
        rc2, two = prompts(["--history", "2"])
        rca, every = prompts([])
        user = lambda p: re.findall(r"user\n(\w+)<\|im_end\|>", p)
        ok = rc0 == rc2 == rca == 0 and [user(p) for p in none] == [["one"], ["two"], ["three"]] and \
            [user(p) for p in two] == [["one"], ["one", "two"], ["two", "three"]] and \
            [user(p) for p in every] == [["one"], ["one", "two"], ["one", "two", "three"]]
        return ok, f"--history 0: {[user(p) for p in none]}; 2: {[user(p) for p in two]}"

    @test(f"{tag}: chat: a full context drops the oldest turn and says so")
    def _():
        p = run([binary, model, "-m", "chat", "-n", "4", "-s", "1", "-c", "90"],
                input="one two three\n" * 5)
        return p.returncode == 0 and "dropping the oldest turn" in p.stderr and sanitizer_clean(p), p.stderr.strip()[-120:]

    if "minimind-3" in models:
        @test(f"{tag}: chat: --think opens minimind-3's thinking block")
        def _():
            p = run([binary, models["minimind-3"], "-m", "chat", "--think", "-n", "3", "-t", "0", "-v"], input="hi\n")
            rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
            full = len(run([binary, models["minimind-3"], "-m", "tokenize", "-i", rendered]).stdout.split())
            turns = [l for l in p.stderr.splitlines() if l.startswith("prompt ")]
            return p.returncode == 0 and turns and int(turns[0].split()[1]) == full, f"{turns[:1]} vs {full}"

    for label, args, words in [
        ("generate without a prompt", [model], ["-i TEXT or -f FILE"]),
        ("tokenize without text", [model, "-m", "tokenize"], ["-m tokenize needs"]),
        ("both -i and -f", [model, "-i", "x", "-f", "y"], ["not both"]),
        ("ids and text", [model, "-m", "logits", "-o", "x", "--ids", "1", "-i", "x"], ["not both"]),
        ("negative temperature", [model, "-i", "x", "-t", "-1"], ["-t"]),
        ("top-p above 1", [model, "-i", "x", "-p", "1.5"], ["-p"]),
        ("prompt file missing", [model, "-f", os.path.join(TMP, "missing.txt")], ["missing.txt"]),
        ("text longer than the context", [model, "-i", "the quick brown fox jumps", "-c", "3"],
         ["does not fit the context of 3"]),
    ]:
        @test(f"{tag}: bad command line: {label}")
        def _():
            return expect_error(run([binary] + args), *words)


# ----------------------------------------------------------------------------------------------
# The fast kernels: each against its reference (tests/kernel_test.c), and whole models with the
# fast path against --ref-kernels; the f16 KV cache; generation independent of the thread count

def kernel_driver_tests(kernel_driver):
    p = run([kernel_driver])
    lines = [l for l in p.stdout.splitlines() if l.startswith(("PASS ", "FAIL "))]
    for l in lines:
        verdict, _, rest = l.partition(" ")
        name, _, detail = rest.partition(" (") if verdict == "PASS" else rest.partition(": ")
        report(f"{os.path.basename(kernel_driver)}: {name}", verdict == "PASS", detail.rstrip(")"))
    if p.returncode != 0 and not any(l.startswith("FAIL") for l in lines) or not lines or not sanitizer_clean(p):
        report(f"{os.path.basename(kernel_driver)}: runs cleanly", False, f"exit {p.returncode}: {p.stderr[-300:]}")


def kernel_tests(binary, cases):
    tag = os.path.basename(binary)
    for cname in ("m2_moe", "m3_dense"):
        c = next(x for x in cases if x["name"] == cname)
        for dtype in ("f32", "f16", "bf16", "q8_0"):
            @test(f"{tag}: fast kernels == --ref-kernels over a whole model, {cname} {dtype}")
            def _():
                model = export(c["checkpoint"], f"{c['name']}.{dtype}.bin", dtype, c["export_args"])
                worst = 0.0
                for b in ("5", "64"):  # blocks under OP_MIN_TOKENS (dot-product tiles), one whole block (prompt tiles)
                    ref = logits(binary, model, c["ids"], ["--ref-kernels", "--batch", b], "refk")
                    out = logits(binary, model, c["ids"], ["--batch", b], "fastk")
                    worst = max(worst, rel_diff(out, ref, range(len(c["ids"])), c["vocab"]))
                return worst < 1e-5, f"rel {worst:.1e} < 1e-5 (--batch 5: dot-product tiles; --batch 64: prompt tiles)"

    c = next(x for x in cases if x["name"] == "m3_dense")

    @test(f"{tag}: --row-bits: decoding's weight rows at each width the build has, identical logits")
    def _():
        ids, widths, refused = c["ids"][:12], [], []
        for dtype in ("f32", "f16", "bf16"):
            model = export(c["checkpoint"], f"m3_dense.{dtype}.bin", dtype, c["export_args"])
            outs = {}
            for w in ("512", "256", "128"):
                p = run([binary, model, "-m", "logits", "-o", os.path.join(TMP, "rows.f32"), "--ids", ids_arg(ids),
                         "--batch", "1", "--row-bits", w])
                if p.returncode != 0:
                    ok, detail = expect_error(p, "--row-bits")
                    if not ok:
                        return False, f"{dtype} --row-bits {w}: {detail}"
                    refused.append(w)
                    continue
                outs[w] = read_f32(os.path.join(TMP, "rows.f32"))
            if len(set(map(tuple, outs.values()))) > 1:
                return False, f"{dtype}: logits differ between --row-bits {' and '.join(outs)}"
            widths = list(outs)
        q8 = export(c["checkpoint"], "m3_dense.q8_0.bin", "q8_0", c["export_args"])
        for w in widths:  # q8_0 is read by panels: the flag cannot apply
            ok, detail = expect_error(run([binary, q8, "--ids", "1,2", "-n", "1", "--row-bits", w]), "q8_0")
            if not ok:
                return False, f"q8_0 --row-bits {w}: {detail}"
        return True, (f"identical at {' and '.join(widths)} bits" if len(widths) > 1 else
                      f"one width ({', '.join(widths) or 'none'}), {len(set(refused))} refused")

    @test(f"{tag}: --kv f16 logits agree with PyTorch's like f16 weights do")
    def _():
        model = export(c["checkpoint"], "m3_dense.f32.bin", "f32", c["export_args"])
        ref = read_f32(os.path.join(FIX, c["logits"]))
        worst = 0.0
        for flags in (["--kv", "f16"], ["--kv", "f16", "--batch", "1"], ["--kv", "f16", "--batch", "3"]):
            out = logits(binary, model, c["ids"], c["flags"] + flags, "kv16")
            worst = max(worst, rel_diff(out, ref, c["rows"], c["vocab"]))
        return worst < TOL["f16"], f"rel {worst:.1e} < {TOL['f16']:g} (batched, token by token, --batch 3)"

    @test(f"{tag}: sampled generation of a q8_0 model is identical at threads 1 and 2")
    def _():
        model = export(c["checkpoint"], "m3_dense.q8_0.bin", "q8_0", c["export_args"])
        cmd = [binary, model, "--ids", ids_arg(c["ids"][:9]), "-n", "40", "-s", "7", "-t", "1.0", "-k", "0"]
        a, b = run(cmd + ["--threads", "1"]), run(cmd + ["--threads", "2"])
        return a.returncode == 0 and a.stdout == b.stdout and len(a.stdout) > 0, repr(a.stdout[:30])

    @test(f"{tag}: -m bench prints one CSV row of speeds (depths empty when -c is short)")
    def _():
        model = os.path.join(ROOT, "demo", "model.bin")
        p = run([binary, model, "-m", "bench", "-n", "8", "-c", "600"])
        rows = list(csv.DictReader(io.StringIO(p.stdout)))
        ok = p.returncode == 0 and len(rows) == 1 and float(rows[0]["prefill_tps"]) > 0 and \
            float(rows[0]["decode_tps"]) > 0 and rows[0]["decode_tps_4096"] == "" and \
            float(rows[0]["peak_rss_mb"]) > 0 and rows[0]["decode_tokens"] == "8"
        return ok, p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr.strip()


# ----------------------------------------------------------------------------------------------
# The shipped demo model (demo/train.py wrote demo/reference.json from PyTorch)

def extrapolate_tests(binary):
    """demo/extrapolate.py: a small run into its own folder, and its failures one line each"""
    tag = os.path.basename(binary)
    script = [sys.executable, os.path.join(ROOT, "demo", "extrapolate.py")]
    model, text = os.path.join(ROOT, "demo", "model.bin"), os.path.join(ROOT, "demo", "heldout.txt")
    out = os.path.join(TMP, "extrapolate")

    @test(f"{tag}: demo/extrapolate.py: every method at every context, loss by position at the longest")
    def _():
        shutil.rmtree(out, ignore_errors=True)
        args = [model, text, "--run", binary, "--contexts", "16,64", "--max-tokens", "300", "--bases", "1e7",
                "--train-len", "16", "--out", out]
        p = run(script + args)
        if p.returncode != 0:
            return False, p.stderr[-300:]
        table = list(csv.reader(open(os.path.join(out, "extrapolation.csv"))))
        per = list(csv.DictReader(open(os.path.join(out, "loss_by_position.csv"))))
        names = [r[0] for r in table[1:]]
        one = run([binary, model, "-m", "ppl", "-c", "64", "--csv", "-f", text, "--rope-scaling", "none"])
        files = sorted(os.listdir(out))
        counts = sum(int(r["count"]) for r in per if r["method"] == "none")
        ok = (names == ["none", "linear", "yarn", "ntk", "dynamic", "base=1e+07"] and table[0] == ["method", "16", "64"]
              and {r["method"] for r in per} == set(names) and counts == 300 - math.ceil(300 / 64)  # (BOS + 299 tokens in windows of 64)
              and files == ["extrapolation.csv", "extrapolation.md", "extrapolation.svg", "frequencies.csv",
                            "frequencies.svg", "loss_by_position.csv", "loss_by_position.md", "loss_by_position.svg"]
              and one.returncode == 0 and "[12/12]" in p.stderr)
        return ok, f"{names}, {len(per)} per-position rows, none's counts {counts}, files {files}"

    bad = [("a ./run that is not there", ["--run", "/nonexistent/run"], "/nonexistent/run"),
           ("--contexts not numbers", ["--contexts", "abc"], "--contexts"),
           ("a context longer than the text", ["--contexts", "16,4096", "--max-tokens", "300"], "shorter than"),
           ("an unknown method", ["--methods", "none,rope2"], "rope2")]
    for label, extra, word in bad:
        @test(f"{tag}: demo/extrapolate.py: {label}: one line, exit 1, nothing written")
        def _():
            where = os.path.join(TMP, "extrapolate-bad")
            shutil.rmtree(where, ignore_errors=True)
            p = run(script + [model, text, "--run", binary, "--out", where] + extra)
            lines = p.stderr.strip().splitlines()
            ok = p.returncode == 1 and len(lines) == 1 and word in lines[0] and "Traceback" not in p.stderr \
                and not os.path.exists(where)
            return ok, p.stderr.strip()[-200:]


def passkey_tests(binary):
    """demo/passkey.py: prompts of the length asked for, with the key where asked; one-line failures"""
    tag = os.path.basename(binary)
    model = os.path.join(ROOT, "demo", "model.bin")

    @test(f"{tag}: demo/passkey.py: each prompt is within 10% under its context, the key at its depth")
    def _():
        sys.path.insert(0, os.path.join(ROOT, "demo"))
        import passkey
        cache, details = {}, []
        for n, depth in ((512, 0.0), (1024, 0.5), (2048, 1.0)):
            text = passkey.prompt(binary, model, passkey.FILLER, "12345", n, depth, cache)
            got = passkey.n_tokens(binary, model, text) + 1
            fill = lambda t: sum(t.count(u.strip()) for u in passkey.sentences(passkey.FILLER))
            at = fill(text[:text.index("12345")]) / fill(text)  # the filler sentences before the key, of all
            details.append(f"{n}: {got} tokens, key after {at:.2f} of the filler")
            if not (0.9 * n <= got <= n and abs(at - depth) < 0.05):
                return False, "; ".join(details)
        p = run([sys.executable, os.path.join(ROOT, "demo", "passkey.py"), model, "--run", binary, "--contexts",
                 "300", "--depths", "0.5", "--trials", "2", "--methods", "none,ntk"])
        ok = p.returncode == 0 and "| none | 0/2 |" in p.stdout and "| ntk |" in p.stdout
        return ok, "; ".join(details) + f"; table {p.stdout.splitlines()[-1] if p.stdout else p.stderr[-200:]}"

    @test(f"{tag}: demo/passkey.py: a bad context list, a missing model, a context under the question: one line")
    def _():
        script = [sys.executable, os.path.join(ROOT, "demo", "passkey.py")]
        a = run(script + [model, "--run", binary, "--contexts", "12x"])
        b = run(script + [os.path.join(TMP, "nope.bin"), "--run", binary])
        c = run(script + [model, "--run", binary, "--contexts", "64"])
        ok = all(p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
                 for p in (a, b, c)) and "--contexts" in a.stderr and "nope.bin" in b.stderr and "64" in c.stderr
        return ok, f"{a.stderr.strip()} | {b.stderr.strip()} | {c.stderr.strip()}"


def demo_tests(binary, expected):
    tag = os.path.basename(binary)
    model = os.path.join(ROOT, "demo", "model.bin")
    with open(os.path.join(ROOT, "demo", "reference.json"), encoding="utf-8") as f:
        ref = json.load(f)
    table = token_table(model)

    @test(f"{tag}: demo model: greedy generation equals PyTorch's greedy continuation")
    def _():
        greedy = ref["greedy_ids"]
        if 2 in greedy:  # generation stops at <|im_end|>
            greedy = greedy[:greedy.index(2)]
        want = b"".join(table[i][1] for i in greedy if table[i][0] != 2).decode("utf-8", "replace")
        p = run([binary, model, "--ids", ids_arg(ref["prompt_ids"]), "-t", "0", "-n", str(len(ref["greedy_ids"]))])
        q = run([binary, model, "-i", ref["prompt"], "-t", "0", "-n", str(len(ref["greedy_ids"]))])
        ok = p.returncode == 0 and p.stdout == want + "\n" == q.stdout
        return ok, f"{p.stdout.strip()[:24]!r}"

    @test(f"{tag}: demo model: held-out perplexity equals PyTorch's within 1e-3, --csv agrees")
    def _():
        p = run([binary, model, "-m", "ppl", "--ids", ids_arg(ref["ppl_window_ids"])])
        q = run([binary, model, "-m", "ppl", "--ids", ids_arg(ref["ppl_window_ids"]), "--csv"])
        got = float(p.stdout.split()[2])
        rows = list(csv.DictReader(io.StringIO(q.stdout)))
        n = len(ref["ppl_window_ids"])
        ok = abs(got / ref["ppl"] - 1) < 1e-3 and len(rows) == 1 and float(rows[0]["ppl"]) == got and \
            rows[0]["context"] == "512" and rows[0]["windows"] == "1" and rows[0]["tokens"] == str(n - 1) and \
            abs(math.exp(float(rows[0]["nll"])) / got - 1) < 1e-6
        return ok, f"{got:.4f} vs {ref['ppl']:.4f}; csv {rows[:1]}"

    @test(f"{tag}: demo model: ppl without -c takes windows of 512, says so on stderr, equals -c 512")
    def _():
        ids = ids_arg(ref["ppl_window_ids"] * 3)  # 2 windows
        p = run([binary, model, "-m", "ppl", "--ids", ids])
        q = run([binary, model, "-m", "ppl", "--ids", ids, "-c", "512"])
        ok = p.returncode == 0 and p.stdout == q.stdout and "in 2 windows of 512" in p.stderr and \
            "-c sets the window" in p.stderr and "-c sets the window" not in q.stderr
        return ok, f"{p.stdout.strip()!r}; {p.stderr.strip().splitlines()[:1]}"

    @test(f"{tag}: demo model: the C tokenizer gives the ids the model was trained on (and HF's)")
    def _():
        path = os.path.join(TMP, "demo_text.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(ref["tokenize_text"])
        got = [int(x) for x in run([binary, model, "-m", "tokenize", "-f", path]).stdout.split()]
        hf = expected["tokenizers"]["demo"]["heldout_ids"]
        return got == ref["tokenize_ids"] == hf, f"{len(got)} ids"

    @test(f"{tag}: demo model: `make run`'s command is deterministic for a seed, threads 1 == 2")
    def _():
        cmd = [binary, model, "-i", "春眠不覺曉，", "-n", "48", "-s", "42"]
        a, b = run(cmd + ["--threads", "1"]), run(cmd + ["--threads", "2"])
        c = run(cmd[:-1] + ["43"])
        ok = a.returncode == 0 and a.stdout == b.stdout and len(a.stdout) > 20 and c.stdout != a.stdout
        return ok, a.stdout.strip().replace("\n", " / ")[:40]


# ----------------------------------------------------------------------------------------------
# export.py on hostile or wrong input: a clear error, no traceback, no code run, no output left

def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors_raw(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack_from("<Q", data)[0]
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    return {k: (v["dtype"], v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def unicode_op(s):
    """pickle's BINUNICODE opcode for the string s"""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def q8_0_matrix(data, name):
    """A q8_0 tensor of a model file as rows of (codes, scales), read from its panels (model.h):
    16 rows at a time, codes[cols/4][16][4] then f16 scales[cols/32][16]"""
    hdr = HDR.unpack_from(data, 0)
    for i in range(hdr[F["n_tensors"]]):
        e = ENTRY.unpack_from(data, hdr[F["tensor_table_offset"]] + i * ENTRY.size)
        if e[0].rstrip(b"\0") == name.encode():
            break
    rows, cols, at = e[3], e[4], e[7]
    groups, panel = cols // 32, 16 * cols + 16 * (cols // 32) * 2
    out = []
    for r in range(rows):
        p, i = at + r // 16 * panel, r % 16
        codes = [struct.unpack_from("b", data, p + c // 4 * 64 + 4 * i + c % 4)[0] for c in range(cols)]
        scales = [struct.unpack_from("<e", data, p + 16 * cols + 2 * (g * 16 + i))[0] for g in range(groups)]
        out.append((codes, scales))
    return out


def export_tests():
    quantize, quantize_asan = os.path.join(ROOT, "quantize"), os.path.join(ROOT, "quantize-asan")

    def export_with(program, checkpoint, out, dtype, tokenizer=None):
        tok = [] if tokenizer == "" else ["--tokenizer", os.path.join(FIX, "tokenizer")]
        return subprocess.run(EXPORT + [checkpoint, out, "--dtype", dtype] + tok, capture_output=True, text=True,
                              env=dict(ENV, MINIMIND_QUANTIZE=program), cwd=FIX)

    @test("export.py: ./quantize (and its ASan/UBSan build) and the Python encodings write the same bytes, "
          "every dtype, from safetensors, .pth and GGUF f32/f16/bf16/q8_0 weights")
    def _():
        if not (os.path.exists(quantize) and os.path.exists(quantize_asan)):
            return False, "./quantize or ./quantize-asan is not built (make test builds them)"
        sources = [("m3_untied.safetensors", None), ("m2_dense.pth", None), ("m3_moe.pth", None)] + \
            [(os.path.join("gguf", g["gguf"]), "") for g in gguf_cases()]
        compared = 0
        for src, tok in sources:
            for dtype in ("f32", "f16", "bf16", "q8_0"):
                outs = []
                for k, program in enumerate((quantize, quantize_asan, "")):
                    out = os.path.join(TMP, f"same.{k}.bin")
                    p = export_with(program, os.path.join(FIX, src), out, dtype, tok)
                    if p.returncode != 0 or "Sanitizer" in p.stderr or "runtime error" in p.stderr:
                        return False, f"{src} {dtype} with {program or 'the Python'}: {p.stderr.strip()[-300:]}"
                    outs.append(open(out, "rb").read())
                if not outs[0] == outs[1] == outs[2]:
                    return False, f"{src} --dtype {dtype}: the files differ"
                compared += 1
        return True, f"{compared} exports, each three ways"

    def values_file(name, values):  # the first values of a bf16 matrix of a tiny checkpoint
        ckpt = open(os.path.join(FIX, "m3_untied.safetensors"), "rb").read()
        hlen = struct.unpack_from("<Q", ckpt)[0]
        header = json.loads(ckpt[8:8 + hlen])
        body = bytearray(ckpt[8 + hlen:])
        info = header["model.layers.0.self_attn.q_proj.weight"]
        start = info["data_offsets"][0]
        assert info["dtype"] == "BF16"
        for i, v in enumerate(values):  # bf16: the top half of the f32
            body[start + 2 * i:start + 2 * i + 2] = struct.pack("<f", v)[2:]
        path = os.path.join(TMP, name)
        with open(path, "wb") as f:
            f.write(ckpt[:8 + hlen] + bytes(body))
        return path

    for what, values, dtype, words in [
            ("a value past f16's range, as f16", [70000.0], "f16", ["q_proj", "f16 range"]),
            ("a weight past q8_0's scales", [1e7], "q8_0", ["q_proj", "q8_0", "scales"]),
            ("an infinite weight, as q8_0", [float("inf")], "q8_0", ["q_proj", "not finite"])]:
        @test(f"export.py: {what}: the same one-line error from ./quantize and from the Python")
        def _(values=values, dtype=dtype, words=words):
            path = values_file("bad_values.safetensors", values)
            for program in (quantize, ""):
                p = export_with(program, path, os.path.join(TMP, "bad_values.bin"), dtype)
                ok, why = expect_error(p, *words)
                if not ok:
                    return False, f"{program or 'Python'}: {why}"
            return True, p.stderr.strip().splitlines()[-1]

    @test("export.py: Q8_0 GGUF weights exported as q8_0 keep their codes and scales (no round trip)")
    def _():
        sys.path.insert(0, ROOT)
        import export as exporter
        checked = 0
        for g in gguf_cases():
            if g["weights"] != "q8_0":
                continue
            path = os.path.join(FIX, "gguf", g["gguf"])
            state = exporter.read_gguf(path)[0]
            data = open(export(path, f"{g['name']}.bin", "q8_0", tokenizer=""), "rb").read()
            for name in ("model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                         "model.layers.0.mlp.experts.1.down_proj.weight", "model.layers.0.mlp.down_proj.weight"):
                if name not in state:
                    continue
                blocks, rows = state[name].data, q8_0_matrix(data, name)
                cols = state[name].shape[1]
                for r, (codes, scales) in enumerate(rows):
                    for gi, sc in enumerate(scales):
                        at = (r * (cols // 32) + gi) * 34
                        if struct.unpack_from("<e", blocks, at)[0] != sc or \
                                list(struct.unpack_from("32b", blocks, at + 2)) != codes[gi * 32:(gi + 1) * 32]:
                            return False, f"{g['gguf']} {name} row {r} group {gi} differs"
                checked += 1
        return checked >= 4, f"{checked} matrices identical, code for code"

    @test("export.py q8_0: every weight is its scale x its code, within half a step; scale = f16(max|w| / 127)")
    def _():
        ckpt = os.path.join(FIX, "m3_untied.safetensors")
        f32 = open(export(ckpt, "m3_untied.f32.bin", "f32"), "rb").read()
        q8 = open(export(ckpt, "m3_untied.q8_0.bin", "q8_0"), "rb").read()
        checked, worst = 0, 0.0
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
            at, size = tensor_data(f32, name)
            w = struct.unpack_from("<%df" % (size // 4), f32, at)
            rows = q8_0_matrix(q8, name)
            cols = len(w) // len(rows)
            for r, (codes, scales) in enumerate(rows):
                for g, sc in enumerate(scales):
                    grp = w[r * cols + g * 32:(r + 1) * cols][:32]
                    want = struct.unpack("<e", struct.pack("<e", max(abs(v) for v in grp) / 127))[0]
                    if sc != want:
                        return False, f"{name} row {r} group {g}: scale {sc} != {want}"
                    for k, v in enumerate(grp):
                        err = abs(v - sc * codes[g * 32 + k])
                        worst = max(worst, err / sc if sc else err)
                        if err > sc * (0.5 + 1e-6):
                            return False, f"{name} [{r}, {g * 32 + k}]: {v} vs {sc} x {codes[g * 32 + k]}"
                        checked += 1
        return True, f"{checked} weights, worst {worst:.3f} of a step"

    @test("export.py: an output path it cannot write names that path, before any work")
    def _():
        ckpt, tok = os.path.join(FIX, "m3_untied.safetensors"), os.path.join(FIX, "tokenizer")
        results = []
        for out, words in (("/nonexistent/dir/x.bin", ["/nonexistent/dir/x.bin", "no folder"]),
                           (TMP, [TMP, "is a folder"])):
            p = subprocess.run(EXPORT + [ckpt, out, "--tokenizer", tok], capture_output=True, text=True)
            ok, detail = expect_error(p, *words)
            results.append((ok and ".export-" not in p.stderr, detail))
        return all(r[0] for r in results), " | ".join(r[1] for r in results)

    @test("export.py: a transformers folder's own tokenizer.json is taken without --tokenizer; none is an error")
    def _():
        folder = os.path.join(TMP, "m3_dense_with_tokenizer")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(os.path.join(FIX, "m3_dense"), folder)
        bare = subprocess.run(EXPORT + [folder, os.path.join(TMP, "bare.bin")], capture_output=True, text=True)
        ok, detail = expect_error(bare, "no tokenizer.json", "--tokenizer")
        for name in ("tokenizer.json", "tokenizer_config.json"):  # (the second holds the chat template)
            shutil.copy(os.path.join(FIX, "tokenizer", name), folder)
        a, b = os.path.join(TMP, "own_tok.bin"), os.path.join(TMP, "given_tok.bin")
        p = subprocess.run(EXPORT + [folder, a], capture_output=True, text=True)
        q = subprocess.run(EXPORT + [folder, b, "--tokenizer", os.path.join(FIX, "tokenizer")],
                           capture_output=True, text=True)
        same = p.returncode == q.returncode == 0 and open(a, "rb").read() == open(b, "rb").read()
        return ok and same, detail if not same else f"same file as with --tokenizer | {detail}"

    good = read_safetensors_raw(os.path.join(FIX, "m3_untied.safetensors"))
    out = os.path.join(TMP, "export_out.bin")
    marker = os.path.join(TMP, "pwned")

    def zip_pickle(path, pkl):
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pkl)
            z.writestr("archive/version", "3\n")

    def st(name, change):
        t = dict(good)
        change(t)
        path = os.path.join(TMP, name + ".safetensors")
        write_safetensors(path, t)
        return path

    pth = open(os.path.join(FIX, "m2_dense.pth"), "rb").read()
    cases = [
        ("pickle calls os.system", lambda p: zip_pickle(p, b"\x80\x02cos\nsystem\n" + unicode_op(
            "touch " + marker) + b"\x85R."), ["os.system"]),
        ("pickle calls builtins.eval", lambda p: zip_pickle(p, b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."),
         ["builtins.eval"]),
        ("pickle is garbage", lambda p: zip_pickle(p, b"\x80\x02\xff\xfe garbage"), ["corrupt pickle"]),
        ("truncated .pth", lambda p: open(p, "wb").write(pth[:len(pth) // 2]), ["not a torch.save zip"]),
        ("not a checkpoint at all", lambda p: open(p, "wb").write(b"hello world"), ["neither"]),
    ]
    for label, make, words in cases:
        @test(f"export.py: {label}")
        def _():
            path = os.path.join(TMP, "bad.pth")
            make(path)
            for leftover in (out, marker):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            p = subprocess.run(EXPORT + [path, out, "--tokenizer", os.path.join(FIX, "tokenizer")],
                               capture_output=True, text=True)
            if os.path.exists(marker):
                return False, "the pickle ran code"
            if os.path.exists(out):
                return False, "an output file was left behind"
            return expect_error(p, *words)

    st_cases = [
        ("unknown tensor", lambda t: t.update({"model.layers.0.mlp.bias": ("F32", [4], b"\0" * 16)}),
         ["unknown tensors", "model.layers.0.mlp.bias"]),
        ("fused experts (transformers 5) of an odd height", lambda t: t.update(
            {"model.layers.0.mlp.experts.gate_up_proj": ("F16", [2, 7, 64], b"\0" * 2 * 7 * 64 * 2)}),
         ["model.layers.0.mlp.experts.gate_up_proj", "[2, 7, 64]", "[experts, 2 x ffn, hidden]"]),
        ("missing tensor", lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"),
         ["missing tensor model.layers.1.self_attn.v_proj.weight"]),
        ("wrong shape", lambda t: t.update({"model.layers.1.mlp.up_proj.weight":
                                            ("BF16", [95, 64], b"\0" * 95 * 64 * 2)}),
         ["model.layers.1.mlp.up_proj.weight", "[95, 64]"]),
        ("unsupported dtype", lambda t: t.update({"model.norm.weight": ("I64", [64], b"\0" * 512)}),
         ["I64"]),
        ("data shorter than its shape", lambda t: t.update({"model.norm.weight": ("F32", [64], b"\0" * 12)}),
         ["model.norm.weight", "bytes"]),
    ]
    for label, change, words in st_cases:
        @test(f"export.py: safetensors with {label}")
        def _():
            path = st(label.replace(" ", "_"), change)
            if os.path.exists(out):
                os.unlink(out)
            p = subprocess.run(EXPORT + [path, out, "--tokenizer", os.path.join(FIX, "tokenizer")],
                               capture_output=True, text=True)
            if os.path.exists(out):
                return False, "an output file was left behind"
            return expect_error(p, *words)

    @test("export.py: safetensors header length past the end of the file")
    def _():
        path = os.path.join(TMP, "bad_header.safetensors")
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", 2**40) + b"{}")
        p = subprocess.run(EXPORT + [path, out, "--tokenizer", os.path.join(FIX, "tokenizer")],
                           capture_output=True, text=True)
        return expect_error(p, "header length")

    @test("export.py: missing tokenizer")
    def _():
        p = subprocess.run(EXPORT + [os.path.join(FIX, "m3_moe.pth"), out, "--tokenizer",
                                     os.path.join(TMP, "no_tokenizer")], capture_output=True, text=True)
        return expect_error(p, "no_tokenizer")

    @test("export.py: leaves no temporary files behind")
    def _():
        left = [n for n in os.listdir(TMP) if n.startswith(".export-")]
        return not left, f"left: {left}" if left else "none"

    @test("export.py: the tokenizer block holds the vocab, merges and special ids")
    def _():
        path = export(os.path.join(FIX, "m3_moe.pth"), "m3_moe.f32.bin", "f32")
        data = open(path, "rb").read()
        hdr = HDR.unpack_from(data, 0)
        at = hdr[F["tokenizer_offset"]]
        n_vocab, n_merges = struct.unpack_from("<II", data, at)
        tok = json.load(open(os.path.join(FIX, "tokenizer", "tokenizer.json")))
        at += 8
        kinds = []
        for _ in range(n_vocab):
            kind, n = struct.unpack_from("<BI", data, at)
            kinds.append((kind, data[at + 5:at + 5 + n]))
            at += 5 + n
        ok = (n_vocab == 320 and n_merges == len(tok["model"]["merges"]) and
              kinds[1] == (2, b"<|im_start|>") and kinds[3 + ord("a")] == (0, b"a") and
              hdr[F["bos_id"]] == 1 and hdr[F["eos_id"]] == 2 and
              hdr[F["chat_template"]] == 4)  # MiniMind2's earlier template, without tools
        return ok, f"{n_vocab} tokens, {n_merges} merges, bos {hdr[F['bos_id']]}, template {hdr[F['chat_template']]}"


def export_mutation_tests():
    """tests/export_mutations.py: corrupted .pth, safetensors and tokenizer files, malicious pickles"""
    import export_mutations as mut
    work, marker = os.path.join(TMP, "mutations"), os.path.join(TMP, "pwned_by_mutation")
    groups = {}
    for label, files in mut.cases(marker):
        group = ("malicious pickles" if "pickle" in label and any(w in label for w in ("GLOBAL", "INST", "OBJ",
                 "STACK_GLOBAL", "hostile", "rebuild", "persistent")) else label.split(":")[0].split(" ")[0])
        groups.setdefault(group, []).append((label, files))
    for group, items in groups.items():
        @test(f"export.py mutation test: {group} ({len(items)} corrupted inputs): a clean error or a whole file")
        def _():
            bad, refused = [], 0
            for label, files in items:
                rc, err, out = mut.run_case(files, work)
                problem = mut.verdict(rc, err, out, marker)
                if problem:
                    bad.append(f"{label}: {problem}")
                refused += rc == 1
            return not bad, "; ".join(bad[:3]) if bad else f"{refused} refused, {len(items) - refused} exported"


# ----------------------------------------------------------------------------------------------
# The fuzz targets (tests/fuzz/), a few seconds each on their committed corpora: every seed and
# crash reproducer there runs first, then new inputs. make test builds them when clang can.

def stream_tests():
    """tests/stream, the memory wall of make bench and make bench-wall: its passes, and --decode's
    tokens between passes (run.c's forward pass), give positive finite figures; bad input is refused"""
    stream, demo = os.path.join(ROOT, "tests", "stream"), os.path.join(ROOT, "demo", "model.bin")

    def figures(p, n_fields):
        rows = [l.split() for l in p.stdout.strip().splitlines()]
        try:
            ok = p.returncode == 0 and rows and all(
                len(r) == n_fields and all(math.isfinite(float(x)) and float(x) > 0 for x in r[n_fields - 3:])
                for r in rows)
        except ValueError:
            ok = False
        return ok, rows

    @test("tests/stream: the passes of a file, and --decode's tokens between passes at each row width, "
          "1 and 2 threads, positive figures; bad arguments and files refused")
    def _():
        if not os.path.exists(stream):
            return False, "tests/stream is not built (make test builds it)"
        for threads in ("1", "2"):
            ok, rows = figures(run([stream, demo, threads]), 2)
            if not ok:
                return False, f"tests/stream demo/model.bin {threads}: {rows}"
            ok, rows = figures(run([stream, demo, threads, "--decode", "3"]), 4)
            widths = [r[0] for r in rows] if ok else []
            if not ok or not widths or len(set(widths)) != len(widths) or \
                    not set(widths) <= {"512", "256", "128", "0"}:
                return False, f"tests/stream demo/model.bin {threads} --decode 3: {rows}"
        for args, words in (([demo, "1", "--decode", "0"], ("--decode N must be 1..4096",)),
                            ([demo, "0"], ("THREADS must be 1..1024",)),
                            ([os.path.join(FIX, "cases.json"), "1", "--decode", "2"], ("cases.json",)),
                            ([demo, "1", "--decoded", "2"], ("usage",))):
            ok, detail = expect_error(run([stream] + args), *words)
            if not ok:
                return False, f"tests/stream {' '.join(args[1:])}: {detail}"
        return True, f"row widths {', '.join(widths)}"


def fuzz_tests():
    seconds = int(os.environ.get("FUZZ_SECONDS", "3"))
    for target in ("loader", "tokenizer", "chat", "args"):
        @test(f"fuzz: {target}_fuzz, {seconds} s from its corpus (libFuzzer, ASan, UBSan)")
        def _():
            binary = os.path.join(ROOT, "tests", "fuzz", f"{target}_fuzz")
            if not os.path.exists(binary):
                why = "not built: no clang that links libFuzzer here (Debian: apt-get install clang libclang-rt-14-dev)"
                return (False if os.environ.get("CI") else None), why + (" but CI must run it" if os.environ.get("CI") else "")
            scratch = os.path.join(TMP, "fuzz", target)
            os.makedirs(scratch, exist_ok=True)
            fuzz = os.path.join(ROOT, "tests", "fuzz")
            # a fixed seed and a generous per-input timeout: a slow machine must not fail at random
            p = subprocess.run([binary, f"-max_total_time={seconds}", "-seed=1", "-timeout=120",
                                f"-dict={fuzz}/{target}.dict", f"-artifact_prefix={scratch}/", scratch,
                                os.path.join(fuzz, "corpus", target)],
                               capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=seconds + 300)
            done = re.search(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\S+)", p.stderr)
            if p.returncode != 0 or not done:
                return False, f"exit {p.returncode}: " + p.stderr[-600:]
            return True, f"{done.group(1)} executions, cov {done.group(2)}, ft {done.group(3)}, corpus {done.group(4)}"


def main():
    binaries = sys.argv[1:] or [os.path.join(ROOT, "run") + ":" + os.path.join(ROOT, "tests", "tokenizer_test")]
    shutil.rmtree(TMP, ignore_errors=True)
    os.makedirs(TMP)
    with open(os.path.join(FIX, "cases.json")) as f:
        cases = json.load(f)["cases"]
    for c in cases:  # checkpoints and LoRA paths are relative to the fixtures folder
        c["checkpoint"] = os.path.join(FIX, c["checkpoint"])
        c["export_args"] = [os.path.join(FIX, a) if a.endswith(".pth") else a for a in c["export_args"]]
    export_tests()
    export_mutation_tests()
    stream_tests()
    fuzz_tests()
    models = tokenizer_models()
    with open(os.path.join(FIX, "text_expected.json"), encoding="utf-8") as f:
        expected = json.load(f)  # made by tests/reference/gen_text_fixtures.mjs
    for spec in binaries:  # [?]RUN[:TOKENIZER_TEST_DRIVER[:KERNEL_TEST_DRIVER]]; RUN may be empty
        optional = spec.startswith("?")
        binary, driver, kernel_driver = (spec.lstrip("?").split(":") + ["", ""])[:3]
        missing = [b for b in (binary, driver, kernel_driver) if b and not os.path.exists(b)]
        if missing:
            ci = bool(os.environ.get("CI"))
            report(f"the tests of {spec.lstrip('?')}", None if optional and not ci else False,
                   f"not built: {', '.join(missing)}" + (" but CI must run them" if optional and ci else ""))
            continue
        if kernel_driver:
            kernel_driver_tests(kernel_driver)
        if not binary:
            continue
        if "OpenMP threads" not in run([binary, "--help"]).stdout:  # built without OpenMP: one thread
            single_thread_tests(binary)
            parity_tests(binary, cases)
            continue
        parity_tests(binary, cases)
        gguf_parity_tests(binary, cases)
        kernel_tests(binary, cases)
        consistency_tests(binary, cases)
        position_tests(binary, cases)
        demo_tests(binary, expected)
        conformance_tests(binary)
        if driver:  # a build given without a tokenizer driver gets the numerical tests only
            tokenizer_tests(binary, driver, models, expected)
            conversation_tests(binary, models, expected)
            hostile_tests(binary)
            limits_tests(binary)
            machine_tests(binary)
            cli_tests(binary, cases)
            extrapolate_tests(binary)
            passkey_tests(binary)
    print(f"{results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
