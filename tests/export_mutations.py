"""export.py on corrupted inputs (Python standard library only; run_tests.py runs it).

Valid inputs made hostile: a .pth (tests/fixtures/m2_dense.pth), a small safetensors checkpoint
(written here, dim 8), a GGUF file (tests/fixtures/gguf/m3_moe.q8_0.gguf) and the fixture
tokenizer.json / tokenizer_config.json, each truncated,
with flipped bytes, with oversized lengths, with wrong JSON types, and pickles that name other
globals or try to run code. Each export must either succeed with a whole model file, or fail
with one line "export.py: error: ..." and exit status 1: never a Python traceback, never code
run from the pickle (a marker file), never an output or temporary file left behind.

export.main() runs in this process (a fresh interpreter per case would take a minute): an
exception escaping it is what would have been a traceback.
"""
import contextlib
import io
import json
import os
import pickletools
import random
import shutil
import struct
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "fuzz"))
import export  # noqa: E402
import gen_corpus  # noqa: E402  (its tiny checkpoints)


def run_export(args):
    """(exit status, stderr) of export.py ARGS, or ("traceback", the exception)"""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = export.main(args)
    except SystemExit as e:  # argparse
        rc = e.code
    except BaseException as e:  # noqa: B902 - anything that escapes is a traceback for the user
        return "traceback", f"{type(e).__name__}: {e}"
    return rc, err.getvalue()


def verdict(rc, err, out, marker):
    """None when export.py behaved, else what went wrong"""
    if os.path.exists(marker):
        return "the pickle ran code (marker file created)"
    left = [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".export-")]
    if left:
        return f"temporary files left behind: {left}"
    if rc == "traceback":
        return f"traceback: {err}"
    if rc == 0:
        data = open(out, "rb").read() if os.path.exists(out) else b""
        if data[:4] != b"MMND" or struct.unpack_from("<Q", data, 152)[0] != len(data):
            return "exit 0 without a whole model file"
        return None
    lines = err.strip().splitlines()
    if rc != 1 or len(lines) != 1 or not lines[0].startswith("export.py: error: "):
        return f"exit {rc}, stderr {err.strip()[:200]!r}: expected exit 1 and one 'export.py: error:' line"
    if os.path.exists(out):
        return "an output file was left behind after an error"
    return None


# ---------------------------------------------------------------------------------------------
# The mutations: (label, {file name: bytes}) with the checkpoint named "model" and the tokenizer
# files "tokenizer.json" and "tokenizer_config.json"

def truncations(data, n):
    return [data[:k] for k in sorted({0, 1, 7, 8, 30, len(data) - 1} | {len(data) * i // n for i in range(1, n)})]


def flips(data, rng, n, lo=0, hi=None):
    out = []
    for _ in range(n):
        b = bytearray(data)
        at = rng.randrange(lo, hi if hi is not None else len(b))
        b[at] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    return out


def with_member(archive, name, data):
    """the zip archive with member name's bytes replaced (and its CRC made to match)"""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename == name else src.read(info))
    return buf.getvalue()


def zip_with_pickle(pkl, storages=None):
    """a torch.save-like archive of the pickle pkl and storages {key: bytes} under archive/data/"""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        for key, data in (storages or {}).items():
            z.writestr("archive/data/" + key, data)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def tensor_pickle(size, stride, after=b""):
    """{"model.norm.weight": _rebuild_tensor_v2(<FloatStorage "0" of 64>, 0, size, stride, False)}
    with the pickle ops size and stride, and the ops after applied to the rebuilt tensor"""
    storage = (b"(" + unicode_op("storage") + b"ctorch\nFloatStorage\n" + unicode_op("0") +
               unicode_op("cpu") + b"K\x40tQ")
    return (b"\x80\x02}" + unicode_op("model.norm.weight") + b"ctorch._utils\n_rebuild_tensor_v2\n(" +
            storage + b"K\x00" + size + stride + b"\x89tR" + after + b"s.")


def unicode_op(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def pth_mutations(rng, marker):
    pth = open(os.path.join(FIX, "m2_dense.pth"), "rb").read()
    info = zipfile.ZipFile(io.BytesIO(pth)).getinfo("m2_dense/data.pkl")
    name_len, extra_len = struct.unpack_from("<HH", pth, info.header_offset + 26)  # the local header's
    pkl_at = info.header_offset + 30 + name_len + extra_len
    pkl = pth[pkl_at:pkl_at + info.file_size]
    touch = unicode_op("touch " + marker)
    cases = [("pth truncated", d) for d in truncations(pth, 6)]
    cases += [("pth data.pkl bit flip (caught by the zip's CRC)", d) for d in flips(pth, rng, 4, pkl_at, pkl_at + len(pkl))]
    cases += [("pth data.pkl bit flip (CRC redone)", with_member(pth, info.filename, d)) for d in flips(pkl, rng, 24)]
    cases += [("pth zip structure bit flip", d) for d in flips(pth, rng, 6, len(pth) - 400)]
    big = bytearray(pth)  # the central directory's sizes of data.pkl say 4 GB
    cd = pth.rfind(b"PK\x01\x02" + pth[info.header_offset + 4:info.header_offset + 6])
    struct.pack_into("<II", big, cd + 20, 0xFFFFFFFF, 0xFFFFFFFF)
    cases.append(("pth zip entry size 4 GB", bytes(big)))
    at = next(pos for op, _, pos in pickletools.genops(pkl) if op.name == "BINUNICODE")  # its length: 4 GB
    cases.append(("pth pickle string length 4 GB",
                  zip_with_pickle(pkl[:at + 1] + b"\xff\xff\xff\xff" + pkl[at + 5:])))
    cases.append(("pth pickle of 100000 lists", zip_with_pickle(b"\x80\x02" + b"]" * 100000 + b".")))
    evil = [  # pickles that name other globals or try to run code
        ("GLOBAL os.system + REDUCE", b"\x80\x02cos\nsystem\n" + touch + b"\x85R."),
        ("GLOBAL posix.system + REDUCE", b"\x80\x02cposix\nsystem\n" + touch + b"\x85R."),
        ("GLOBAL builtins.eval + REDUCE", b"\x80\x02cbuiltins\neval\n" +
         unicode_op(f"open({marker!r}, 'w')") + b"\x85R."),
        ("GLOBAL builtins.exec in a dict", b"\x80\x02}" + unicode_op("x") + b"cbuiltins\nexec\n" +
         unicode_op(f"open({marker!r}, 'w')") + b"\x85Rs."),
        ("STACK_GLOBAL subprocess.call", b"\x80\x04" + unicode_op("subprocess") + unicode_op("call") +
         b"\x93" + unicode_op("touch") + unicode_op(marker) + b"\x86\x85R."),
        ("INST os.system", b"(" + touch + b"ios\nsystem\n."),
        ("OBJ builtins.getattr", b"\x80\x02(cbuiltins\ngetattr\ncos\nsystem\n" + unicode_op("x") + b"o."),
        ("allowed global with hostile arguments", b"\x80\x02ccollections\nOrderedDict\n" + touch + b"\x85R."),
        ("rebuild_tensor_v2 with a bad storage", b"\x80\x02}" + unicode_op("model.norm.weight") +
         b"ctorch._utils\n_rebuild_tensor_v2\n(" + touch + b"K\x00K\x01\x85K\x01\x85\x89tRs."),
        ("persistent id naming a missing storage", b"\x80\x02}" + unicode_op("model.norm.weight") +
         b"ctorch._utils\n_rebuild_tensor_v2\n((" + unicode_op("storage") + b"ctorch\nFloatStorage\n" +
         unicode_op("999") + unicode_op("cpu") + b"K\x40tQK\x00K\x40\x85K\x01\x85\x89tRs."),
    ]
    cases += [("pth pickle " + label, zip_with_pickle(p)) for label, p in evil]
    floats = struct.pack("<64f", *range(64))  # a real storage, so a tensor gets as far as materialize
    tensors = [  # tensors whose fields are not what torch writes (BUILD: pickle opcode "b")
        ("rebuild_tensor_v2 with size a string", tensor_pickle(unicode_op("ab"), b"K\x01K\x01\x86")),
        ("rebuild_tensor_v2 result given storage=5 by BUILD",
         tensor_pickle(b"K\x40\x85", b"K\x01\x85", b"}" + unicode_op("storage") + b"K\x05sb")),
        ("rebuild_tensor_v2 result given size [2, 2, 2] by BUILD",
         tensor_pickle(b"K\x40\x85", b"K\x01\x85", b"}" + unicode_op("size") + b"(K\x02K\x02K\x02lsb")),
        ("rebuild_tensor_v2 size 2^40 with stride 0 (a 2^40-step copy)",
         tensor_pickle(b"\x8a\x06" + (2**40).to_bytes(6, "little") + b"\x85", b"K\x00\x85")),
    ]
    cases += [("pth pickle " + label, zip_with_pickle(p, {"0": floats})) for label, p in tensors]
    return [(label, {"model.pth": d}) for label, d in cases]


def safetensors_bytes(rng):
    path = os.path.join(ROOT, "tests", "tmp", "mutations_src.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)  # tests/tmp is not in a fresh clone
    shape = gen_corpus.MODELS[0][1]
    gen_corpus.write_safetensors(path, gen_corpus.checkpoint(**shape), "F32", rng)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def safetensors_mutations(rng):
    st = safetensors_bytes(rng)
    hlen = struct.unpack_from("<Q", st)[0]
    header = json.loads(st[8:8 + hlen])
    body = st[8 + hlen:]

    def with_header(h, data=body):
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    def entry(change):
        h = json.loads(json.dumps(header))
        change(h["model.norm.weight"])
        return with_header(h)

    cases = [("safetensors truncated", d) for d in truncations(st, 5)]
    cases += [("safetensors header bit flip", d) for d in flips(st, rng, 14, 8, 8 + hlen)]
    cases += [
        ("safetensors header length 2^64-1", struct.pack("<Q", 2**64 - 1) + st[8:]),
        ("safetensors header length 0", struct.pack("<Q", 0) + st[8:]),
        ("safetensors header nested 100000 deep", struct.pack("<Q", 200000) + b"[" * 100000 + b"]" * 100000),
        ("safetensors header not UTF-8", struct.pack("<Q", 4) + b"\xff\xfe{}"),
        ("safetensors header a list", with_header([1, 2])),
        ("safetensors dtype a list", entry(lambda e: e.update(dtype=["F32"]))),
        ("safetensors shape 2^62 x 2^62", entry(lambda e: e.update(shape=[2**62, 2**62]))),
        ("safetensors shape a string", entry(lambda e: e.update(shape="8"))),
        ("safetensors shape of floats", entry(lambda e: e.update(shape=[8.0]))),
        ("safetensors data_offsets 2^64", entry(lambda e: e.update(data_offsets=[0, 2**64]))),
        ("safetensors data_offsets reversed", entry(lambda e: e.update(data_offsets=[32, 0]))),
        ("safetensors data_offsets of bools", entry(lambda e: e.update(data_offsets=[False, True]))),
        ("safetensors entry a number", entry(lambda e: (e.clear(), e.update(x=1)))),
        ("safetensors tensor name not a string", with_header(dict(header, **{"": header["model.norm.weight"]}))),
    ]
    return [(label, {"model.safetensors": d}) for label, d in cases]


def gguf_mutations(rng):
    """tests/fixtures/gguf/m3_moe.q8_0.gguf (qwen3moe, Q8_0): truncated, flipped bytes in its counts
    and tensor infos, and fields set to what this reader refuses"""
    with open(os.path.join(FIX, "gguf", "m3_moe.q8_0.gguf"), "rb") as f:
        g = f.read()
    infos = g.index(b"token_embd.weight") - 8  # (the tensor infos follow the metadata)

    def at(offset, fmt, *values):
        b = bytearray(g)
        struct.pack_into(fmt, b, offset, *values)
        return bytes(b)

    def info_field(tensor, skip, fmt, *values):  # fields of a tensor's info: skip bytes after its name
        return at(g.index(tensor.encode()) + len(tensor) + skip, fmt, *values)

    cases = [("gguf truncated", d) for d in truncations(g, 6)]
    cases += [("gguf count bit flip", d) for d in flips(g, rng, 8, 4, 24)]
    cases += [("gguf tensor info bit flip", d) for d in flips(g, rng, 16, infos, infos + 1200)]
    cases += [
        ("gguf version 99", at(4, "<I", 99)),
        ("gguf 2^63 tensors", at(8, "<Q", 2**63)),
        ("gguf 2^63 metadata keys", at(16, "<Q", 2**63)),
        ("gguf tensor of 9 dims", info_field("token_embd.weight", 0, "<I", 9)),
        ("gguf tensor type Q4_0", info_field("blk.0.attn_q.weight", 4 + 16, "<I", 2)),
        ("gguf tensor type 999", info_field("blk.0.attn_v.weight", 4 + 16, "<I", 999)),
        ("gguf tensor offset 2^62", info_field("output_norm.weight", 4 + 8 + 4, "<Q", 2**62)),
        ("gguf tensor dims 2^40", info_field("blk.1.ffn_norm.weight", 4, "<Q", 2**40)),
        ("gguf architecture gemma", g.replace(b"qwen3moe", b"gemma3xx", 1)),
        ("gguf tensor of 0 x 2^40", info_field("blk.0.attn_q.weight", 4, "<2Q", 0, 2**40)),
        ("gguf experts 2^40 of 0 x 0", info_field("blk.0.ffn_gate_exps.weight", 4, "<3Q", 0, 0, 2**40)),
    ]
    return [(label, {"model.gguf": d}) for label, d in cases]


def tokenizer_mutations(rng):
    tok = open(os.path.join(FIX, "tokenizer", "tokenizer.json"), "rb").read()
    cfg = open(os.path.join(FIX, "tokenizer", "tokenizer_config.json"), "rb").read()
    t = json.loads(tok)

    def tok_json(change):
        j = json.loads(tok)
        change(j)
        return {"tokenizer.json": json.dumps(j).encode()}

    def cfg_json(value):
        return {"tokenizer_config.json": json.dumps(value).encode()}

    cases = [("tokenizer.json truncated", {"tokenizer.json": d}) for d in truncations(tok, 4)]
    cases += [("tokenizer.json bit flip", {"tokenizer.json": d}) for d in flips(tok, rng, 10)]
    cases += [("tokenizer_config.json bit flip", {"tokenizer_config.json": d}) for d in flips(cfg, rng, 4)]
    cases += [
        ("tokenizer.json a list", {"tokenizer.json": b"[]"}),
        ("tokenizer.json nested 100000 deep", {"tokenizer.json": b"[" * 100000 + b"]" * 100000}),
        ("vocab a list", tok_json(lambda j: j["model"].update(vocab=list(t["model"]["vocab"])))),
        ("vocab id 2^70", tok_json(lambda j: j["model"]["vocab"].update(a=2**70))),
        ("merges a dict", tok_json(lambda j: j["model"].update(merges={"a": "b"}))),
        ("merges a number", tok_json(lambda j: j["model"].update(merges=5))),
        ("merge of numbers", tok_json(lambda j: j["model"]["merges"].insert(0, [1, 2]))),
        ("added_tokens a string", tok_json(lambda j: j.update(added_tokens="<|im_start|>"))),
        ("added token a number", tok_json(lambda j: j["added_tokens"].append(7))),
        ("added token id huge", tok_json(lambda j: j["added_tokens"].append({"id": 2**64, "content": "x"}))),
        ("added token content a list", tok_json(lambda j: j["added_tokens"].append({"id": 5, "content": ["x"]}))),
        ("tokenizer_config.json a list", cfg_json([])),
        ("bos_token a number", cfg_json({"bos_token": 5})),
        ("eos_token a dict without content", cfg_json({"eos_token": {"x": 1}})),
        ("chat_template a number", cfg_json({"chat_template": 5})),
        ("chat_template a list of numbers", cfg_json({"chat_template": [1, 2]})),
    ]
    return [("tokenizer: " + label, files) for label, files in cases]


def config_mutations():
    """config.json (--config) values of the wrong type or out of range"""
    values = [("max_position_embeddings", 2**40), ("max_position_embeddings", "32768"), ("rms_norm_eps", "abc"),
              ("rms_norm_eps", float("nan")), ("rope_theta", True), ("rope_theta", -1.0), ("head_dim", "x"),
              ("num_attention_heads", 8.5), ("num_experts_per_tok", [1])]
    cases = [(f"{key} = {v!r}", {key: v}) for key, v in values]
    for key, v in [("factor", "x"), ("factor", 0), ("original_max_position_embeddings", 2**40),
                   ("beta_fast", None), ("attention_factor", "big")]:
        rs = {"rope_type": "yarn", "factor": 4.0}
        rs[key] = v
        cases.append((f"rope_scaling {key} = {v!r}", {"model_type": "qwen3", "rope_scaling": rs}))
    cases.append(("a list", []))
    return [("config.json " + label, {"config.json": json.dumps(c).encode()}) for label, c in cases]


def cases(marker):
    rng = random.Random(6)
    return (pth_mutations(rng, marker) + safetensors_mutations(rng) + gguf_mutations(rng) +
            tokenizer_mutations(rng) + config_mutations())


def run_case(files, work):
    """export.py on the case's files (the fixture checkpoint / tokenizer where it has none)"""
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "tok"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(FIX, "tokenizer", name), os.path.join(work, "tok", name))
    checkpoint, extra = os.path.join(FIX, "m2_dense.pth"), []
    for name, data in files.items():
        path = os.path.join(work, "tok", name) if name.startswith("tokenizer") else os.path.join(work, name)
        with open(path, "wb") as f:
            f.write(data)
        if name == "config.json":
            extra = ["--config", path]
        elif not name.startswith("tokenizer"):
            checkpoint = path
    out = os.path.join(work, "out", "model.bin")
    os.makedirs(os.path.dirname(out))
    rc, err = run_export([checkpoint, out, "--tokenizer", os.path.join(work, "tok")] + extra)
    return rc, err, out


def main():
    """python3 tests/export_mutations.py: every case, one line each"""
    work = os.path.join(ROOT, "tests", "tmp", "mutations")
    marker = os.path.join(ROOT, "tests", "tmp", "pwned")
    bad = 0
    for label, files in cases(marker):
        rc, err, out = run_case(files, work)
        problem = verdict(rc, err, out, marker)
        bad += problem is not None
        print(f"{'FAIL' if problem else 'ok  '} {label}: {problem or (err.strip() or 'exported')[:120]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
