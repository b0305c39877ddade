// Hugging Face Llama checkpoint → GGUF v3 for llama.cpp (architecture "llama"), in F32, F16, Q8_0 or Q4_0.
//   node convert-gguf.mjs --dir CHECKPOINT [--tokenizer tokenizer.json] --out model.gguf [--type f32|f16|q8_0|q4_0]
// Written from the GGUF spec (ggml/docs/gguf.md) and llama.cpp's convert_hf_to_gguf.py: tensor names, the Q/K row
// permutation (Hugging Face stores rotate-half rows; llama.cpp's "llama" arch rotates adjacent pairs), GPT-2 BPE vocab.
import { closeSync, openSync, writeSync } from "node:fs"
import { pathToFileURL } from "node:url"
import { argv, f32ToF16, readCheckpoint, toF16Array } from "./lib/checkpoint.mjs"

const GGUF = { UINT8: 0, INT8: 1, UINT32: 4, INT32: 5, FLOAT32: 6, BOOL: 7, STRING: 8, ARRAY: 9, UINT64: 10 }
const GGML = { F32: 0, F16: 1, Q4_0: 2, Q8_0: 8 }
const FILE_TYPE = { f32: 0, f16: 1, q8_0: 7, q4_0: 2 } // llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_Q4_0
const ALIGN = 32

class Bytes {
  parts = []
  length = 0
  push(buf) {
    this.parts.push(buf)
    this.length += buf.length
  }
  u32(v) {
    const b = Buffer.alloc(4)
    b.writeUInt32LE(v)
    this.push(b)
  }
  i32(v) {
    const b = Buffer.alloc(4)
    b.writeInt32LE(v)
    this.push(b)
  }
  u64(v) {
    const b = Buffer.alloc(8)
    b.writeBigUInt64LE(BigInt(v))
    this.push(b)
  }
  f32(v) {
    const b = Buffer.alloc(4)
    b.writeFloatLE(v)
    this.push(b)
  }
  str(s) {
    const b = Buffer.from(s, "utf8")
    this.u64(b.length)
    this.push(b)
  }
  concat() {
    return Buffer.concat(this.parts)
  }
}

/** convert_hf_to_gguf.py's LlamaModel.permute: per head, rows (2, hd/2) → (hd/2, 2). */
export const permuteRows = (w, rows, cols, heads) => {
  const hd = rows / heads
  const half = hd / 2
  const out = new Float32Array(w.length)
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < half; i++)
      for (let j = 0; j < 2; j++) {
        const src = (h * hd + j * half + i) * cols
        const dst = (h * hd + i * 2 + j) * cols
        out.set(w.subarray(src, src + cols), dst)
      }
  return out
}

/** ggml's quantize_row_q8_0_ref: blocks of 32 along a row, f16 scale amax/127, int8 round(x/scale). */
const quantizeQ8_0 = (data) => {
  const blocks = data.length / 32
  const out = Buffer.alloc(blocks * 34)
  for (let b = 0; b < blocks; b++) {
    let amax = 0
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(data[b * 32 + j]))
    const d = amax / 127
    const id = d ? 1 / d : 0
    out.writeUInt16LE(f32ToF16(d), b * 34)
    for (let j = 0; j < 32; j++) {
      const v = Math.fround(data[b * 32 + j] * id)
      out.writeInt8(Math.sign(v) * Math.round(Math.abs(v)), b * 34 + 2 + j) // roundf: half away from zero
    }
  }
  return out
}

/**
 * ggml's quantize_row_q4_0_ref: blocks of 32 along a row; per block an f16 scale d = max / -8, where max is the value
 * of largest magnitude (its sign kept, the first one on ties), then 16 bytes of 4-bit codes
 * q = min(15, trunc(x / d + 8.5)), byte j holding q[j] in its low nibble and q[j + 16] in its high nibble.
 * Dequantized: (q - 8) * d. The arithmetic is float32's, as the C (d, 1/d, x * id and + 8.5 each rounded to float).
 */
export const quantizeQ4_0 = (data) => {
  const blocks = data.length / 32
  const out = Buffer.alloc(blocks * 18)
  const code = (v) => Math.min(15, Math.max(0, Math.trunc(Math.fround(v + 8.5))))
  for (let b = 0; b < blocks; b++) {
    const x = data.subarray(b * 32, b * 32 + 32)
    let amax = 0
    let max = 0
    for (let j = 0; j < 32; j++)
      if (amax < Math.abs(x[j])) {
        amax = Math.abs(x[j])
        max = x[j]
      }
    const d = Math.fround(max / -8)
    const id = d ? Math.fround(1 / d) : 0
    out.writeUInt16LE(f32ToF16(d), b * 18)
    for (let j = 0; j < 16; j++) {
      const lo = code(Math.fround(x[j] * id))
      const hi = code(Math.fround(x[j + 16] * id))
      out[b * 18 + 2 + j] = lo | (hi << 4)
    }
  }
  return out
}

const main = () => {
  const args = argv(process.argv.slice(2))
  if (!args.dir || !args.out) throw new Error("usage: --dir CHECKPOINT --out FILE.gguf [--type f32|f16|q8_0|q4_0]")
  const type = args.type ?? "f32"
  if (!(type in FILE_TYPE)) throw new Error(`--type ${type}: f32, f16, q8_0 or q4_0`)
  const { config: c, tensors, tokenizer, tokenizerConfig } = readCheckpoint(args.dir, args.tokenizer)
  const t = (name) => {
    const x = tensors.get(name)
    if (!x) throw new Error(`missing tensor ${name}`)
    return x
  }

  // Tensors in llama.cpp's names; dims in GGUF order (ne[0] = the contiguous one, i.e. HF's last dim).
  const list = []
  const matrix = (name, x) => list.push({ name, data: x.data, ne: [...x.shape].reverse(), quantizable: true })
  const vector = (name, x) => list.push({ name, data: x.data, ne: [x.shape[0]], quantizable: false })
  matrix("token_embd.weight", t("model.embed_tokens.weight"))
  for (let l = 0; l < c.layers; l++) {
    const p = `model.layers.${l}.`
    vector(`blk.${l}.attn_norm.weight`, t(`${p}input_layernorm.weight`))
    const q = t(`${p}self_attn.q_proj.weight`)
    const k = t(`${p}self_attn.k_proj.weight`)
    matrix(`blk.${l}.attn_q.weight`, { shape: q.shape, data: permuteRows(q.data, q.shape[0], q.shape[1], c.heads) })
    matrix(`blk.${l}.attn_k.weight`, { shape: k.shape, data: permuteRows(k.data, k.shape[0], k.shape[1], c.kvHeads) })
    matrix(`blk.${l}.attn_v.weight`, t(`${p}self_attn.v_proj.weight`))
    matrix(`blk.${l}.attn_output.weight`, t(`${p}self_attn.o_proj.weight`))
    vector(`blk.${l}.ffn_norm.weight`, t(`${p}post_attention_layernorm.weight`))
    matrix(`blk.${l}.ffn_gate.weight`, t(`${p}mlp.gate_proj.weight`))
    matrix(`blk.${l}.ffn_up.weight`, t(`${p}mlp.up_proj.weight`))
    matrix(`blk.${l}.ffn_down.weight`, t(`${p}mlp.down_proj.weight`))
  }
  vector("output_norm.weight", t("model.norm.weight"))
  // Tied embeddings: no output.weight, llama.cpp then uses token_embd (as convert_hf_to_gguf.py writes it).
  if (!c.tied) matrix("output.weight", t("lm_head.weight"))

  // Vocabulary: GPT-2 byte-level BPE from tokenizer.json, ids in order; holes (padded vocab) as unused tokens.
  const model = tokenizer.model
  if (model.type !== "BPE") throw new Error(`tokenizer model ${model.type}: only byte-level BPE is written`)
  const tokens = new Array(c.vocab).fill(null)
  const types = new Array(c.vocab).fill(1) // NORMAL
  for (const [tok, id] of Object.entries(model.vocab)) if (id < c.vocab) tokens[id] = tok
  for (const a of tokenizer.added_tokens ?? [])
    if (a.id < c.vocab) {
      tokens[a.id] = a.content
      types[a.id] = a.special ? 3 : 4 // CONTROL : USER_DEFINED
    }
  for (let i = 0; i < c.vocab; i++)
    if (tokens[i] === null) {
      tokens[i] = `[PAD${i}]`
      types[i] = 5 // UNUSED
    }
  const merges = model.merges.map((m) => (Array.isArray(m) ? m.join(" ") : m))

  const kv = []
  const u32 = (key, v) => kv.push([key, GGUF.UINT32, (b) => b.u32(v)])
  const f32 = (key, v) => kv.push([key, GGUF.FLOAT32, (b) => b.f32(v)])
  const str = (key, v) => kv.push([key, GGUF.STRING, (b) => b.str(v)])
  const bool = (key, v) => kv.push([key, GGUF.BOOL, (b) => b.push(Buffer.from([v ? 1 : 0]))])
  const arr = (key, elem, values, write) =>
    kv.push([
      key,
      GGUF.ARRAY,
      (b) => {
        b.u32(elem)
        b.u64(values.length)
        for (const v of values) write(b, v)
      },
    ])
  str("general.architecture", "llama")
  str("general.name", args.name ?? "offramp-peer")
  u32("general.alignment", ALIGN)
  u32("general.file_type", FILE_TYPE[type])
  u32("llama.context_length", c.context)
  u32("llama.embedding_length", c.dim)
  u32("llama.block_count", c.layers)
  u32("llama.feed_forward_length", c.ffn)
  u32("llama.rope.dimension_count", c.headDim)
  u32("llama.attention.head_count", c.heads)
  u32("llama.attention.head_count_kv", c.kvHeads)
  u32("llama.attention.key_length", c.headDim)
  u32("llama.attention.value_length", c.headDim)
  f32("llama.attention.layer_norm_rms_epsilon", c.eps)
  f32("llama.rope.freq_base", c.theta)
  u32("llama.vocab_size", c.vocab)
  str("tokenizer.ggml.model", "gpt2")
  str("tokenizer.ggml.pre", "gpt-2")
  arr("tokenizer.ggml.tokens", GGUF.STRING, tokens, (b, v) => b.str(v))
  arr(
    "tokenizer.ggml.scores",
    GGUF.FLOAT32,
    tokens.map(() => 0),
    (b, v) => b.f32(v),
  )
  arr("tokenizer.ggml.token_type", GGUF.INT32, types, (b, v) => b.i32(v))
  arr("tokenizer.ggml.merges", GGUF.STRING, merges, (b, v) => b.str(v))
  u32("tokenizer.ggml.bos_token_id", c.bos)
  u32("tokenizer.ggml.eos_token_id", c.eos)
  bool("tokenizer.ggml.add_bos_token", tokenizerConfig.add_bos_token ?? true)
  bool("tokenizer.ggml.add_eos_token", false)

  // Encode tensor data first to know the sizes, then the infos with aligned offsets.
  const pad = (n) => (ALIGN - (n % ALIGN)) % ALIGN
  let offset = 0
  for (const x of list) {
    let ggml = GGML.F32
    if (x.quantizable && type === "f16") ggml = GGML.F16
    if (x.quantizable && type === "q8_0") ggml = GGML.Q8_0
    if (x.quantizable && type === "q4_0") ggml = GGML.Q4_0
    if ((ggml === GGML.Q8_0 || ggml === GGML.Q4_0) && x.ne[0] % 32)
      throw new Error(`${x.name}: row length ${x.ne[0]} is not a multiple of the block size 32`)
    x.ggml = ggml
    x.bytes =
      ggml === GGML.F32
        ? Buffer.from(x.data.buffer, x.data.byteOffset, x.data.byteLength)
        : ggml === GGML.F16
          ? Buffer.from(toF16Array(x.data).buffer)
          : ggml === GGML.Q8_0
            ? quantizeQ8_0(x.data)
            : quantizeQ4_0(x.data)
    x.offset = offset
    offset += x.bytes.length + pad(x.bytes.length)
  }

  const head = new Bytes()
  head.push(Buffer.from("GGUF", "ascii"))
  head.u32(3)
  head.u64(list.length)
  head.u64(kv.length)
  for (const [key, vt, write] of kv) {
    head.str(key)
    head.u32(vt)
    write(head)
  }
  for (const x of list) {
    head.str(x.name)
    head.u32(x.ne.length)
    for (const d of x.ne) head.u64(d)
    head.u32(x.ggml)
    head.u64(x.offset)
  }
  const fd = openSync(args.out, "w")
  const header = head.concat()
  writeSync(fd, header)
  writeSync(fd, Buffer.alloc(pad(header.length)))
  for (const x of list) {
    writeSync(fd, x.bytes)
    writeSync(fd, Buffer.alloc(pad(x.bytes.length)))
  }
  closeSync(fd)
  console.log(
    JSON.stringify({ out: args.out, type, tensors: list.length, bytes: header.length + pad(header.length) + offset }),
  )
}

// Run as a script; importable for its quantizers.
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) main()
