#!/usr/bin/env python3
"""export.py: turn a MiniMind checkpoint into one minimind.c model file (layout: model.h).

    python3 export.py CHECKPOINT OUT.bin [--tokenizer PATH] [--dtype f32|f16|bf16|q8_0]
                      [--lora FILE] [--config FILE] [--n-heads N]

CHECKPOINT is one of
  - a native MiniMind .pth (torch.save zip of the state dict, fp16/bf16/fp32),
  - a *_resume.pth training checkpoint (state dict under the key "model"),
  - a transformers folder (config.json + model.safetensors or pytorch_model.bin),
  - a single .safetensors file,
  - a GGUF file (llama.cpp's: arch llama, qwen3 or qwen3moe; F32, F16, BF16 or Q8_0 tensors), which
    carries its own config, tokenizer and chat template (--tokenizer overrides the tokenizer).
Python standard library only: no torch, no numpy. A .pth is read with a restricted unpickler
that admits only the few globals a state dict needs, so a malicious file cannot run code.

The file is written tensor by tensor. Converting the weights (f16 to q8_0, say) is ./quantize's
work when it is built (make; quantize.c), beside this file, and this file's own Python
otherwise: the same bytes either way, the Python 10 to 50 times slower where it converts. MINIMIND_QUANTIZE=PATH
names another quantize program; MINIMIND_QUANTIZE= (empty) uses the Python.
"""
import argparse
import array
import collections
import io
import json
import math
import mmap
import os
import pickle
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib

# ----------------------------------------------------------------------------------------------
# The file format: these numbers mirror model.h

MM_MAGIC, MM_VERSION, MM_ALIGN, MM_NAME_LEN, MM_Q8_GROUP, MM_Q8_PANEL = 0x444E4D4D, 2, 64, 64, 32, 16
HEADER_SIZE, ENTRY_SIZE = 256, 104
GEN_MINIMIND2, GEN_MINIMIND3 = 2, 3
FLAG_QK_NORM, FLAG_TIED_EMBED, FLAG_MOE = 1, 2, 4
MOE_NORM_NEVER, MOE_NORM_IF_K_GT_1, MOE_NORM_ALWAYS = 0, 1, 2
ROPE_NONE, ROPE_LINEAR, ROPE_YARN = 0, 1, 2
CHAT_NONE, CHAT_CHATML, CHAT_MINIMIND2, CHAT_MINIMIND3, CHAT_MINIMIND2_NO_TOOLS = 0, 1, 2, 3, 4
DTYPES = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3}
TOKEN_NORMAL, TOKEN_ADDED, TOKEN_SPECIAL = 0, 1, 2

# mm_header, field by field (see model.h); 128 bytes of uint32/float, 4 uint64, 96 reserved
HEADER_FIELDS = [
    ("magic", "I"), ("version", "I"), ("header_size", "I"), ("generation", "I"), ("flags", "I"),
    ("dim", "I"), ("n_layers", "I"), ("n_heads", "I"), ("n_kv_heads", "I"), ("head_dim", "I"),
    ("hidden_dim", "I"), ("vocab_size", "I"), ("max_seq_len", "I"), ("rms_eps", "f"),
    ("rope_theta", "f"), ("n_experts", "I"), ("n_experts_per_tok", "I"),
    ("n_shared_experts", "I"), ("moe_hidden_dim", "I"), ("moe_norm", "I"), ("rope_scaling", "I"),
    ("rope_factor", "f"), ("yarn_orig_ctx", "I"), ("yarn_beta_fast", "f"),
    ("yarn_beta_slow", "f"), ("yarn_attn_factor", "f"), ("bos_id", "I"), ("eos_id", "I"),
    ("pad_id", "I"), ("chat_template", "I"), ("n_tensors", "I"), ("reserved0", "I"),
    ("tokenizer_offset", "Q"), ("tokenizer_size", "Q"), ("tensor_table_offset", "Q"),
    ("file_size", "Q"),
]
HEADER_STRUCT = "<" + "".join(t for _, t in HEADER_FIELDS) + "96x"
assert struct.calcsize(HEADER_STRUCT) == HEADER_SIZE


class ExportError(Exception):
    """A problem with the user's input: printed as one line, exit status 1."""


def fail(msg):
    raise ExportError(msg)


# ----------------------------------------------------------------------------------------------
# Tensors as read from a checkpoint: raw little-endian bytes of a contiguous array

ELEM_SIZE = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1,
             "u8": 1, "bool": 1}


Q8_BLOCK = 2 + MM_Q8_GROUP  # a GGUF Q8_0 block: an f16 scale, then 32 int8 codes


def tensor_bytes(dtype, shape):
    if dtype == "q8_0":  # GGUF's blocks along each row
        return numel(shape) // MM_Q8_GROUP * Q8_BLOCK
    return numel(shape) * ELEM_SIZE[dtype]


class Tensor:
    def __init__(self, dtype, shape, data, source):
        self.dtype, self.shape, self.data, self.source = dtype, tuple(shape), data, source
        if dtype == "q8_0" and (not self.shape or self.shape[-1] % MM_Q8_GROUP):
            fail(f"{source}: a q8_0 tensor of shape {list(shape)}: its rows are not whole blocks of {MM_Q8_GROUP}")
        if len(data) != tensor_bytes(dtype, self.shape):
            fail(f"{source}: tensor data has {len(data)} bytes, shape {list(shape)} of {dtype} "
                 f"needs {tensor_bytes(dtype, self.shape)}")

    def floats(self):
        """The values as array('f') (float32)."""
        data = self.data
        if self.dtype == "f32":
            out = array.array("f")
            out.frombytes(data)
        elif self.dtype == "f16":
            out = array.array("f", struct.unpack("<%de" % (len(data) // 2), data))
        elif self.dtype == "bf16":  # bf16 is the top half of an f32: put its 2 bytes on top
            wide = bytearray(2 * len(data))
            wide[2::4], wide[3::4] = data[0::2], data[1::2]
            out = array.array("f")
            out.frombytes(bytes(wide))
        elif self.dtype == "q8_0":  # each value its code times its block's scale (exact in f32)
            n_blocks = len(data) // Q8_BLOCK
            scales = struct.unpack(f"<{n_blocks}e", b"".join(
                data[b * Q8_BLOCK:b * Q8_BLOCK + 2] for b in range(n_blocks)))
            codes = array.array("b", b"".join(data[b * Q8_BLOCK + 2:(b + 1) * Q8_BLOCK]
                                              for b in range(n_blocks)))
            out = array.array("f", (codes[i] * scales[i // MM_Q8_GROUP] for i in range(len(codes))))
        else:
            fail(f"{self.source}: dtype {self.dtype} is not a floating-point weight type "
                 f"(expected f16, bf16 or f32)")
        return out


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


# ----------------------------------------------------------------------------------------------
# torch.save zip files (.pth, pytorch_model.bin), read with a restricted unpickler

class _HostilePickle(ExportError):
    """Raised while unpickling, where the file name is not at hand: read_torch_zip adds it."""


def _refuse_build(self, state):
    raise _HostilePickle("the pickle modifies a tensor object (BUILD), which a state dict does not")


class _StorageRef:
    __setstate__ = _refuse_build  # a BUILD opcode must not overwrite dtype or key

    def __init__(self, dtype, key):
        self.dtype, self.key = dtype, key


class _TensorRef:
    __setstate__ = _refuse_build  # a BUILD opcode must not overwrite storage, size or stride

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _is_count(v):
    return type(v) is int and v >= 0  # not bool, not float, not negative


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise _HostilePickle(f"a tensor refers to a {type(storage).__name__}, not a storage")
    if not _is_count(storage_offset):
        raise _HostilePickle(f"a tensor has storage offset {storage_offset!r}, not an integer >= 0")
    for what, v in (("size", size), ("stride", stride)):
        if not isinstance(v, (tuple, list)) or not all(_is_count(x) for x in v):
            raise _HostilePickle(f"a tensor has {what} {v!r}, not a tuple of integers >= 0")
    if len(size) != len(stride):
        raise _HostilePickle(f"a tensor has size {tuple(size)} but stride {tuple(stride)} "
                             f"(different lengths)")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_STORAGE_TYPES = {"HalfStorage": "f16", "FloatStorage": "f32", "BFloat16Storage": "bf16",
                  "DoubleStorage": "f64", "LongStorage": "i64", "IntStorage": "i32",
                  "ShortStorage": "i16", "CharStorage": "i8", "ByteStorage": "u8",
                  "BoolStorage": "bool"}
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, source):
        super().__init__(f)
        self.source = source

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        fail(f"{self.source}: the pickle names the global {module}.{name}, which a state dict "
             f"does not need; refusing to load it")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and pid[1] in ELEM_SIZE and isinstance(pid[2], str)):
            fail(f"{self.source}: unexpected persistent id in the pickle")
        return _StorageRef(pid[1], pid[2])


def _contiguous_strides(size):
    strides, acc = [], 1
    for s in reversed(size):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


MAPPED = []  # the checkpoint files read, mapped: their pages leave memory after each tensor written


def map_file(path):
    """the file's bytes, mapped (no copy: a tensor's data is a view of its part)"""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return memoryview(b"")
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    MAPPED.append(m)
    return memoryview(m)


def release_mapped():
    """drop the mapped files' pages from this process's memory (the page cache keeps them)"""
    for m in MAPPED:
        if hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            m.madvise(mmap.MADV_DONTNEED)


def stored_entry(zf, name, path):
    """an archive member's bytes: for a stored (uncompressed) one, as torch.save writes them, a
    view of the mapped file, its CRC checked; else read"""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        return zf.read(name)
    raw = stored_entry.maps.get(path)
    if raw is None:
        raw = stored_entry.maps[path] = map_file(path)
    at = info.header_offset
    if at + 30 > len(raw) or bytes(raw[at:at + 4]) != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for {name}")
    start = at + 30 + struct.unpack_from("<H", raw, at + 26)[0] + struct.unpack_from("<H", raw, at + 28)[0]
    if start + info.file_size > len(raw):
        raise zipfile.BadZipFile(f"{name} runs past the end of the file")
    data = raw[start:start + info.file_size]
    if zlib.crc32(data) != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {name!r}")
    release_mapped()
    return data


stored_entry.maps = {}


def read_torch_zip(path):
    """The state dict of a torch.save zip file: {name: Tensor}, or the whole object for resume files."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        fail(f"{path}: not a torch.save zip archive (truncated, corrupt, or the legacy pre-1.6 "
             f"format, which is not supported)")
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            fail(f"{path}: expected exactly one */data.pkl in the archive, found {len(pkls)}")
        prefix = pkls[0][: -len("data.pkl")]
        try:
            obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), path).load()
        except _HostilePickle as e:
            fail(f"{path}: {e}")
        except ExportError:
            raise
        except Exception as e:  # any malformed pickle is the file's fault, not ours
            fail(f"{path}: corrupt pickle in {pkls[0]} ({type(e).__name__}: {e})")
        storages = {}

        def materialize(ref, name):
            st = ref.storage
            es = ELEM_SIZE[st.dtype]
            if st.key not in storages:
                try:
                    storages[st.key] = stored_entry(zf, prefix + "data/" + st.key, path)
                except KeyError:
                    fail(f"{path}: tensor {name} refers to storage {st.key}, missing from the archive")
                except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                    fail(f"{path}: cannot read storage {st.key} ({e})")
            buf = storages[st.key]
            size, stride = ref.size, ref.stride
            # _rebuild_tensor_v2 checked these; check again before numel() and the loops use them
            if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
                    and all(_is_count(v) for v in size + stride + (ref.offset,))):
                fail(f"{path}: tensor {name} has an invalid size, stride or offset")
            n = numel(size)
            if n == 0:
                return Tensor(st.dtype, size, b"", f"{path}:{name}")
            if n * es > len(buf):  # also bounds the element-by-element gather below
                fail(f"{path}: tensor {name} has {n} elements of {es} bytes, more than its "
                     f"storage's {len(buf)} bytes hold (a stride of 0 repeating elements?)")
            last = ref.offset + sum((s - 1) * d for s, d in zip(size, stride))
            if (last + 1) * es > len(buf):
                fail(f"{path}: tensor {name} reaches past the end of its storage "
                     f"({(last + 1) * es} > {len(buf)} bytes)")
            dims = [(s, d) for s, d in zip(size, stride) if s != 1]
            if [d for _, d in dims] == [d for s, d in zip(size, _contiguous_strides(size)) if s != 1]:
                data = buf[ref.offset * es: (ref.offset + n) * es]
            else:  # a strided view (rare in state dicts): gather element by element
                out = bytearray()
                for flat in range(n):
                    off, rem = ref.offset, flat
                    for s, d in reversed(list(zip(size, stride))):
                        off += (rem % s) * d
                        rem //= s
                    out += buf[off * es: (off + 1) * es]
                data = bytes(out)
            return Tensor(st.dtype, size, data, f"{path}:{name}")

        def convert(o, name=""):
            if isinstance(o, _TensorRef):
                return materialize(o, name)
            if isinstance(o, dict):
                return {k: convert(v, k if isinstance(k, str) else name) for k, v in o.items()}
            return o

        if not isinstance(obj, dict):
            fail(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
        if "model" in obj and isinstance(obj["model"], dict):  # *_resume.pth training checkpoint
            obj = obj["model"]
        state = {}
        for k, v in obj.items():
            if not isinstance(k, str) or not isinstance(v, _TensorRef):
                fail(f"{path}: entry {k!r} of the state dict is not a named tensor")
            try:
                state[k] = convert(v, k)
            except ExportError:
                raise
            except Exception as e:  # a backstop: whatever else the pickle built is the file's fault
                fail(f"{path}: tensor {k} cannot be read ({type(e).__name__}: {e})")
        return state


# ----------------------------------------------------------------------------------------------
# safetensors

_ST_DTYPES = {"F16": "f16", "BF16": "bf16", "F32": "f32"}


def read_safetensors(path):
    raw = map_file(path)
    if len(raw) < 8:
        fail(f"{path}: too short for a safetensors file ({len(raw)} bytes)")
    (hlen,) = struct.unpack("<Q", raw[:8])
    if hlen > len(raw) - 8:
        fail(f"{path}: safetensors header length {hlen} exceeds the file ({len(raw)} bytes)")
    try:
        header = json.loads(bytes(raw[8: 8 + hlen]).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested past Python's stack
        fail(f"{path}: safetensors header is not valid JSON ({type(e).__name__}: {e})")
    if not isinstance(header, dict):
        fail(f"{path}: safetensors header is not a JSON object")
    body = memoryview(raw)[8 + hlen:]
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            fail(f"{path}: tensor {name}: header entry lacks dtype, shape or data_offsets")
        if not isinstance(info["dtype"], str) or info["dtype"] not in _ST_DTYPES:
            fail(f"{path}: tensor {name} has dtype {info['dtype']}; supported: F16, BF16, F32")
        shape, offs = info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) for o in offs) or not 0 <= offs[0] <= offs[1] <= len(body)):
            fail(f"{path}: tensor {name}: shape {shape} or data_offsets {offs} invalid for a "
                 f"{len(body)}-byte data section")
        state[name] = Tensor(_ST_DTYPES[info["dtype"]], shape, body[offs[0]:offs[1]], f"{path}:{name}")
    return state


# ----------------------------------------------------------------------------------------------
# GGUF files (llama.cpp's format): metadata, tensors, and the tokenizer and chat template inside

GGUF_TYPES = {0: "f32", 1: "f16", 8: "q8_0", 30: "bf16"}  # the ggml tensor types read here
GGUF_TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
                   12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 28: "F64"}
# ggml's names for a block's tensors -> the checkpoint's (blk.N. -> model.layers.N.)
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_experts.0.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.0.up_proj", "ffn_down_shexp": "mlp.shared_experts.0.down_proj"}
GGUF_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight"}
GGUF_ARCHS = ("llama", "qwen3", "qwen3moe")


class _GGUFReader:
    def __init__(self, raw, path):
        self.raw, self.at, self.path = raw, 0, path

    def take(self, fmt):
        n = struct.calcsize(fmt)
        if self.at + n > len(self.raw):
            fail(f"{self.path}: GGUF file ends inside its header (at byte {self.at})")
        v = struct.unpack_from(fmt, self.raw, self.at)
        self.at += n
        return v[0] if len(v) == 1 else v

    def string(self):
        n = self.take("<Q")
        if n > len(self.raw) - self.at:
            fail(f"{self.path}: GGUF string of {n} bytes runs past the end of the file")
        b = bytes(self.raw[self.at:self.at + n])
        self.at += n
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            fail(f"{self.path}: GGUF string at byte {self.at - n} is not UTF-8")

    SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
               12: "<d"}

    def value(self, vtype, depth=0):
        if vtype in self.SCALARS:
            return self.take(self.SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9 and depth == 0:
            item, count = self.take("<I"), self.take("<Q")
            if item in self.SCALARS and item != 7:  # numbers: read in one go
                fmt = self.SCALARS[item][1]
                if count * struct.calcsize(fmt) > len(self.raw) - self.at:
                    fail(f"{self.path}: GGUF array of {count} values runs past the end of the file")
                arr = array.array({"B": "B", "b": "b", "H": "H", "h": "h", "I": "I", "i": "i", "f": "f",
                                   "Q": "Q", "q": "q", "d": "d"}[fmt])
                arr.frombytes(bytes(self.raw[self.at:self.at + count * arr.itemsize]))
                self.at += count * arr.itemsize
                return arr.tolist()
            if count > len(self.raw) - self.at:
                fail(f"{self.path}: GGUF array of {count} values runs past the end of the file")
            return [self.value(item, 1) for _ in range(count)]
        fail(f"{self.path}: GGUF metadata value of type {vtype} (at byte {self.at}) is not one GGUF defines")


def read_gguf(path):
    """A GGUF file as (state dict in the checkpoint's names, a config.json-like dict, the tokenizer
    as tokenizer.json and tokenizer_config.json would hold it). Architectures llama (MiniMind2: the
    q/k rows llama.cpp's converter permuted are put back), qwen3 and qwen3moe (minimind-3, dense and
    MoE); tensors F32, F16, BF16 and Q8_0."""
    raw = map_file(path)
    r = _GGUFReader(raw, path)
    if r.take("<4s") != b"GGUF":
        fail(f"{path}: not a GGUF file (no GGUF magic)")
    version = r.take("<I")
    if version not in (2, 3):
        fail(f"{path}: GGUF version {version}; this reads versions 2 and 3")
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    if n_tensors > len(raw) or n_kv > len(raw):
        fail(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} metadata keys, more than the file holds")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.take("<I"))
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        fail(f"{path}: GGUF architecture {arch!r}; MiniMind's are llama (MiniMind2), qwen3 and qwen3moe (minimind-3)")
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.take("<I")
        if not 1 <= n_dims <= 4:
            fail(f"{path}: tensor {name} has {n_dims} dimensions")
        dims = [r.take("<Q") for _ in range(n_dims)]
        if 0 in dims or max(dims) > 1 << 31:
            fail(f"{path}: tensor {name} has dimensions {dims}: none may be 0 or above 2^31")
        ggml_type, offset = r.take("<I"), r.take("<Q")
        if ggml_type not in GGUF_TYPES:
            fail(f"{path}: tensor {name} has type {GGUF_TYPE_NAMES.get(ggml_type, ggml_type)}; "
                 f"this reads F32, F16, BF16 and Q8_0 (requantize with llama-quantize)")
        infos.append((name, dims, GGUF_TYPES[ggml_type], offset))
    align_to = meta.get("general.alignment", 32)
    if not isinstance(align_to, int) or align_to <= 0 or align_to & (align_to - 1):
        fail(f"{path}: general.alignment {align_to!r} is not a power of two")
    base = (r.at + align_to - 1) // align_to * align_to

    def key(k, default=None):
        return meta.get(f"{arch}.{k}", default)

    n_head, n_head_kv = key("attention.head_count"), key("attention.head_count_kv", key("attention.head_count"))
    for k, v in (("attention.head_count", n_head), ("attention.head_count_kv", n_head_kv)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            fail(f"{path}: {arch}.{k} is {v!r}, expected a positive integer (one for every layer)")
    state = {}
    for name, dims, dtype, offset in infos:
        shape = tuple(reversed(dims))  # ggml lists the fastest-moving dimension first
        size = tensor_bytes(dtype, shape) if dtype != "q8_0" or shape[-1] % MM_Q8_GROUP == 0 else -1
        if size < 0:
            fail(f"{path}: tensor {name} is Q8_0 with rows of {shape[-1]}, not whole blocks of {MM_Q8_GROUP}")
        start = base + offset
        if start + size > len(raw):
            fail(f"{path}: tensor {name} ({size} bytes at {start}) runs past the end of the file ({len(raw)} bytes)")
        data = raw[start:start + size]
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if name in GGUF_GLOBAL_NAMES:
            state[GGUF_GLOBAL_NAMES[name]] = Tensor(dtype, shape, data, f"{path}:{name}")
        elif m and m.group(2) in GGUF_EXPERTS and len(shape) == 3:  # [experts, rows, cols]: one per expert
            n_exp, rows, cols = shape
            each = size // n_exp if n_exp else 0
            for e in range(n_exp):
                state[f"model.layers.{m.group(1)}.mlp.experts.{e}.{GGUF_EXPERTS[m.group(2)]}.weight"] = Tensor(
                    dtype, (rows, cols), data[e * each:(e + 1) * each], f"{path}:{name}[{e}]")
        elif m and m.group(2) in GGUF_LAYER_NAMES:
            t = Tensor(dtype, shape, data, f"{path}:{name}")
            if arch == "llama" and m.group(2) in ("attn_q", "attn_k") and len(shape) == 2:
                t = unpermute_rows(t, n_head if m.group(2) == "attn_q" else n_head_kv, path, name)
            state[f"model.layers.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}.weight"] = t
        else:
            fail(f"{path}: GGUF tensor {name} ({arch}) is not one of a MiniMind model's")

    config = {"model_type": f"gguf-{arch}", "num_attention_heads": n_head, "num_key_value_heads": n_head_kv}
    for k, ck in (("attention.key_length", "head_dim"), ("context_length", "max_position_embeddings"),
                  ("attention.layer_norm_rms_epsilon", "rms_norm_eps"), ("rope.freq_base", "rope_theta"),
                  ("expert_used_count", "num_experts_per_tok"), ("expert_weights_norm", "norm_topk_prob")):
        if key(k) is not None:
            config[ck] = key(k)
    kind = key("rope.scaling.type")
    if kind not in (None, "none"):
        rs = {"rope_type": kind}
        for k, ck in (("rope.scaling.factor", "factor"),
                      ("rope.scaling.original_context_length", "original_max_position_embeddings"),
                      ("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if key(k) is not None:
                rs[ck] = key(k)
        factor, attn = rs.get("factor"), key("rope.scaling.attn_factor")
        if kind == "yarn" and isinstance(attn, (int, float)) and isinstance(factor, (int, float)) and factor > 0:
            # llama.cpp multiplies YaRN's own 0.1 ln F + 1 by attn_factor; transformers' attention_factor
            # is the whole product
            rs["attention_factor"] = attn * (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        config["rope_scaling"] = rs
    return state, config, gguf_tokenizer(meta, path)


def unpermute_rows(t, n_head, path, name):
    """llama.cpp's converter interleaves the two halves of each head's q and k rows for its RoPE
    (row h*hd + j*hd/2 + i becomes row h*hd + 2i + j): the inverse, whole rows moved (any dtype)"""
    rows = t.shape[0]
    if n_head <= 0 or rows % (2 * n_head):
        fail(f"{path}: {name} has {rows} rows, not {n_head} heads of an even head_dim")
    hd = rows // n_head
    row_bytes = len(t.data) // rows
    out = bytearray(len(t.data))
    for h in range(n_head):
        for j in range(2):
            for i in range(hd // 2):
                src, dst = h * hd + 2 * i + j, h * hd + j * (hd // 2) + i
                out[dst * row_bytes:(dst + 1) * row_bytes] = t.data[src * row_bytes:(src + 1) * row_bytes]
    return Tensor(t.dtype, t.shape, bytes(out), t.source)


def gguf_tokenizer(meta, path):
    """tokenizer.ggml.* as (tokenizer.json, tokenizer_config.json) dicts: byte-level BPE (model gpt2)
    tokens, merges and token types (3: control, a special token; 4: user-defined, an added one)"""
    model = meta.get("tokenizer.ggml.model")
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if model is None or tokens is None:
        return None
    if model != "gpt2":
        fail(f"{path}: GGUF tokenizer model {model!r}; MiniMind's is byte-level BPE (gpt2)")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        fail(f"{path}: tokenizer.ggml.tokens is not a list of strings")
    if types is None:
        types = [1] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
        fail(f"{path}: tokenizer.ggml.token_type is not one integer for each of the {len(tokens)} tokens")
    vocab, added = {}, []
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind in (3, 4):
            added.append({"id": i, "content": t, "special": kind == 3})
        else:
            vocab.setdefault(t, i)
    merges = meta.get("tokenizer.ggml.merges") or []
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "added_tokens": added}
    tcfg = {"chat_template": meta.get("tokenizer.chat_template") or ""}
    for k, ck in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        i = meta.get(f"tokenizer.ggml.{k}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens):
            tcfg[ck] = tokens[i]
    return tok, tcfg


# ----------------------------------------------------------------------------------------------
# Finding the checkpoint's files and config

def read_json(path, what):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as e:
        fail(f"{path}: cannot read {what} ({e.strerror})")
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested past Python's stack
        fail(f"{path}: {what} is not valid JSON ({type(e).__name__}: {e})")


def read_state_file(path):
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        return read_torch_zip(path)
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    fail(f"{path}: neither a torch.save zip archive nor a .safetensors file")


def load_checkpoint(path, config_path, gguf_ok=False, n_heads=None):
    """Returns (state dict {name: Tensor}, config dict or None); a GGUF file (gguf_ok) also its
    tokenizer: (state, config, tokenizer)."""
    if not os.path.exists(path):
        fail(f"{path}: no such file or folder")
    config = None
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        if is_gguf and not gguf_ok:
            fail(f"{path}: a GGUF file, which is a checkpoint to export, not a LoRA file")
        if is_gguf:
            if config_path is not None:
                fail(f"{path}: a GGUF file carries its own config; --config does not apply")
            if n_heads is not None:
                fail(f"{path}: a GGUF file carries its own head counts; --n-heads does not apply")
            return read_gguf(path)
    if os.path.isdir(path):
        folder = path
        files = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")]
        index = os.path.join(path, "model.safetensors.index.json")
        state = {}
        if os.path.exists(index):  # sharded safetensors
            shards = sorted(set(read_json(index, "safetensors index").get("weight_map", {}).values()))
            for shard in shards:
                if os.path.basename(shard) != shard:
                    fail(f"{index}: shard name {shard!r} is not a plain file name")
                state.update(read_safetensors(os.path.join(path, shard)))
        else:
            found = [p for p in files if os.path.exists(p)]
            if not found:
                fail(f"{path}: folder has neither model.safetensors nor pytorch_model.bin")
            state = read_state_file(found[0])
    else:
        folder = os.path.dirname(os.path.abspath(path))
        state = read_state_file(path)
    if config_path is None and os.path.exists(os.path.join(folder, "config.json")):
        config_path = os.path.join(folder, "config.json")
    if config_path is not None:
        config = read_json(config_path, "config")
        if not isinstance(config, dict):
            fail(f"{config_path}: config is not a JSON object")
    clean = {}
    for name, t in state.items():
        short = name
        while True:  # torch.compile and DDP wrappers
            for p in ("_orig_mod.", "module."):
                if short.startswith(p):
                    short = short[len(p):]
                    break
            else:
                break
        if short in clean:
            fail(f"{path}: tensor {short} appears twice (as {name} and another prefixed name)")
        clean[short] = t
    unfuse_experts(clean, path)
    return clean, config


FUSED_EXPERTS = re.compile(r"(.*\.mlp\.experts\.)(gate_up_proj|down_proj)$")


def unfuse_experts(state, path):
    """transformers >= 5 keeps a MoE layer's experts fused (MiniMind's scripts/convert_model.py
    writes them so): mlp.experts.gate_up_proj [experts, 2 x moe_intermediate, hidden], each
    expert's gate rows then its up rows, and mlp.experts.down_proj [experts, hidden,
    moe_intermediate]. Split them into the per-expert gate_proj, up_proj and down_proj that
    MiniMind's own checkpoints hold (the same bytes: each expert's matrices are contiguous)."""
    for name in sorted(n for n in state if FUSED_EXPERTS.match(n)):
        t = state.pop(name)
        prefix, kind = FUSED_EXPERTS.match(name).groups()
        if len(t.shape) != 3 or 0 in t.shape or (kind == "gate_up_proj" and t.shape[1] % 2):
            fail(f"{path}: fused experts {name} have shape {list(t.shape)}, expected "
                 + ("[experts, 2 x ffn, hidden]" if kind == "gate_up_proj" else "[experts, hidden, ffn]"))
        n_experts, rows, cols = t.shape
        size = rows * cols * ELEM_SIZE[t.dtype]
        parts = [("down_proj", rows, 0)] if kind == "down_proj" else \
            [("gate_proj", rows // 2, 0), ("up_proj", rows // 2, size // 2)]
        for e in range(n_experts):
            for part, part_rows, at in parts:
                split = f"{prefix}{e}.{part}.weight"
                if split in state:
                    fail(f"{path}: {split} is there both fused ({name}) and on its own")
                start = e * size + at
                state[split] = Tensor(t.dtype, (part_rows, cols), t.data[start:start + part_rows * cols *
                                                                        ELEM_SIZE[t.dtype]], f"{t.source}[{e}]")


# ----------------------------------------------------------------------------------------------
# LoRA: merged weight = W + B @ A for every module the LoRA file names

def merge_lora(weights, lora_path):
    lora, _ = load_checkpoint(lora_path, None)
    pairs = {}
    for name, t in lora.items():
        m = re.fullmatch(r"(.+)\.lora\.(A|B)\.weight", name)
        if not m:
            fail(f"{lora_path}: unexpected tensor {name} (a LoRA file holds <module>.lora.A/B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    for module, ab in sorted(pairs.items()):
        target = module + ".weight"
        if set(ab) != {"A", "B"}:
            fail(f"{lora_path}: module {module} has lora.{next(iter(ab))} but not its partner")
        if target not in weights:
            fail(f"{lora_path}: LoRA for {module}, but the checkpoint has no tensor {target}")
        out_f, in_f = weights[target]["shape"]
        A, B = ab["A"], ab["B"]
        if len(A.shape) != 2 or len(B.shape) != 2 or A.shape[1] != in_f or B.shape[0] != out_f \
                or A.shape[0] != B.shape[1]:
            fail(f"{lora_path}: {module}: A {list(A.shape)} and B {list(B.shape)} do not fit "
                 f"weight [{out_f}, {in_f}]")
        rank = A.shape[0]
        if weights[target]["values"] is None:  # (merged in f32; written from these values)
            weights[target]["values"] = weights[target]["tensor"].floats()
        a, b, w = A.floats(), B.floats(), weights[target]["values"]
        a_rows = [a[k * in_f:(k + 1) * in_f] for k in range(rank)]
        for o in range(out_f):
            row = w[o * in_f:(o + 1) * in_f].tolist()
            for k in range(rank):
                c = b[o * rank + k]
                if c != 0.0:
                    row = [x + c * y for x, y in zip(row, a_rows[k])]
            w[o * in_f:(o + 1) * in_f] = array.array("f", row)
    return len(pairs)


# ----------------------------------------------------------------------------------------------
# The architecture, from tensor names and shapes (and config.json when there is one)

LAYER_TENSOR = re.compile(
    r"model\.layers\.(\d+)\.("
    r"input_layernorm|post_attention_layernorm|self_attn\.[qkvo]_proj|self_attn\.[qk]_norm|"
    r"mlp\.(?:gate|up|down)_proj|mlp\.gate|mlp\.experts\.(\d+)\.(?:gate|up|down)_proj|"
    r"mlp\.shared_experts\.(\d+)\.(?:gate|up|down)_proj)\.weight")
GLOBAL_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def cfg_get(config, key, default):
    v = config.get(key) if config else None
    return default if v is None else v


def cfg_number(source, key, default, lo, hi, kind=float, where="config.json"):
    """source[key] as a finite int or float in [lo, hi], else a one-line error; default when absent
    (the callers check derived defaults themselves)."""
    v = source.get(key) if source else None
    if v is None:
        return default
    ok_type = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not (math.isfinite(v) and lo <= v <= hi):
        bounds = f"[{lo}, {hi}]" if kind is int else f"[{lo:g}, {hi:g}]"
        fail(f"{where}: {key} = {v!r}, expected {'an integer' if kind is int else 'a number'} in {bounds}")
    return kind(v)


def infer_config(state, config, n_heads_flag, path):
    unknown = sorted(n for n in state if n not in GLOBAL_TENSORS and not LAYER_TENSOR.fullmatch(n))
    if unknown:
        fail(f"{path}: unknown tensors (not a MiniMind checkpoint?): {', '.join(unknown[:5])}"
             + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    for req in ("model.embed_tokens.weight", "model.norm.weight"):
        if req not in state:
            fail(f"{path}: missing tensor {req}")

    def shape(name):
        if name not in state:
            fail(f"{path}: missing tensor {name}")
        if not 1 <= len(state[name].shape) <= 2:
            fail(f"{path}: tensor {name} has shape {list(state[name].shape)}, expected 1 or 2 dims")
        return state[name].shape

    if len(shape("model.embed_tokens.weight")) != 2:
        fail(f"{path}: model.embed_tokens.weight has shape {list(shape('model.embed_tokens.weight'))}, "
             f"expected [vocab, hidden]")
    vocab, dim = shape("model.embed_tokens.weight")
    if vocab == 0 or dim == 0:  # else a zero-element [2^32-1, 0] embedding sets the tokenizer's loop count
        fail(f"{path}: model.embed_tokens.weight has shape [{vocab}, {dim}], which holds no weights")
    layers, experts, shared = set(), set(), set()
    for n in state:
        m = LAYER_TENSOR.fullmatch(n)
        if m:
            layers.add(int(m.group(1)))
            if m.group(3) is not None:
                experts.add(int(m.group(3)))
            if m.group(4) is not None:
                shared.add(int(m.group(4)))
    n_layers = len(layers)
    if n_layers == 0 or layers != set(range(n_layers)):
        fail(f"{path}: layer indices {sorted(layers)[:8]} are not 0..L-1")
    for what, s in (("experts", experts), ("shared_experts", shared)):
        if s != set(range(len(s))):
            fail(f"{path}: mlp.{what} indices {sorted(s)} are not 0..N-1")

    qk_norm = "model.layers.0.self_attn.q_norm.weight" in state
    gen = GEN_MINIMIND3 if qk_norm else GEN_MINIMIND2
    moe = "model.layers.0.mlp.gate.weight" in state
    q_out = shape("model.layers.0.self_attn.q_proj.weight")[0]
    if qk_norm:  # minimind-3: q_norm's length is head_dim, so the shapes give the head count
        head_dim = shape("model.layers.0.self_attn.q_norm.weight")[0]
        n_heads = n_heads_flag or cfg_number(config, "num_attention_heads", q_out // max(head_dim, 1), 1, 4096, int)
    else:  # MiniMind2: head_dim = hidden / heads, and heads are not in any shape (releases use 8)
        n_heads = n_heads_flag or cfg_number(config, "num_attention_heads", 8, 1, 4096, int)
        head_dim = cfg_number(config, "head_dim", dim // n_heads if isinstance(n_heads, int) and n_heads > 0 else 0,
                              0, 1 << 16, int)
    if not isinstance(n_heads, int) or n_heads <= 0 or head_dim <= 0 or q_out != n_heads * head_dim:
        fail(f"{path}: q_proj has {q_out} outputs, not n_heads {n_heads} x head_dim {head_dim} "
             f"(pass --n-heads or --config)")
    if head_dim % 2:
        fail(f"{path}: head_dim {head_dim} is odd; RoPE needs pairs")
    k_out = shape("model.layers.0.self_attn.k_proj.weight")[0]
    n_kv_heads = k_out // head_dim
    if k_out % head_dim or n_kv_heads == 0 or n_heads % n_kv_heads:
        fail(f"{path}: k_proj has {k_out} outputs: not a divisor of {n_heads} heads of {head_dim}")

    c = dict(generation=gen, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
             head_dim=head_dim, vocab_size=vocab, hidden_dim=0, n_experts=0, n_experts_per_tok=0,
             n_shared_experts=0, moe_hidden_dim=0, moe_norm=MOE_NORM_NEVER)
    if moe:
        n_exp = shape("model.layers.0.mlp.gate.weight")[0]
        if n_exp != len(experts):
            fail(f"{path}: router mlp.gate.weight routes to {n_exp} experts, checkpoint has {len(experts)}")
        k = cfg_get(config, "num_experts_per_tok", 2 if gen == GEN_MINIMIND2 else 1)
        if not isinstance(k, int) or not 1 <= k <= n_exp:
            fail(f"{path}: num_experts_per_tok {k} is not between 1 and {n_exp}")
        norm = bool(cfg_get(config, "norm_topk_prob", True))
        c.update(n_experts=n_exp, n_experts_per_tok=k, n_shared_experts=len(shared),
                 moe_hidden_dim=shape("model.layers.0.mlp.experts.0.gate_proj.weight")[0],
                 moe_norm=(MOE_NORM_NEVER if not norm else
                           MOE_NORM_IF_K_GT_1 if gen == GEN_MINIMIND2 else MOE_NORM_ALWAYS))
    else:
        c["hidden_dim"] = shape("model.layers.0.mlp.gate_proj.weight")[0]

    eps_default = 1e-5 if gen == GEN_MINIMIND2 else 1e-6
    c.update(rms_eps=cfg_number(config, "rms_norm_eps", eps_default, 1e-12, 0.5),
             rope_theta=cfg_number(config, "rope_theta", 1e6, 2.0, 1e12),
             max_seq_len=cfg_number(config, "max_position_embeddings", 32768, 1, 1 << 24, int))
    c.update(rope_scaling_from_config(config))
    return c


def rope_scaling_from_config(config):
    """MiniMind's own config: only inference_rope_scaling switches YaRN on, with its fixed values.
    A Qwen3/Llama-format config is read the way transformers reads its rope_scaling block."""
    off = dict(rope_scaling=ROPE_NONE, rope_factor=1.0, yarn_orig_ctx=2048, yarn_beta_fast=32.0,
               yarn_beta_slow=1.0, yarn_attn_factor=1.0)
    if not config:
        return off
    if config.get("model_type", "minimind") == "minimind":
        if config.get("inference_rope_scaling"):
            off.update(rope_scaling=ROPE_YARN, rope_factor=16.0)
        return off
    rs = config.get("rope_scaling")
    if not isinstance(rs, dict):
        return off
    kind = rs.get("rope_type", rs.get("type"))
    def number(key, default, lo, hi, kind=float):
        return cfg_number(rs, key, default, lo, hi, kind, "config.json rope_scaling")
    factor = number("factor", 1.0, 1e-3, 1e6)
    if kind == "linear":
        off.update(rope_scaling=ROPE_LINEAR, rope_factor=factor)
    elif kind == "yarn":
        off.update(rope_scaling=ROPE_YARN, rope_factor=factor,
                   yarn_orig_ctx=number("original_max_position_embeddings",
                                        cfg_get(config, "max_position_embeddings", 2048), 1, 1 << 24, int),
                   yarn_beta_fast=number("beta_fast", 32.0, -1e6, 1e6),
                   yarn_beta_slow=number("beta_slow", 1.0, -1e6, 1e6),
                   yarn_attn_factor=number("attention_factor",
                                           0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0, 1e-6, 1e6))
    elif kind not in (None, "default"):
        fail(f"config.json: rope_scaling type {kind!r} is not supported (none, linear, yarn)")
    return off


def expected_tensors(c):
    """Every tensor the model needs, with its shape, in file order: the loader's table."""
    d, hd, L = c["dim"], c["head_dim"], c["n_layers"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], d))]
    for l in range(L):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (c["n_heads"] * hd, d)),
                (p + "self_attn.k_proj.weight", (c["n_kv_heads"] * hd, d)),
                (p + "self_attn.v_proj.weight", (c["n_kv_heads"] * hd, d)),
                (p + "self_attn.o_proj.weight", (d, c["n_heads"] * hd))]
        if c["generation"] == GEN_MINIMIND3:
            out += [(p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))]
        out.append((p + "post_attention_layernorm.weight", (d,)))
        ffns = []
        if c["n_experts"]:
            out.append((p + "mlp.gate.weight", (c["n_experts"], d)))
            ffns += [(f"{p}mlp.experts.{e}.", c["moe_hidden_dim"]) for e in range(c["n_experts"])]
            ffns += [(f"{p}mlp.shared_experts.{e}.", c["moe_hidden_dim"])
                     for e in range(c["n_shared_experts"])]
        else:
            ffns.append((p + "mlp.", c["hidden_dim"]))
        for q, h in ffns:
            out += [(q + "gate_proj.weight", (h, d)), (q + "up_proj.weight", (h, d)),
                    (q + "down_proj.weight", (d, h))]
    out.append(("model.norm.weight", (d,)))
    return out


# ----------------------------------------------------------------------------------------------
# Weight encodings (the matrices; norms and the MoE router stay f32)

def encode(values, dtype, shape, name):
    if dtype == "f32":
        return values.tobytes()
    if dtype == "f16":
        try:
            return struct.pack("<%de" % len(values), *values)
        except (OverflowError, struct.error):
            fail(f"{name}: a value exceeds the f16 range (65504); export as bf16 or f32")
    if dtype == "bf16":  # round to nearest even on the f32 bit pattern
        bits = array.array("I")
        bits.frombytes(values.tobytes())
        return array.array("H", [((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
                                 if (b & 0x7F800000) != 0x7F800000 else b >> 16
                                 for b in bits]).tobytes()
    # q8_0: per group of 32 along a row, scale = f16(max|x| / 127), q = round(x / scale); then
    # the panel layout of model.h: 16 rows at a time, 4 columns of each row side by side
    rows, cols = shape
    groups = cols // MM_Q8_GROUP
    q = bytearray(len(values))
    scales = array.array("f", [0.0]) * (rows * groups)
    for g in range(len(scales)):
        grp = values[g * MM_Q8_GROUP:(g + 1) * MM_Q8_GROUP]
        amax = max(max(grp), -min(grp))
        if not math.isfinite(amax):
            fail(f"{name}: a weight is not finite; cannot quantise to q8_0")
        try:
            d = struct.unpack("<e", struct.pack("<e", amax / 127.0))[0]  # the scale as stored
        except OverflowError:
            fail(f"{name}: a weight of magnitude {amax:g} exceeds what q8_0's f16 scales hold; export as f32")
        scales[g] = d
        inv = 1.0 / d if d else 0.0
        q[g * MM_Q8_GROUP:(g + 1) * MM_Q8_GROUP] = bytes(
            max(-127, min(127, int(math.floor(v * inv + 0.5)))) & 0xFF for v in grp)
    out = bytearray()
    for p0 in range(0, rows, MM_Q8_PANEL):
        codes = bytearray(MM_Q8_PANEL * cols)  # [cols/4][16][4]; rows past the end stay zero
        sc = [0.0] * (groups * MM_Q8_PANEL)  # [groups][16]
        for i in range(min(MM_Q8_PANEL, rows - p0)):
            row = q[(p0 + i) * cols:(p0 + i + 1) * cols]
            for j in range(4):
                codes[4 * i + j::4 * MM_Q8_PANEL] = row[j::4]
            sc[i::MM_Q8_PANEL] = scales[(p0 + i) * groups:(p0 + i + 1) * groups]
        out += codes + struct.pack("<%de" % len(sc), *sc)
    return bytes(out)


def q8_panels(blocks, shape):
    """GGUF Q8_0 blocks (per row: groups of an f16 scale and 32 codes) in model.h's panel layout,
    the codes and scales as they are"""
    rows, cols = shape
    groups = cols // MM_Q8_GROUP
    row_bytes = groups * Q8_BLOCK
    out = bytearray()
    for p0 in range(0, rows, MM_Q8_PANEL):
        codes = bytearray(MM_Q8_PANEL * cols)  # [cols/4][16][4]; rows past the end stay zero
        scales = bytearray(2 * groups * MM_Q8_PANEL)  # [groups][16] f16
        for i in range(min(MM_Q8_PANEL, rows - p0)):
            row = blocks[(p0 + i) * row_bytes:(p0 + i + 1) * row_bytes]
            q = b"".join(row[g * Q8_BLOCK + 2:(g + 1) * Q8_BLOCK] for g in range(groups))
            for j in range(4):
                codes[4 * i + j::4 * MM_Q8_PANEL] = q[j::4]
            for g in range(groups):
                at = 2 * (g * MM_Q8_PANEL + i)
                scales[at:at + 2] = row[g * Q8_BLOCK:g * Q8_BLOCK + 2]
        out += codes + scales
    return bytes(out)


# ----------------------------------------------------------------------------------------------
# Tokenizer: tokenizer.json (+ tokenizer_config.json) -> the tokenizer block

def byte_level_decoder():
    """GPT-2's map from the 256 printable byte-level characters back to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def load_tokenizer(path, vocab_size):
    tok_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    cfg_path = os.path.join(os.path.dirname(tok_path), "tokenizer_config.json")
    tok = read_json(tok_path, "tokenizer")
    tcfg = read_json(cfg_path, "tokenizer config") if os.path.exists(cfg_path) else {}
    return tokenizer_block(tok, tcfg, tok_path, cfg_path, vocab_size)


def tokenizer_block(tok, tcfg, tok_path, cfg_path, vocab_size):
    """tokenizer.json's and tokenizer_config.json's contents (tok_path, cfg_path name them in
    errors) as the model file's tokenizer block and the header's token ids and chat template"""
    if not isinstance(tcfg, dict):
        fail(f"{cfg_path}: tokenizer config is not a JSON object")
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        fail(f"{tok_path}: expected a BPE tokenizer.json (model.type \"BPE\" with a vocab)")
    dec = byte_level_decoder()
    tokens = {}  # id -> (kind, bytes)
    for s, i in model["vocab"].items():
        if not isinstance(i, int) or not 0 <= i < vocab_size:
            fail(f"{tok_path}: token {s!r} has id {i}, outside the model's vocab of {vocab_size}")
        if i in tokens:
            fail(f"{tok_path}: token id {i} is given to two tokens ({s!r} and another)")
        try:
            tokens[i] = (TOKEN_NORMAL, bytes(dec[ch] for ch in s))
        except KeyError as e:
            fail(f"{tok_path}: token {s!r} has character {e.args[0]!r}, not byte-level BPE")
    added = tok.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(a, dict) for a in added):
        fail(f"{tok_path}: added_tokens is not a list of objects")
    for a in added:
        i = a.get("id")
        if not isinstance(i, int) or not 0 <= i < vocab_size or not isinstance(a.get("content"), str):
            fail(f"{tok_path}: added token {a!r} has no valid id or content")
        tokens[i] = (TOKEN_SPECIAL if a.get("special") else TOKEN_ADDED, a["content"].encode("utf-8"))
    ids_of = {s: i for s, i in model["vocab"].items()}
    merges = []
    if not isinstance(model.get("merges") or [], list):
        fail(f"{tok_path}: model.merges is not a list")
    for rank, m in enumerate(model.get("merges") or []):
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            fail(f"{tok_path}: merge {rank} ({m!r}) is not a pair of tokens")
        left, right = pair
        if left not in ids_of or right not in ids_of or left + right not in ids_of:
            fail(f"{tok_path}: merge {rank} ({left!r} {right!r}) uses tokens missing from the vocab")
        merges.append((ids_of[left], ids_of[right], ids_of[left + right]))

    def token_id(key, default):
        v = tcfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if v is not None and not isinstance(v, str):
            fail(f"{cfg_path}: {key} is {v!r}, expected a token's text")
        for i, (kind, b) in tokens.items():
            if kind != TOKEN_NORMAL and v is not None and b == v.encode("utf-8"):
                return i
        return default

    template = tcfg.get("chat_template") or ""
    if isinstance(template, list):  # list of named templates: take the default one
        template = next((t.get("template", "") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), "")
    if not isinstance(template, str):
        fail(f"{cfg_path}: chat_template is neither a template's text nor a list of named templates")
    # MiniMind2's template has a default system prompt (and a <think> only for
    # enable_thinking=false); minimind-3's renders reasoning_content in <think> blocks
    chat = (CHAT_NONE if "<|im_start|>" not in template else
            (CHAT_MINIMIND2 if "<tool_call>" in template else CHAT_MINIMIND2_NO_TOOLS)
            if "You are a helpful assistant" in template else
            CHAT_MINIMIND3 if "reasoning_content" in template or "<think>" in template else CHAT_CHATML)
    block = bytearray(struct.pack("<II", vocab_size, len(merges)))
    for i in range(vocab_size):
        kind, b = tokens.get(i, (TOKEN_NORMAL, b""))
        block += struct.pack("<BI", kind, len(b)) + b
    for m in merges:
        block += struct.pack("<III", *m)
    info = dict(bos_id=token_id("bos_token", 1), eos_id=token_id("eos_token", 2),
                pad_id=token_id("pad_token", 0), chat_template=chat)
    return bytes(block), info, len(tokens), len(merges)


# ----------------------------------------------------------------------------------------------
# Writing the file

def align(n):
    return (n + MM_ALIGN - 1) // MM_ALIGN * MM_ALIGN


def tokenizer_path(args):
    """--tokenizer, else the tokenizer.json of the checkpoint's folder (a transformers folder, or the
    folder a checkpoint file is in)"""
    if args.tokenizer:
        return args.tokenizer
    folder = args.checkpoint
    if not os.path.isdir(folder):
        folder = os.path.dirname(os.path.abspath(folder))
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return folder
    fail(f"{args.checkpoint}: no tokenizer.json in {folder}; give --tokenizer (tokenizer.json or its folder)")


def encoded_bytes(dtype, shape):
    """a tensor's bytes in the model file (q8_0: model.h's panels of 16 rows, padded)"""
    if dtype != "q8_0":
        return tensor_bytes(dtype, shape)
    rows, cols = shape
    return (rows + MM_Q8_PANEL - 1) // MM_Q8_PANEL * (MM_Q8_PANEL * cols + 2 * cols // MM_Q8_GROUP * MM_Q8_PANEL)


def quantize_program():
    """./quantize (quantize.c) beside this file, MINIMIND_QUANTIZE's, or None: the Python encodes"""
    path = os.environ.get("MINIMIND_QUANTIZE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "quantize"))
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def write_tensors(f, path, entries, weights):
    """Each tensor's encoding at its offset: the bytes as they are where the type does not change,
    ./quantize's conversion (one frame each: NAME SRC DST ROWS COLS OFFSET NBYTES, then the data)
    or the Python's where it does. One tensor's data in memory at a time."""
    program, helper = quantize_program(), None
    try:
        for name, dtype, shape, off, size in entries:
            t, values = weights[name]["tensor"], weights[name]["values"]
            src, data = ("f32", memoryview(values).cast("B")) if values is not None else (t.dtype, t.data)
            if src == dtype and dtype != "q8_0":
                f.seek(off)
                f.write(data)
            elif program and len(shape) == 2:
                if helper is None:
                    f.flush()
                    helper = subprocess.Popen([program, path], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
                try:
                    helper.stdin.write(f"{name} {src} {dtype} {shape[0]} {shape[1]} {off} {len(data)}\n".encode())
                    helper.stdin.write(data)
                except BrokenPipeError:
                    break  # its error is read below
            else:
                out = q8_panels(data, shape) if src == "q8_0" and dtype == "q8_0" else \
                    encode(values if values is not None else t.floats(), dtype, shape, name)
                f.seek(off)
                f.write(out)
            release_mapped()
    finally:
        if helper is not None:
            try:
                helper.stdin.close()
            except BrokenPipeError:
                pass
            err = helper.stderr.read().decode("utf-8", "replace").strip()
            if helper.wait() != 0:
                fail(err.splitlines()[-1] if err else f"{program} failed (exit {helper.returncode})")


def export(args):
    out_dir = os.path.dirname(os.path.abspath(args.out))  # before the work: a bad path fails at once
    if os.path.isdir(args.out):
        fail(f"{args.out}: is a folder; give the model file's path")
    if not os.path.isdir(out_dir):
        fail(f"{args.out}: no folder {out_dir} to write it in")
    if not os.access(out_dir, os.W_OK):
        fail(f"{args.out}: cannot write in {out_dir}")
    state, config, *embedded = load_checkpoint(args.checkpoint, args.config, gguf_ok=True, n_heads=args.n_heads)
    embedded_tokenizer = embedded[0] if embedded else None  # (a GGUF file's)
    c = infer_config(state, config, args.n_heads, args.checkpoint)
    table = expected_tensors(c)
    expected_names = {n for n, _ in table}
    for name, want in table:
        if name not in state:
            fail(f"{args.checkpoint}: missing tensor {name} (expected shape {list(want)})")
        if state[name].shape != want:
            fail(f"{args.checkpoint}: tensor {name} has shape {list(state[name].shape)}, "
                 f"expected {list(want)}")
    extra = sorted(set(state) - expected_names - {"lm_head.weight"})
    if extra:
        fail(f"{args.checkpoint}: unexpected tensors for this architecture: {', '.join(extra[:5])}")

    # the values are read tensor by tensor as they are written; LoRA merges into f32 values first
    weights = {n: {"shape": state[n].shape, "tensor": state[n], "values": None} for n, _ in table}
    tied = True
    if "lm_head.weight" in state:
        head, embed = state["lm_head.weight"], state["model.embed_tokens.weight"]
        if head.shape != (c["vocab_size"], c["dim"]):
            fail(f"{args.checkpoint}: lm_head.weight has shape {list(head.shape)}, "
                 f"expected {[c['vocab_size'], c['dim']]}")
        same = head.data == embed.data if head.dtype == embed.dtype else head.floats() == embed.floats()
        if not same:
            tied = False
            weights["lm_head.weight"] = {"shape": head.shape, "tensor": head, "values": None}
            table.append(("lm_head.weight", head.shape))
    n_lora = merge_lora(weights, args.lora) if args.lora else 0

    if args.tokenizer or not embedded_tokenizer:
        tok_block, tok_info, n_tok, n_merges = load_tokenizer(tokenizer_path(args), c["vocab_size"])
    else:
        tok_block, tok_info, n_tok, n_merges = tokenizer_block(
            *embedded_tokenizer, f"{args.checkpoint} (tokenizer.ggml)", f"{args.checkpoint} (tokenizer.ggml)",
            c["vocab_size"])
    c.update(tok_info)
    flags = (FLAG_QK_NORM if c["generation"] == GEN_MINIMIND3 else 0) | \
        (FLAG_TIED_EMBED if tied else 0) | (FLAG_MOE if c["n_experts"] else 0)

    entries, notes = [], []
    table_offset = (HEADER_SIZE + len(tok_block) + 7) // 8 * 8  # the table's uint64s stay aligned
    offset = align(table_offset + ENTRY_SIZE * len(table))
    for name, shape in table:
        dtype = args.dtype
        if len(shape) == 1 or name.endswith("mlp.gate.weight"):
            dtype = "f32"  # norms and the MoE router stay exact
        elif dtype == "q8_0" and shape[1] % MM_Q8_GROUP:
            notes.append(f"{name}: {shape[1]} columns is not a multiple of {MM_Q8_GROUP}, kept f32")
            dtype = "f32"
        size = encoded_bytes(dtype, shape)
        entries.append((name, dtype, shape, offset, size))
        offset = align(offset + size)
    last = entries[-1]
    file_size = last[3] + last[4]

    hdr = dict(c, magic=MM_MAGIC, version=MM_VERSION, header_size=HEADER_SIZE, flags=flags,
               n_tensors=len(table), reserved0=0, tokenizer_offset=HEADER_SIZE,
               tokenizer_size=len(tok_block), tensor_table_offset=table_offset,
               file_size=file_size)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".export-", dir=out_dir)
    except OSError as e:
        fail(f"{args.out}: cannot write in {out_dir} ({e.strerror})")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack(HEADER_STRUCT, *[hdr[k] for k, _ in HEADER_FIELDS]))
            f.write(tok_block)
            f.write(b"\0" * (table_offset - f.tell()))
            for name, dt, shape, off, size in entries:
                dims = list(shape) + [0] * (4 - len(shape))
                f.write(struct.pack("<64sII4IQQ", name.encode(), DTYPES[dt], len(shape), *dims, off, size))
            f.truncate(file_size)  # the gaps between tensors read as zeros
            write_tensors(f, tmp, entries, weights)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it a normal file's mode
        os.replace(tmp, args.out)
    except BaseException:
        os.unlink(tmp)
        raise

    n_params = sum(numel(s) for _, s in table)
    gen = {GEN_MINIMIND2: "MiniMind2", GEN_MINIMIND3: "minimind-3"}[c["generation"]]
    kind = (f"MoE {c['n_experts']} experts top-{c['n_experts_per_tok']}"
            + (f" + {c['n_shared_experts']} shared" if c["n_shared_experts"] else "")
            + f", expert ffn {c['moe_hidden_dim']}") if c["n_experts"] else f"dense, ffn {c['hidden_dim']}"
    for n in notes:
        print("note: " + n)
    print(f"{gen}, {n_params / 1e6:.2f}M parameters: hidden {c['dim']}, {c['n_layers']} layers, "
          f"{c['n_heads']}/{c['n_kv_heads']} heads of {c['head_dim']}, {kind}, vocab {c['vocab_size']}"
          + ("" if tied else ", untied lm_head")
          + (f", LoRA merged into {n_lora} matrices" if n_lora else ""))
    print(f"tokenizer: {n_tok} tokens, {n_merges} merges; wrote {args.out} "
          f"({args.dtype}, {file_size / 1e6:.2f} MB)")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert a MiniMind checkpoint to a minimind.c model file.",
                                 epilog="Weights are converted by ./quantize (make builds it) when it is there, "
                                 "else by this file's Python: the same bytes, 10 to 50 times slower where it converts. "
                                 "MINIMIND_QUANTIZE=PATH names another, MINIMIND_QUANTIZE= forces the Python.")
    ap.add_argument("checkpoint", help=".pth, *_resume.pth, .safetensors, .gguf, or a transformers folder")
    ap.add_argument("out", help="output model file")
    ap.add_argument("--tokenizer", help="tokenizer.json or a folder holding it (default: a GGUF's own, the one in "
                    "a transformers folder given as the checkpoint, or beside the checkpoint file)")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES), help="matrix weight type (default f32)")
    ap.add_argument("--lora", help="MiniMind LoRA file to merge into the weights")
    ap.add_argument("--config", help="config.json (default: the one beside the checkpoint, if any)")
    ap.add_argument("--n-heads", type=int, help="query heads when no config.json says (default 8)")
    args = ap.parse_args(argv)
    if sys.byteorder != "little":
        fail("this exporter assumes a little-endian machine")
    try:
        export(args)
    except ExportError as e:
        error(str(e))
        return 1
    except OSError as e:
        error(f"{e.filename}: {e.strerror}" if e.filename else f"{e.strerror or e}")
        return 1
    return 0


def error(msg):
    """one line on stderr, whatever the file names and quoted values in msg hold"""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)
    print(f"export.py: error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
