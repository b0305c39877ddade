// A random-weight Llama checkpoint with SmolLM2-135M's shape (30 layers, hidden 576, intermediate 1536, 9 heads,
// 3 KV heads, vocab 49152, tied embeddings): model.safetensors (F32), config.json, tokenizer.json,
// tokenizer_config.json. Speed does not need trained weights. Deterministic (seeded).
//   node make-random-model.mjs --out DIR [--seed 1]
// The tokenizer is a GPT-2 byte-level BPE of exactly 49152 tokens: 3 special tokens, the 256 byte symbols, and
// 48893 merges of two byte symbols (valid BPE: every merge joins two tokens that exist before it).
// The EOS row of the (tied) embedding is zero, so its logit is exactly 0 and greedy decoding never stops early:
// every engine generates the full token count.
import { closeSync, mkdirSync, openSync, writeFileSync, writeSync } from "node:fs"
import { join } from "node:path"
import { argv } from "./lib/checkpoint.mjs"

const args = argv(process.argv.slice(2))
if (!args.out) throw new Error("usage: --out DIR [--seed N]")
const cfg = {
  architectures: ["LlamaForCausalLM"],
  model_type: "llama",
  hidden_size: 576,
  intermediate_size: 1536,
  num_hidden_layers: 30,
  num_attention_heads: 9,
  num_key_value_heads: 3,
  head_dim: 64,
  hidden_act: "silu",
  vocab_size: 49152,
  max_position_embeddings: 2048,
  rms_norm_eps: 1e-5,
  rope_theta: 100000,
  rope_scaling: null,
  attention_bias: false,
  mlp_bias: false,
  tie_word_embeddings: true,
  bos_token_id: 1,
  eos_token_id: 2,
  torch_dtype: "float32",
}

// xorshift128+ → normal(0, std) by Box-Muller.
let s0 = BigInt(args.seed ?? 1) * 0x9e3779b97f4a7c15n + 1n
let s1 = 0x2545f4914f6cdd1dn
const M = (1n << 64n) - 1n
const nextU = () => {
  let x = s0
  const y = s1
  s0 = y
  x ^= (x << 23n) & M
  s1 = x ^ y ^ (x >> 17n) ^ (y >> 26n)
  return Number(((s1 + y) & M) >> 11n) / 2 ** 53
}
// BigInt is slow for 135M draws: seed a fast 32-bit generator (mulberry32) from it.
let m = Math.floor(nextU() * 2 ** 32) >>> 0
const rand = () => {
  m = (m + 0x6d2b79f5) >>> 0
  let t = m
  t = Math.imul(t ^ (t >>> 15), t | 1)
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}
const normal = (n, std) => {
  const out = new Float32Array(n)
  for (let i = 0; i < n; i += 2) {
    const u = 1 - rand()
    const v = rand()
    const r = Math.sqrt(-2 * Math.log(u)) * std
    out[i] = r * Math.cos(2 * Math.PI * v)
    if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * v)
  }
  return out
}

const D = cfg.hidden_size
const F = cfg.intermediate_size
const hd = cfg.head_dim
const tensors = []
const add = (name, shape, data) => tensors.push({ name, shape, data })
const std = 0.02
const embed = normal(cfg.vocab_size * D, std)
embed.fill(0, cfg.eos_token_id * D, (cfg.eos_token_id + 1) * D)
add("model.embed_tokens.weight", [cfg.vocab_size, D], embed)
for (let l = 0; l < cfg.num_hidden_layers; l++) {
  const p = `model.layers.${l}.`
  add(`${p}input_layernorm.weight`, [D], new Float32Array(D).fill(1))
  add(`${p}self_attn.q_proj.weight`, [cfg.num_attention_heads * hd, D], normal(cfg.num_attention_heads * hd * D, std))
  add(`${p}self_attn.k_proj.weight`, [cfg.num_key_value_heads * hd, D], normal(cfg.num_key_value_heads * hd * D, std))
  add(`${p}self_attn.v_proj.weight`, [cfg.num_key_value_heads * hd, D], normal(cfg.num_key_value_heads * hd * D, std))
  add(`${p}self_attn.o_proj.weight`, [D, cfg.num_attention_heads * hd], normal(D * cfg.num_attention_heads * hd, std))
  add(`${p}post_attention_layernorm.weight`, [D], new Float32Array(D).fill(1))
  add(`${p}mlp.gate_proj.weight`, [F, D], normal(F * D, std))
  add(`${p}mlp.up_proj.weight`, [F, D], normal(F * D, std))
  add(`${p}mlp.down_proj.weight`, [D, F], normal(D * F, std))
}
add("model.norm.weight", [D], new Float32Array(D).fill(1))

mkdirSync(args.out, { recursive: true })
const header = { __metadata__: { format: "pt", note: "random weights, SmolLM2-135M shape" } }
let offset = 0
for (const x of tensors) {
  header[x.name] = { dtype: "F32", shape: x.shape, data_offsets: [offset, offset + x.data.byteLength] }
  offset += x.data.byteLength
}
let headerText = JSON.stringify(header)
headerText += " ".repeat((8 - (headerText.length % 8)) % 8)
const fd = openSync(join(args.out, "model.safetensors"), "w")
const len = Buffer.alloc(8)
len.writeBigUInt64LE(BigInt(Buffer.byteLength(headerText)))
writeSync(fd, len)
writeSync(fd, Buffer.from(headerText))
for (const x of tensors) writeSync(fd, Buffer.from(x.data.buffer, x.data.byteOffset, x.data.byteLength))
closeSync(fd)
writeFileSync(join(args.out, "config.json"), JSON.stringify(cfg, null, 2))

// GPT-2's bytes_to_unicode.
const bs = []
for (let b = 33; b <= 126; b++) bs.push(b)
for (let b = 161; b <= 172; b++) bs.push(b)
for (let b = 174; b <= 255; b++) bs.push(b)
const cs = [...bs]
let extra = 0
for (let b = 0; b < 256; b++)
  if (!bs.includes(b)) {
    bs.push(b)
    cs.push(256 + extra++)
  }
const byteSymbols = bs
  .map((b, i) => [b, String.fromCodePoint(cs[i])])
  .sort((a, b) => a[0] - b[0])
  .map((x) => x[1])
const specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
const vocab = {}
let size = 0
for (const s of [...specials, ...byteSymbols]) vocab[s] = size++
const merges = []
const needed = cfg.vocab_size - size
// Printable symbols first (space "Ġ" and letters first), so common text gets two-byte tokens.
const order = [...byteSymbols].sort((a, b) => {
  const rank = (s) => (s === "Ġ" ? 0 : /[a-z]/.test(s) ? 1 : /[A-Za-z]/.test(s) ? 2 : /[0-9.,!?']/.test(s) ? 3 : 4)
  return rank(a) - rank(b) || a.localeCompare(b)
})
outer: for (const a of order)
  for (const b of order) {
    if (merges.length === needed) break outer
    merges.push([a, b])
    vocab[a + b] = size++
  }
const tokenizer = {
  version: "1.0",
  truncation: null,
  padding: null,
  added_tokens: specials.map((content, id) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  })),
  normalizer: null,
  pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
  post_processor: { type: "ByteLevel", add_prefix_space: true, trim_offsets: false, use_regex: true },
  decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
  model: {
    type: "BPE",
    dropout: null,
    unk_token: null,
    continuing_subword_prefix: null,
    end_of_word_suffix: null,
    fuse_unk: false,
    byte_fallback: false,
    ignore_merges: false,
    vocab,
    merges,
  },
}
writeFileSync(join(args.out, "tokenizer.json"), JSON.stringify(tokenizer))
writeFileSync(
  join(args.out, "tokenizer_config.json"),
  JSON.stringify(
    {
      tokenizer_class: "PreTrainedTokenizerFast",
      bos_token: "<|im_start|>",
      eos_token: "<|im_end|>",
      unk_token: null,
      add_bos_token: false,
      add_eos_token: false,
      model_max_length: cfg.max_position_embeddings,
      clean_up_tokenization_spaces: false,
    },
    null,
    2,
  ),
)
console.log(JSON.stringify({ out: args.out, vocab: size, merges: merges.length, bytes: offset }))
