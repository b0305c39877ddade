#!/usr/bin/python3
"""Trains a small Llama-style early-exit model (LayerSkip-style) for Offramp.

Plain PyTorch (Debian python3-torch 1.13, CPU). Llama decoder: RMSNorm, RoPE (HF rotate_half
convention), SwiGLU MLP, grouped-query attention, tied embeddings. The shared final norm +
LM head is applied after each exit layer (default 2,4,6 and the last); the loss is a weighted
sum of the exits' cross-entropies (weights proportional to depth, normalised), optionally plus
self-distillation of the early exits towards the final exit (--distill, KL at temperature 1).

Writes, every --ckpt-every-min minutes and at the end, a Hugging Face LlamaForCausalLM layout
to --out (default build/train/model): config.json, model.safetensors (fp32), tokenizer files;
logs held-out loss/perplexity/top-1 agreement per exit to --log (build/train/log.jsonl);
writes build/train/DONE (JSON summary) when finished.

Example: /usr/bin/python3 tools/train/train.py --minutes 75 --threads 1
"""
import argparse
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.path.join(ROOT, "build", "train")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("time / machine")
    g.add_argument("--minutes", type=float, help="training budget in minutes (wall clock, from start)")
    g.add_argument("--deadline", help="stop at this time: ISO 8601 (e.g. 2026-11-29T22:15:00Z; "
                   "no zone = UTC) or a number of seconds from start")
    g.add_argument("--reserve-sec", type=float, default=45, help="stop training this long before the "
                   "deadline to leave time for the final eval + save")
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=0, help="optional step cap (0 = none)")
    g.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    g = ap.add_argument_group("model")
    g.add_argument("--layers", type=int, default=8)
    g.add_argument("--hidden", type=int, default=192)
    g.add_argument("--heads", type=int, default=6)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--intermediate", type=int, default=512)
    g.add_argument("--ctx", type=int, default=256)
    g.add_argument("--exits", default="2,4,6", help="early-exit layers (1-based; the last layer is always an exit)")
    g.add_argument("--rope-theta", type=float, default=10000.0)
    g.add_argument("--rms-eps", type=float, default=1e-5)
    g = ap.add_argument_group("optimisation")
    g.add_argument("--batch", type=int, default=16)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--min-lr-frac", type=float, default=0.1)
    g.add_argument("--warmup", type=int, default=150, help="warmup steps")
    g.add_argument("--wd", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--exit-weights", default="depth", help="'depth' (w_l proportional to l) or a "
                   "comma list, one per exit incl. the last; normalised to sum 1")
    g.add_argument("--exit-frac", type=float, default=0.25, help="fraction of token positions (random each "
                   "step) on which the early exits' loss is computed; the final exit always uses all (1 = all)")
    g.add_argument("--distill", type=float, default=1.0, help="self-distillation weight a: an early exit's "
                   "loss is CE + a*KL(final || exit), the final exit's distribution detached (0 = off)")
    g.add_argument("--layer-drop", type=float, default=0.1, help="LayerSkip layer dropout: layer l (0-based) is "
                   "skipped for a sequence with probability layer-drop * l/(L-1) (0 = off)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout on each sublayer's residual branch")
    g.add_argument("--val-frac", type=float, default=0.02, help="tail of the training token stream held back as "
                   "validation: checkpoint selection reads it, never the held-out text")
    g.add_argument("--seed", type=int, default=1337)
    g = ap.add_argument_group("io")
    g.add_argument("--corpus", default=os.path.join(BUILD, "corpus.txt"))
    g.add_argument("--heldout", default=os.path.join(BUILD, "heldout.txt"))
    g.add_argument("--tokenizer-dir", default=os.path.join(BUILD, "model"))
    g.add_argument("--out", default=os.path.join(BUILD, "model"))
    g.add_argument("--log", default=os.path.join(BUILD, "log.jsonl"))
    g.add_argument("--done-file", default=os.path.join(BUILD, "DONE"))
    g.add_argument("--state", default=os.path.join(BUILD, "train-state.pt"), help="torch state (model+optimizer) "
                   "written at each checkpoint, for --resume")
    g.add_argument("--resume", default="", help="path of a train-state.pt to resume from")
    g.add_argument("--eval-every-min", type=float, default=5.0)
    g.add_argument("--ckpt-every-min", type=float, default=10.0)
    g.add_argument("--eval-tokens", type=int, default=32768, help="max held-out tokens per eval")
    g.add_argument("--print-every", type=int, default=20)
    return ap.parse_args()


ARGS = parse_args()
os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)
os.environ["MKL_NUM_THREADS"] = str(ARGS.threads)
os.environ["OPENBLAS_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import load_file, save_file  # noqa: E402
from tokenizer import BOS_ID, EOS_ID, BPETokenizer  # noqa: E402

torch.set_num_threads(ARGS.threads)
DEV = torch.device("cuda" if ARGS.device == "auto" and torch.cuda.is_available() else
                   ("cpu" if ARGS.device == "auto" else ARGS.device))
if DEV.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
try:
    torch.set_num_interop_threads(1)
except RuntimeError:
    pass


# ----------------------------------------------------------------------------- model
class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.kv, self.d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        hid = c["hidden_size"]
        self.q_proj = nn.Linear(hid, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(hid, self.kv * self.d, bias=False)
        self.v_proj = nn.Linear(hid, self.kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, hid, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv, self.d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin      # HF apply_rotary_pos_emb
        k = k * cos + rotate_half(k) * sin
        rep = self.h // self.kv                 # HF repeat_kv: kv head j -> q heads j*rep..j*rep+rep-1
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        if hasattr(F, "scaled_dot_product_attention"):   # torch >= 2: fused kernels
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.d)) + mask[:T, :T]
            y = att.softmax(-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c["hidden_size"], c["intermediate_size"], bias=False)
        self.up_proj = nn.Linear(c["hidden_size"], c["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(c["intermediate_size"], c["hidden_size"], bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x, cos, sin, mask, p=0.0):
        x = x + F.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask), p, self.training)
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), p, self.training)


class Inner(nn.Module):  # "model." prefix in HF names
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList([Layer(c) for _ in range(c["num_hidden_layers"])])
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class EarlyExitLlama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.model = Inner(c)
        self.exits = sorted(set(c["early_exit_layers"]) | {c["num_hidden_layers"]})
        d, T = c["head_dim"], c["max_position_embeddings"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        fr = torch.outer(torch.arange(T, dtype=torch.float32), inv)
        emb = torch.cat((fr, fr), dim=-1)
        self.register_buffer("cos", emb.cos()[None, None], persistent=False)
        self.register_buffer("sin", emb.sin()[None, None], persistent=False)
        self.register_buffer("mask", torch.full((T, T), float("-inf")).triu(1), persistent=False)
        self.apply(self._init)
        resid_std = 0.02 / math.sqrt(2 * c["num_hidden_layers"])
        for L in self.model.layers:
            nn.init.normal_(L.self_attn.o_proj.weight, std=resid_std)
            nn.init.normal_(L.mlp.down_proj.weight, std=resid_std)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def head(self, h):  # shared exit head: final norm + tied LM head
        return F.linear(self.model.norm(h), self.model.embed_tokens.weight)

    def forward(self, idx, dropout=0.0, layer_drop=0.0):
        """Returns {exit_layer: hidden state after that layer} (pre-norm).

        layer_drop: LayerSkip's layer dropout (training only): layer l (0-based) of a sequence is skipped with
        probability layer_drop * l / (L-1), so the early layers, which the exits need, are never dropped and later
        layers learn to refine rather than rebuild."""
        B, T = idx.shape
        x = self.model.embed_tokens(idx)
        cos, sin = self.cos[:, :, :T], self.sin[:, :, :T]
        outs = {}
        n = len(self.model.layers)
        for i, L in enumerate(self.model.layers, start=1):
            p = layer_drop * (i - 1) / max(1, n - 1) if self.training else 0.0
            y = L(x, cos, sin, self.mask, dropout)
            if p > 0:
                keep = (torch.rand(B, 1, 1, device=x.device) >= p).to(x.dtype)
                y = x + keep * (y - x)
            x = y
            if i in self.exits:
                outs[i] = x
        return outs

    def hf_state(self):
        sd = {k: v.detach().float().cpu().numpy() for k, v in self.state_dict().items()}
        if self.c.get("tie_word_embeddings", True):
            sd.pop("lm_head.weight", None)
        return sd


# ----------------------------------------------------------------------------- data
def encode_file(path, tok, cache_key):
    cache = os.path.join(BUILD, f"tokens-{os.path.basename(path)}-{cache_key}.npy")
    if os.path.exists(cache):
        return np.load(cache)
    t0 = time.time()
    text = open(path, encoding="utf-8").read()
    ids = []
    for doc in text.split("\n\n"):
        doc = doc.strip("\n")
        if doc:
            ids.extend(tok.encode(doc, add_bos=True))   # <|bos|> doc <|eos|>
            ids.append(EOS_ID)
    arr = np.array(ids, dtype=np.uint16)
    np.save(cache, arr)
    log(f"encoded {path}: {len(arr)} tokens ({time.time() - t0:.1f}s)")
    return arr


def log(msg):
    print(f"[{dt.datetime.utcnow().strftime('%H:%M:%S')}] {msg}", flush=True)


def append_jsonl(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def resolve_deadline(args, t_start):
    if args.deadline:
        try:
            return t_start + float(args.deadline)
        except ValueError:
            s = args.deadline.replace("Z", "+00:00")
            d = dt.datetime.fromisoformat(s)
            if d.tzinfo is None:
                d = d.replace(tzinfo=dt.timezone.utc)
            return d.timestamp()
    if args.minutes:
        return t_start + 60 * args.minutes
    raise SystemExit("give --minutes or --deadline")


# ----------------------------------------------------------------------------- eval / save
@torch.no_grad()
def evaluate(model, held, ctx, max_tokens, batch):
    model.eval()
    n = min(len(held) - 1, max_tokens) // ctx
    sums = {e: {"nll": 0.0, "agree": 0, "acc": 0} for e in model.exits}
    count = 0
    last = model.exits[-1]
    for b0 in range(0, n, batch):
        rows = [held[i * ctx:(i * ctx) + ctx + 1] for i in range(b0, min(n, b0 + batch))]
        xy = torch.from_numpy(np.stack(rows).astype(np.int64)).to(DEV)
        x, y = xy[:, :-1], xy[:, 1:]
        hs = model(x)
        final_top = None
        logits_all = {e: model.head(hs[e]) for e in model.exits}
        final_top = logits_all[last].argmax(-1)
        for e, lg in logits_all.items():
            sums[e]["nll"] += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), reduction="sum").item()
            top = lg.argmax(-1)
            sums[e]["agree"] += (top == final_top).sum().item()
            sums[e]["acc"] += (top == y).sum().item()
        count += y.numel()
    model.train()
    res = {}
    for e, s in sums.items():
        loss = s["nll"] / count
        res[str(e)] = {"loss": round(loss, 4), "ppl": round(math.exp(loss), 2),
                       "top1_agree_final": round(s["agree"] / count, 4), "top1_acc": round(s["acc"] / count, 4)}
    return res, count


@torch.no_grad()
def sample(model, tok, prompt, n=40):
    model.eval()
    ids = tok.encode(prompt, add_bos=True)
    last = model.exits[-1]
    for _ in range(n):
        x = torch.tensor([ids[-model.c["max_position_embeddings"]:]], device=DEV)
        nxt = int(model.head(model(x)[last][:, -1]).argmax(-1))
        if nxt == EOS_ID:
            break
        ids.append(nxt)
    model.train()
    return tok.decode(ids)


def save_hf(model, cfg, args, extra_meta):
    os.makedirs(args.out, exist_ok=True)
    save_file(model.hf_state(), os.path.join(args.out, "model.safetensors"), metadata={"format": "pt", **extra_meta})
    tmp = os.path.join(args.out, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "config.json"))
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        src, dst = os.path.join(args.tokenizer_dir, fn), os.path.join(args.out, fn)
        if os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(src, dst)


def check_saved(model, path):
    """Reads model.safetensors back with our reader and compares names/shapes/values."""
    t, _ = load_file(path)
    ref = model.hf_state()
    assert set(t) == set(ref), f"name mismatch: {sorted(set(t) ^ set(ref))}"
    for k, v in ref.items():
        assert t[k].shape == v.shape and t[k].dtype == np.float32, k
        assert np.array_equal(t[k], v), k
    return len(t)


# ----------------------------------------------------------------------------- main
def main():
    args = ARGS
    t_start = time.time()
    deadline = resolve_deadline(args, t_start)
    stop_at = deadline - args.reserve_sec
    os.makedirs(BUILD, exist_ok=True)
    if os.path.exists(args.done_file):
        os.remove(args.done_file)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    tok_path = os.path.join(args.tokenizer_dir, "tokenizer.json")
    tok = BPETokenizer.from_file(tok_path)
    key = hashlib.sha1(open(tok_path, "rb").read()).hexdigest()[:10]
    train = encode_file(args.corpus, tok, key)
    held = encode_file(args.heldout, tok, key)
    n_val = int(len(train) * args.val_frac)
    val = train[len(train) - n_val:] if n_val > 0 else None
    train = train[:len(train) - n_val]

    exits = sorted({int(e) for e in args.exits.split(",") if e.strip()} - {args.layers})
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "hidden_act": "silu",
        "vocab_size": len(tok.vocab),
        "max_position_embeddings": args.ctx,
        "rms_norm_eps": args.rms_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "early_exit_layers": exits,
    }
    assert args.hidden % args.heads == 0 and args.heads % args.kv_heads == 0
    model = EarlyExitLlama(cfg).to(DEV)
    all_exits = model.exits
    if args.exit_weights == "depth":
        w = [float(e) for e in all_exits]
    else:
        w = [float(v) for v in args.exit_weights.split(",")]
        assert len(w) == len(all_exits), f"need {len(all_exits)} exit weights"
    w = [v / sum(w) for v in w]
    weights = dict(zip(all_exits, w))
    cfg["early_exit_loss_weights"] = [round(v, 4) for v in w]   # informational
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    step, tokens_seen, train_time = 0, 0, 0.0
    resumed_best = None
    state_path = args.state
    if args.resume:
        st = torch.load(args.resume, map_location=DEV, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, tokens_seen, train_time = st["step"], st["tokens"], st.get("train_time", 0.0)
        resumed_best = st.get("best")
        log(f"resumed from {args.resume} at step {step}")

    budget = stop_at - t_start
    log(f"params {n_params} ({n_params - cfg['vocab_size'] * args.hidden} non-embedding), "
        f"train {len(train)} tok, heldout {len(held)} tok, exits {all_exits} weights {[round(v, 3) for v in w]}, "
        f"exit-frac {args.exit_frac}, distill {args.distill}, threads {torch.get_num_threads()}, budget {budget / 60:.1f} min "
        f"(stop {dt.datetime.utcfromtimestamp(stop_at).isoformat()}Z)")
    append_jsonl(args.log, {"type": "start", "time": dt.datetime.utcnow().isoformat() + "Z", "config": cfg,
                            "args": vars(args), "params": n_params, "train_tokens": int(len(train)),
                            "heldout_tokens": int(len(held))})

    def lr_at(step, frac):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        m = args.min_lr_frac
        return args.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    best = {"loss": math.inf, "step": None, "state": None}

    def do_eval(tag):
        t0 = time.time()
        res, cnt = evaluate(model, held, args.ctx, args.eval_tokens, args.batch)
        val_res = evaluate(model, val, args.ctx, args.eval_tokens, args.batch)[0] if val is not None else None
        smp = sample(model, tok, "In the beginning")
        rec = {"type": "eval", "tag": tag, "time": dt.datetime.utcnow().isoformat() + "Z", "step": step,
               "tokens": tokens_seen, "elapsed_min": round((time.time() - t_start) / 60, 2),
               "eval_tokens": cnt, "exits": res, "val": val_res, "sample": smp,
               "eval_sec": round(time.time() - t0, 1)}
        append_jsonl(args.log, rec)
        for name, r in (("val", val_res), ("heldout", res)):
            if r is not None:
                log(f"eval {name} " + " | ".join(f"L{e}: loss {x['loss']:.3f} ppl {x['ppl']:.1f} agree "
                                                 f"{x['top1_agree_final']:.3f}" for e, x in r.items()))
        log(f"sample: {smp!r} ({rec['eval_sec']}s)")
        # The model kept is the one with the lowest full-depth validation loss (the corpus is small enough to
        # overfit when compute is plentiful); the held-out text never decides.
        if val_res is not None and tag != "final":
            vl = val_res[str(all_exits[-1])]["loss"]
            if vl < best["loss"]:
                best.update(loss=vl, step=step, state={k: v.detach().clone() for k, v in model.state_dict().items()})
        return rec

    def checkpoint(tag):
        meta = {"step": str(step), "tokens": str(tokens_seen)}
        save_hf(model, cfg, args, meta)
        n = check_saved(model, os.path.join(args.out, "model.safetensors"))
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "tokens": tokens_seen,
                    "train_time": train_time, "config": cfg, "best": best}, state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)
        append_jsonl(args.log, {"type": "checkpoint", "tag": tag, "time": dt.datetime.utcnow().isoformat() + "Z",
                                "step": step, "tokens": tokens_seen, "path": args.out, "tensors": n})
        log(f"checkpoint ({tag}) step {step}, {tokens_seen} tokens -> {args.out} ({n} tensors verified)")

    if resumed_best is not None:
        best.update(resumed_best)
    model.train()
    T, B = args.ctx, args.batch
    last_eval = last_ckpt = time.time()
    win_t, win_tok = time.time(), 0
    acc = {e: 0.0 for e in all_exits}
    acc_n = 0
    last_exit = all_exits[-1]
    eval_rec = None
    while time.time() < stop_at and (not args.max_steps or step < args.max_steps):
        ts = time.time()
        starts = rng.integers(0, len(train) - T - 1, size=B)
        xy = torch.from_numpy(np.stack([train[s:s + T + 1] for s in starts]).astype(np.int64)).to(DEV)
        x, y = xy[:, :-1], xy[:, 1:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, (time.time() - t_start) / max(1.0, budget))
        hs = model(x, args.dropout, args.layer_drop)
        loss = 0.0
        final_logp = None
        # early exits: CE on a random subset of positions (same for all exits) to save LM-head compute
        k = max(1, int(round(args.exit_frac * T)))
        sub = torch.randperm(T, device=DEV)[:k] if k < T else None
        for e in reversed(all_exits):
            h, yy = hs[e], y
            if e != last_exit and sub is not None:
                h, yy = h[:, sub], y[:, sub]
            lg = model.head(h).reshape(-1, cfg["vocab_size"])
            ce = F.cross_entropy(lg, yy.reshape(-1))
            acc[e] += ce.detach()
            if e == last_exit:
                final_logp = F.log_softmax(lg.detach(), -1).view(B, T, -1)
                if sub is not None:
                    final_logp = final_logp[:, sub]
                final_logp = final_logp.reshape(-1, cfg["vocab_size"])
                term = ce
            elif args.distill > 0:
                kl = F.kl_div(F.log_softmax(lg, -1), final_logp, log_target=True, reduction="batchmean")
                term = ce + args.distill * kl
            else:
                term = ce
            loss = loss + weights[e] * term
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        tokens_seen += B * T
        win_tok += B * T
        acc_n += 1
        train_time += time.time() - ts
        if step % args.print_every == 0:
            now = time.time()
            tps = win_tok / (now - win_t)
            rec = {"type": "train", "step": step, "tokens": tokens_seen, "lr": round(opt.param_groups[0]["lr"], 6),
                   "grad_norm": round(float(gn), 3), "tok_per_s": round(tps, 1),
                   "elapsed_min": round((now - t_start) / 60, 2),
                   "loss": {str(e): round(float(acc[e]) / acc_n, 4) for e in all_exits}}
            append_jsonl(args.log, rec)
            log(f"step {step} tok {tokens_seen} lr {rec['lr']:.2e} gn {rec['grad_norm']:.2f} "
                f"{tps:.0f} tok/s loss " + " ".join(f"L{e}={v}" for e, v in rec["loss"].items()))
            win_t, win_tok = now, 0
            acc = {e: 0.0 for e in all_exits}
            acc_n = 0
        now = time.time()
        if now - last_eval >= 60 * args.eval_every_min:
            eval_rec = do_eval("periodic")
            last_eval = time.time()
            win_t, win_tok = time.time(), 0
        if now - last_ckpt >= 60 * args.ckpt_every_min:
            checkpoint("periodic")
            last_ckpt = time.time()
            win_t, win_tok = time.time(), 0

    do_eval("last")
    if best["state"] is not None:
        log(f"keeping the step-{best['step']} weights (lowest full-depth validation loss {best['loss']:.4f})")
        model.load_state_dict(best["state"])
    eval_rec = do_eval("final")
    checkpoint("final")
    summary = {"finished": dt.datetime.utcnow().isoformat() + "Z", "steps": step, "tokens": tokens_seen,
               "tokens_per_s_train": round(tokens_seen / max(1e-9, train_time), 1),
               "wall_min": round((time.time() - t_start) / 60, 2), "model_dir": args.out,
               "final_eval": eval_rec["exits"], "final_val": eval_rec["val"], "kept_step": best["step"]}
    append_jsonl(args.log, {"type": "done", **summary})
    with open(args.done_file, "w") as f:
        json.dump(summary, f, indent=2)
    log(f"done: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
