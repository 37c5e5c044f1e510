#!/usr/bin/python3
"""Train the demo model: a small minimind-3 on Tang poems, with its own byte-level BPE tokenizer.

    cd demo && npm install && cd .. && /usr/bin/python3 demo/train.py

Data: the npm package chinese-poetry 2.0.1 (MIT licence; the poems themselves are classical
and in the public domain), its 57,603 Tang poems (quantangshi/poet.tang.*.json), shuffled with
a fixed seed: 98% to train on, 2% held out.

Writes, all in demo/:
  tokenizer/tokenizer.json, tokenizer_config.json   the tokenizer, in Hugging Face's format
  pretrain_192.pth       the checkpoint as MiniMind's trainer saves it (fp16 state dict, the
                         tied embedding stored twice) -- not committed, export.py turns it into
  heldout.txt            the held-out poems (the perplexity experiment's text)
  reference.json         greedy continuation ids and the held-out perplexity, computed here in
                         PyTorch, that tests/run_tests.py checks the C engine against
(`train.py --reference-only` rewrites reference.json from a saved checkpoint.)

`train.py --passkey` trains the same model again, from scratch, at a context of 512 on
demo/passkey.py's task: every row is a passkey trial (320 to 512 tokens) whose filler is
training poems, the loss the next token's everywhere plus the answer's. It keeps the tokenizer
in demo/tokenizer/ and writes demo/passkey_192.pth (also every 100 steps while it trains; not
committed), for
    python3 export.py demo/passkey_192.pth demo/passkey.bin --tokenizer demo/tokenizer --dtype f16
PASSKEY_STEPS sets its steps (600: about an hour and a half on the 2 cores).
Then run:  python3 export.py demo/pretrain_192.pth demo/model.bin --tokenizer demo/tokenizer --dtype f16

Needs Debian's PyTorch and OpenBLAS (apt-get install python3-torch libopenblas0-pthread: without
OpenBLAS, torch falls back to the reference BLAS, ten times slower). CPU, 2 threads, about 30 minutes.
"""
import glob
import heapq
import json
import math
import os
import random
import sys
import time
import unicodedata

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
POEMS = os.path.join(HERE, "node_modules", "chinese-poetry", "dist", "quantangshi")
SEED = 1234
VOCAB = 4096
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CONFIG = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              head_dim=24, intermediate_size=640, vocab_size=VOCAB, rms_norm_eps=1e-6,
              rope_theta=1e6, max_position_embeddings=32768)
CONTEXT = 256            # the training length: the extrapolation experiment starts here
BATCH = 16
STEPS = int(os.environ.get("DEMO_STEPS", 400))
LR = 3e-3


# ----------------------------------------------------------------------------------------------
# Data

def load_poems():
    if not os.path.isdir(POEMS):
        sys.exit(f"train.py: {POEMS} is missing: run `npm install` in demo/ first")
    poems = []
    for path in sorted(glob.glob(os.path.join(POEMS, "poet.tang.*.json"))):
        with open(path, encoding="utf-8") as f:
            for p in json.load(f):
                body = "".join(p.get("paragraphs") or [])
                if body:
                    poems.append(f"{p.get('title', '')}\n{body}\n")
    random.Random(SEED).shuffle(poems)
    cut = len(poems) * 98 // 100
    return poems[:cut], poems[cut:]


# ----------------------------------------------------------------------------------------------
# Byte-level BPE: the GPT-2 pre-split (as tokenizer.c and Hugging Face run it), a trainer, an encoder

def byte_chars():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def char_class(ch):
    cat = unicodedata.category(ch)
    if cat[0] == "L":
        return "L"
    if cat[0] == "N":
        return "N"
    if ch.isspace() and ch not in "\x1c\x1d\x1e\x1f":  # Unicode White_Space
        return "S"
    return "O"


def pre_split(text):
    """'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i] == "'" and i + 1 < n:
            if text[i + 1] in "stmd":
                out.append(text[i:i + 2]); i += 2; continue
            if text[i + 1:i + 3] in ("re", "ve", "ll"):
                out.append(text[i:i + 3]); i += 3; continue
        start, cls = i, char_class(text[i])
        if text[i] == " " and i + 1 < n and char_class(text[i + 1]) != "S":
            cls = char_class(text[i + 1])
            j = i + 1
        else:
            j = i
        if cls != "S":
            while j < n and char_class(text[j]) == cls:
                j += 1
            out.append(text[start:j]); i = j; continue
        while j < n and char_class(text[j]) == "S":
            j += 1
        if j < n and j - i >= 2:
            j -= 1
        out.append(text[i:j]); i = j
    return out


def train_bpe(texts, vocab_size):
    """Merges learned greedily, with incremental pair counts, from character counts: in classical
    Chinese a character is the natural unit, so no merge spans two characters (and training
    takes seconds, not the hours that merging across whole poem lines would)."""
    bc = byte_chars()
    counts = {}
    for t in texts:
        for ch in t:
            counts[ch] = counts.get(ch, 0) + 1
    words = [[bc[b] for b in piece.encode("utf-8")] for piece in counts]
    freq = list(counts.values())
    pairs, where = {}, {}
    for wi, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pairs[(a, b)] = pairs.get((a, b), 0) + freq[wi]
            where.setdefault((a, b), set()).add(wi)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[bc[b]] = len(vocab)
    # the most frequent pair first: a max-heap of (count, pair) entries; an entry whose count is
    # out of date is re-queued with the current count when it surfaces
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    merges = []
    while len(vocab) < vocab_size and heap:
        neg, best = heapq.heappop(heap)
        if pairs.get(best, 0) != -neg:
            if best in pairs:
                heapq.heappush(heap, (-pairs[best], best))
            continue
        a, b = best
        merges.append([a, b])
        vocab.setdefault(a + b, len(vocab))
        for wi in list(where.get(best, ())):
            w, f = words[wi], freq[wi]
            for x, y in zip(w, w[1:]):  # take this word's pairs out, merge, put them back
                pairs[(x, y)] -= f
                if pairs[(x, y)] <= 0:
                    del pairs[(x, y)]
                where[(x, y)].discard(wi)
            i, nw = 0, []
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    nw.append(a + b); i += 2
                else:
                    nw.append(w[i]); i += 1
            words[wi] = nw
            for x, y in zip(nw, nw[1:]):
                pairs[(x, y)] = pairs.get((x, y), 0) + f
                where.setdefault((x, y), set()).add(wi)
                heapq.heappush(heap, (-pairs[(x, y)], (x, y)))
    return vocab, merges


class Encoder:
    def __init__(self, vocab, merges):
        self.vocab, self.bc = vocab, byte_chars()
        self.rank = {(a, b): r for r, (a, b) in enumerate(merges)}
        self.cache = {}

    def piece(self, p):
        if p not in self.cache:
            w = [self.bc[b] for b in p.encode("utf-8")]
            while len(w) > 1:
                r, i = min((self.rank.get((w[i], w[i + 1]), 1 << 30), i) for i in range(len(w) - 1))
                if r == 1 << 30:
                    break
                w[i:i + 2] = [w[i] + w[i + 1]]
            self.cache[p] = [self.vocab[s] for s in w]
        return self.cache[p]

    def encode(self, text):
        return [i for p in pre_split(text) for i in self.piece(p)]


def save_tokenizer(folder, vocab, merges):
    os.makedirs(folder, exist_ok=True)
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, s in enumerate(SPECIALS)],
           "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                     "ignore_merges": False, "vocab": vocab, "merges": merges}}
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "unk_token": "<|endoftext|>", "model_max_length": 32768, "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)


# ----------------------------------------------------------------------------------------------
# The model: minimind-3 (q/k norm, GQA, SwiGLU, tied embeddings, rotate-half RoPE), MiniMind's names

class RMSNorm(torch.nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.ones(n)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def linear(i, o):
    return torch.nn.Linear(i, o, bias=False)


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hd = c["hidden_size"], c["head_dim"]
        self.H, self.KV, self.hd = c["num_attention_heads"], c["num_key_value_heads"], hd
        self.input_layernorm = RMSNorm(d, c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(d, c["rms_norm_eps"])
        self.self_attn = torch.nn.Module()
        a = self.self_attn
        a.q_proj, a.k_proj = linear(d, self.H * hd), linear(d, self.KV * hd)
        a.v_proj, a.o_proj = linear(d, self.KV * hd), linear(self.H * hd, d)
        a.q_norm, a.k_norm = RMSNorm(hd, c["rms_norm_eps"]), RMSNorm(hd, c["rms_norm_eps"])
        self.mlp = torch.nn.Module()
        f = c["intermediate_size"]
        self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj = linear(d, f), linear(d, f), linear(f, d)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        a = self.self_attn
        h = self.input_layernorm(x)
        q = a.q_norm(a.q_proj(h).view(B, T, self.H, self.hd))
        k = a.k_norm(a.k_proj(h).view(B, T, self.KV, self.hd))
        v = a.v_proj(h).view(B, T, self.KV, self.hd)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = k.repeat_interleave(self.H // self.KV, 2), v.repeat_interleave(self.H // self.KV, 2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(self.hd)
        scores = scores + torch.full((T, T), float("-inf")).triu(1)  # causal
        o = torch.einsum("bhts,bshd->bthd", torch.softmax(scores, -1), v)
        x = x + a.o_proj(o.reshape(B, T, -1))
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class MiniMind(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = torch.nn.ModuleList([Block(c) for _ in range(c["num_hidden_layers"])])
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        hd = c["head_dim"]
        self.inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))

    def forward(self, ids):
        T = ids.shape[1]
        angles = torch.outer(torch.arange(T).float(), self.inv_freq)
        cos, sin = torch.cos(angles)[None, :, None], torch.sin(angles)[None, :, None]
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x) @ self.model.embed_tokens.weight.T  # tied output head


def state_dict_as_minimind(model):
    sd = {k: v.detach().half() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # the trainer saves both
    return sd


# ----------------------------------------------------------------------------------------------

def main():
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    t0 = time.time()
    train_poems, held_poems = load_poems()
    print(f"{len(train_poems)} poems to train on, {len(held_poems)} held out")
    vocab, merges = train_bpe(train_poems, VOCAB)
    save_tokenizer(os.path.join(HERE, "tokenizer"), vocab, merges)
    enc = Encoder(vocab, merges)
    print(f"tokenizer: {len(vocab)} tokens, {len(merges)} merges ({time.time() - t0:.0f} s)")
    bos = vocab["<|im_start|>"]
    train_ids = torch.tensor([i for p in train_poems for i in enc.encode(p)], dtype=torch.long)
    heldout = "".join(held_poems)
    with open(os.path.join(HERE, "heldout.txt"), "w", encoding="utf-8") as f:
        f.write(heldout)
    print(f"{len(train_ids)} training tokens ({time.time() - t0:.0f} s)")

    model = MiniMind(CONFIG)
    for n, p in model.named_parameters():  # MiniMind-like init: N(0, 0.02), norms at one
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(SEED)
    for step in range(STEPS):
        lr = LR * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - CONTEXT, (BATCH,), generator=g)
        batch = torch.stack([train_ids[s:s + CONTEXT] for s in starts])
        batch[:, 0] = bos  # every window starts as inference does: <|im_start|> + text
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step}/{STEPS} loss {loss.item():.3f} lr {lr:.2e} ({time.time() - t0:.0f} s)", flush=True)

    torch.save(state_dict_as_minimind(model), os.path.join(HERE, "pretrain_192.pth"))
    print(f"trained in {time.time() - t0:.0f} s, final loss {loss.item():.3f}")
    write_reference(enc, heldout, dict(train_tokens=len(train_ids), steps=STEPS, batch=BATCH,
                                       context=CONTEXT, final_loss=round(loss.item(), 4)))


# ----------------------------------------------------------------------------------------------
# --passkey: the same model trained at a context of 512 on poems and passkey.py's task mixed

PASSKEY_CONTEXT = 512
PASSKEY_STEPS = int(os.environ.get("PASSKEY_STEPS", 600))
PASSKEY_BATCH = 8


def passkey_row(enc, units, rng, bos, n):
    """one trial of demo/passkey.py as training text, with poem sentences as the filler: at most n
    ids (<|im_start|> first) ending in the answer, and how many ids the answer is"""
    from passkey import INTRO, NEEDLE, QUESTION  # demo/passkey.py: the very prompt it asks
    key = str(rng.randrange(10000, 100000))
    answer = enc.encode(f" {key}.")
    while True:  # a run of sentences from a random start; another start when its sentences are too long
        count = (n - 240) // 12  # the question is about 245 tokens, a sentence 14: start long, then trim
        start = rng.randrange(len(units) - count)
        depth = rng.random()
        while count > 0:
            fill = units[start:start + count]
            before = int(round(count * depth))
            text = INTRO + "".join(fill[:before]) + NEEDLE.format(key=key) + "".join(fill[before:]) + QUESTION
            ids = [bos] + enc.encode(text) + answer
            if len(ids) <= n:
                return ids, len(answer)
            count -= max(1, (len(ids) - n) // 16)


def train_passkey():
    """Every row is a passkey trial whose filler is training poems, so the model still learns the
    poems from it. Loss: next-token cross-entropy over all tokens, plus the answer's cross-entropy
    (its few tokens would otherwise be lost among 512)"""
    sys.path.insert(0, HERE)
    from passkey import sentences
    torch.manual_seed(SEED)
    t0 = time.time()
    with open(os.path.join(HERE, "tokenizer", "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)["model"]
    enc = Encoder(tok["vocab"], tok["merges"])
    bos = enc.vocab["<|im_start|>"]
    train_poems, _ = load_poems()
    units = sentences(" ".join("".join(train_poems).split()) + " ")  # as passkey.py --filler reads a file
    print(f"{len(units)} filler sentences ({time.time() - t0:.0f} s)", flush=True)
    model = MiniMind(CONFIG)
    for n, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.95))
    rng = random.Random(SEED)
    T = PASSKEY_CONTEXT
    for step in range(PASSKEY_STEPS):
        lr = LR * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / PASSKEY_STEPS))
        for group in opt.param_groups:
            group["lr"] = lr
        x = torch.zeros(PASSKEY_BATCH, T - 1, dtype=torch.long)
        y = torch.full((PASSKEY_BATCH, T - 1), -100, dtype=torch.long)
        key_y = torch.full((PASSKEY_BATCH, T - 1), -100, dtype=torch.long)
        for b in range(PASSKEY_BATCH):  # passkey trials of 320 to 512 tokens, padded
            ids, n_answer = passkey_row(enc, units, rng, bos, rng.randrange(320, T + 1))
            row = torch.tensor(ids)
            x[b, :len(ids) - 1], y[b, :len(ids) - 1] = row[:-1], row[1:]
            key_y[b, len(ids) - 1 - n_answer:len(ids) - 1] = row[-n_answer:]
        logits = model(x).reshape(-1, VOCAB)
        lm = F.cross_entropy(logits, y.reshape(-1), ignore_index=-100)
        key = F.cross_entropy(logits, key_y.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        (lm + key).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == PASSKEY_STEPS - 1:
            print(f"step {step}/{PASSKEY_STEPS} loss {lm.item():.3f} answer {key.item():.3f} lr {lr:.2e} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if step % 100 == 99:  # a checkpoint to try while it trains
            torch.save(state_dict_as_minimind(model), os.path.join(HERE, "passkey_192.pth"))
    torch.save(state_dict_as_minimind(model), os.path.join(HERE, "passkey_192.pth"))
    print(f"trained in {time.time() - t0:.0f} s; now: python3 export.py demo/passkey_192.pth "
          f"demo/passkey.bin --tokenizer demo/tokenizer --dtype f16")


def write_reference(enc, heldout, info):
    """What the C engine must reproduce, from the weights exactly as saved (fp16) in fp32:
    a greedy continuation, the perplexity of the first held-out window, and token ids."""
    sd = torch.load(os.path.join(HERE, "pretrain_192.pth"))
    model = MiniMind(CONFIG)
    model.load_state_dict({k: v.float() for k, v in sd.items() if k != "lm_head.weight"})
    model.eval()
    bos = enc.vocab["<|im_start|>"]
    prompt_text = "春眠不覺曉，"
    with torch.no_grad():
        prompt = [bos] + enc.encode(prompt_text)
        seq = list(prompt)
        for _ in range(32):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        window = [bos] + enc.encode(heldout)[:CONTEXT - 1]
        logits = model(torch.tensor([window]))[0].double()
        nll = F.cross_entropy(logits[:-1], torch.tensor(window[1:])).item()
    sample = heldout[:3000]
    ref = dict(info, generator="demo/train.py", torch=torch.__version__, prompt=prompt_text,
               prompt_ids=prompt, greedy_ids=seq[len(prompt):], ppl_window_ids=window,
               ppl=math.exp(nll), tokenize_text=sample, tokenize_ids=enc.encode(sample))
    with open(os.path.join(HERE, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(ref, f, ensure_ascii=False, indent=1)
    print(f"reference: greedy {ref['greedy_ids'][:8]}..., first held-out window ppl {ref['ppl']:.3f}")


def reference_only():
    """--reference-only: rewrite reference.json from the saved checkpoint and tokenizer"""
    with open(os.path.join(HERE, "tokenizer", "tokenizer.json"), encoding="utf-8") as f:
        model = json.load(f)["model"]
    with open(os.path.join(HERE, "heldout.txt"), encoding="utf-8") as f:
        heldout = f.read()
    with open(os.path.join(HERE, "reference.json"), encoding="utf-8") as f:
        old = json.load(f)
    info = {k: old[k] for k in ("train_tokens", "steps", "batch", "context", "final_loss") if k in old}
    write_reference(Encoder(model["vocab"], model["merges"]), heldout, info)


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1:] == ["--reference-only"]:
        reference_only()
    elif sys.argv[1:] == ["--passkey"]:
        train_passkey()
    else:
        main()
