#!/usr/bin/python3
"""Checks a saved model dir (config.json + model.safetensors + tokenizer.json).

1. Names/shapes/dtypes exactly as Hugging Face LlamaForCausalLM (tied: no lm_head.weight).
2. An independent numpy implementation of the HF Llama forward pass (rotate_half RoPE,
   repeat_kv GQA, RMSNorm, SwiGLU), reading only config.json + model.safetensors, gives the
   same logits at every exit (final norm + tied head after layers early_exit_layers and the
   last) as train.py's PyTorch model.
3. Greedy continuation of a prompt from the final exit and from each early exit.

Usage: /usr/bin/python3 tools/train/check_model.py [model_dir] [--prompt TEXT]
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import load_file  # noqa: E402
from tokenizer import BPETokenizer, EOS_ID  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def expected_shapes(c):
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = c.get("head_dim", H // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                  p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
                  p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                  p + "mlp.down_proj.weight": (H, I), p + "input_layernorm.weight": (H,),
                  p + "post_attention_layernorm.weight": (H,)})
    if not c.get("tie_word_embeddings", False):
        s["lm_head.weight"] = (V, H)
    return s


def np_forward(W, c, ids):
    """HF LlamaForCausalLM semantics in numpy (float64). Returns {exit_layer: logits[T, V]}."""
    H, nh, nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim", H // nh)
    eps, L = c["rms_norm_eps"], c["num_hidden_layers"]
    W = {k: v.astype(np.float64) for k, v in W.items()}
    T = len(ids)

    def rms(x, w):
        return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    inv = 1.0 / (c["rope_theta"] ** (np.arange(0, d, 2) / d))
    fr = np.outer(np.arange(T), inv)
    emb = np.concatenate([fr, fr], -1)
    cos, sin = np.cos(emb), np.sin(emb)

    def rope(x):  # x [heads, T, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    exits = sorted(set(c.get("early_exit_layers", [])) | {L})
    x = W["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    out = {}
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = (h @ W[p + "self_attn.q_proj.weight"].T).reshape(T, nh, d).transpose(1, 0, 2)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, d).transpose(1, 0, 2)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, d).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        rep = nh // nkv
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        a = q @ k.transpose(0, 2, 1) / np.sqrt(d) + mask
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        y = (a @ v).transpose(1, 0, 2).reshape(T, nh * d)
        x = x + y @ W[p + "self_attn.o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        g = h @ W[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
        if i + 1 in exits:
            out[i + 1] = rms(x, W["model.norm.weight"]) @ head.T
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", nargs="?", default=os.path.join(ROOT, "build/train/model"))
    ap.add_argument("--prompt", default="And God said,")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--no-torch", action="store_true", help="skip the comparison with train.py's model")
    a = ap.parse_args()
    c = json.load(open(os.path.join(a.model_dir, "config.json")))
    W, meta = load_file(os.path.join(a.model_dir, "model.safetensors"))
    exp = expected_shapes(c)
    assert set(W) == set(exp), f"tensor names differ: {sorted(set(W) ^ set(exp))}"
    for k, s in exp.items():
        assert tuple(W[k].shape) == s and W[k].dtype == np.float32, (k, W[k].shape, W[k].dtype, s)
        assert np.isfinite(W[k]).all(), k
    print(f"ok: {len(W)} tensors, names/shapes/dtype F32 as HF LlamaForCausalLM; metadata {meta}")
    tok = BPETokenizer.from_file(os.path.join(a.model_dir, "tokenizer.json"))
    ids = tok.encode(a.prompt)
    ref = np_forward(W, c, ids)

    if not a.no_torch:
        import torch
        torch.set_num_threads(1)
        sys.argv = [sys.argv[0], "--minutes", "1"]
        import train as T
        m = T.EarlyExitLlama(c)
        sd = {k: torch.from_numpy(v) for k, v in W.items()}
        missing, unexpected = m.load_state_dict(sd, strict=False)
        assert not unexpected and not missing, (missing, unexpected)
        with torch.no_grad():
            hs = m(torch.tensor([ids]))
            for e in sorted(ref):
                lt = m.head(hs[e])[0].double().numpy()
                err = np.abs(lt - ref[e]).max()
                print(f"exit L{e}: max |torch - numpy HF reference| = {err:.2e}")
                assert err < 1e-3, "logits differ"
        print("ok: train.py forward == independent HF-semantics numpy forward at every exit")

    for e in sorted(ref):
        cur = list(ids)
        for _ in range(a.tokens):
            nxt = int(np_forward(W, c, cur[-c["max_position_embeddings"]:])[e][-1].argmax())
            if nxt == EOS_ID:
                break
            cur.append(nxt)
        print(f"greedy from exit L{e}: {tok.decode(cur)!r}")


if __name__ == "__main__":
    main()
