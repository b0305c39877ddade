#!/usr/bin/python3
"""Byte-level BPE tokenizer for the Offramp training recipe (pure Python, no deps).

Trains a GPT-2 style byte-level BPE on build/train/corpus.txt and writes a standard
Hugging Face `tokenizer.json` + `tokenizer_config.json` to build/train/model/.

Token ids (documented in README.md):
  0            <|bos|>   (prepended by the post_processor, TemplateProcessing)
  1            <|eos|>   (appended between documents in training data; not added by the tokenizer)
  2 .. 257     the 256 byte symbols (GPT-2 bytes_to_unicode alphabet), in byte order
  258 ..       merges, in merge order (vocab size = --vocab-size, default 4096)

The module is also imported by train.py for encoding (`BPETokenizer.from_file`),
which applies merges exactly like the Hugging Face BPE model (lowest rank first).

Usage: /usr/bin/python3 tools/train/tokenizer.py [--vocab-size 4096] [--corpus ...] [--out ...]
"""
import argparse
import collections
import heapq
import json
import os
import sys
import time

try:  # python3-regex (Debian) gives the exact GPT-2 pattern with \p{L}/\p{N}
    import regex as _re
    PAT = _re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
except ImportError:  # stdlib approximation (identical on ASCII / Latin text)
    import re as _re
    PAT = _re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+|_+""")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SPECIALS = ["<|bos|>", "<|eos|>"]
BOS_ID, EOS_ID = 0, 1


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode char map (same as HF ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


B2U = bytes_to_unicode()
U2B = {v: k for k, v in B2U.items()}


def pretokenize(text):
    for m in PAT.finditer(text):
        yield "".join(B2U[b] for b in m.group(0).encode("utf-8"))


def train_bpe(word_freq, n_merges, min_freq=2, log_every=500):
    """Classic BPE with incremental pair counts and a lazy max-heap."""
    words = [list(w) for w in word_freq]
    freqs = list(word_freq.values())
    pair_count = collections.defaultdict(int)
    where = collections.defaultdict(set)
    for i, w in enumerate(words):
        f = freqs[i]
        for a, b in zip(w, w[1:]):
            pair_count[(a, b)] += f
            where[(a, b)].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    t0 = time.time()
    while len(merges) < n_merges and heap:
        negc, pair = heapq.heappop(heap)
        c = pair_count.get(pair, 0)
        if -negc != c:          # stale entry
            if c > 0:
                heapq.heappush(heap, (-c, pair))
            continue
        if c < min_freq:
            break
        merges.append(pair)
        a, b = pair
        new = a + b
        changed = collections.defaultdict(int)
        for i in list(where[pair]):
            w = words[i]
            f = freqs[i]
            # remove old pairs of this word
            for x, y in zip(w, w[1:]):
                pair_count[(x, y)] -= f
                changed[(x, y)] += 0
            j, out = 0, []
            while j < len(w):
                if j < len(w) - 1 and w[j] == a and w[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for x, y in zip(out, out[1:]):
                pair_count[(x, y)] += f
                where[(x, y)].add(i)
                changed[(x, y)] += 0
        del pair_count[pair]
        where.pop(pair, None)
        for p in changed:
            if p == pair:
                continue
            cp = pair_count.get(p, 0)
            if cp > 0:
                heapq.heappush(heap, (-cp, p))
            else:
                pair_count.pop(p, None)
        if log_every and len(merges) % log_every == 0:
            print(f"tokenizer: {len(merges)} merges ({time.time() - t0:.1f}s), last {a!r}+{b!r} x{c}",
                  flush=True)
    return merges


class BPETokenizer:
    """Encoder matching the HF BPE model + ByteLevel pre-tokenizer + BOS template."""

    def __init__(self, vocab, merges):
        self.vocab = vocab
        self.inv = {i: t for t, i in vocab.items()}
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.cache = {}

    @classmethod
    def from_file(cls, path):
        j = json.load(open(path, encoding="utf-8"))
        merges = [m.split(" ") if isinstance(m, str) else m for m in j["model"]["merges"]]
        return cls(j["model"]["vocab"], merges)

    def _bpe(self, word):
        syms = list(word)
        while len(syms) > 1:
            best, bi = None, -1
            for k in range(len(syms) - 1):
                r = self.ranks.get((syms[k], syms[k + 1]))
                if r is not None and (best is None or r < best):
                    best, bi = r, k
            if best is None:
                break
            a, b = syms[bi], syms[bi + 1]
            out, k = [], 0
            while k < len(syms):   # merge all occurrences of this pair, left to right
                if k < len(syms) - 1 and syms[k] == a and syms[k + 1] == b:
                    out.append(a + b)
                    k += 2
                else:
                    out.append(syms[k])
                    k += 1
            syms = out
        return [self.vocab[s] for s in syms]

    def encode(self, text, add_bos=True):
        ids = [BOS_ID] if add_bos else []
        for w in pretokenize(text):
            r = self.cache.get(w)
            if r is None:
                r = self._bpe(w)
                if len(self.cache) < 500000:
                    self.cache[w] = r
            ids.extend(r)
        return ids

    def decode(self, ids):
        bs = bytearray()
        for i in ids:
            t = self.inv[i]
            if t in SPECIALS:
                continue
            bs.extend(U2B[c] for c in t)
        return bs.decode("utf-8", errors="replace")


def tokenizer_json(vocab, merges):
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(SPECIALS)]
    bos = SPECIALS[BOS_ID]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=os.path.join(ROOT, "build/train/corpus.txt"))
    ap.add_argument("--out", default=os.path.join(ROOT, "build/train/model"))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-len", type=int, default=256, help="model_max_length in tokenizer_config.json")
    args = ap.parse_args()

    t0 = time.time()
    text = open(args.corpus, encoding="utf-8").read()
    wf = collections.Counter(pretokenize(text))
    print(f"tokenizer: {len(text)} chars, {sum(wf.values())} pre-tokens, {len(wf)} unique "
          f"({time.time() - t0:.1f}s; regex module: {_re.__name__})", flush=True)
    n_merges = args.vocab_size - len(SPECIALS) - 256
    merges = train_bpe(wf, n_merges)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[B2U[b]] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) == len(SPECIALS) + 256 + len(merges), "duplicate token in vocab"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(vocab, merges), f, ensure_ascii=False, indent=1)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIALS[BOS_ID],
        "eos_token": SPECIALS[EOS_ID],
        "unk_token": None,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": args.max_len,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    # sanity: round trip and compression on a sample
    tok = BPETokenizer(vocab, merges)
    sample = text[:200000]
    ids = tok.encode(sample, add_bos=False)
    assert tok.decode(ids) == sample, "round trip failed"
    print(f"tokenizer: vocab {len(vocab)} ({len(merges)} merges), {len(sample) / len(ids):.2f} chars/token, "
          f"wrote {args.out}/tokenizer.json ({time.time() - t0:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
