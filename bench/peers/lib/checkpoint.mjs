// Reads a Hugging Face Llama checkpoint (config.json + one model.safetensors) into float32 tensors.
import { existsSync, readFileSync } from "node:fs"
import { join } from "node:path"

const f16ToF32 = (h) => {
  const s = (h & 0x8000) >> 15
  const e = (h & 0x7c00) >> 10
  const f = h & 0x03ff
  if (e === 0) return (s ? -1 : 1) * 2 ** -14 * (f / 1024)
  if (e === 31) return f ? Number.NaN : (s ? -1 : 1) * Number.POSITIVE_INFINITY
  return (s ? -1 : 1) * 2 ** (e - 15) * (1 + f / 1024)
}

/** float32 → float16 bits, round to nearest even (as numpy / torch / ggml_fp32_to_fp16). */
const f32 = new Float32Array(1)
const u32 = new Uint32Array(f32.buffer)
export const f32ToF16 = (value) => {
  f32[0] = value
  const x = u32[0]
  const sign = (x >>> 16) & 0x8000
  let exp = (x >>> 23) & 0xff
  let mant = x & 0x7fffff
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0)
  exp = exp - 127 + 15
  if (exp >= 31) return sign | 0x7c00
  if (exp <= 0) {
    if (exp < -10) return sign
    mant |= 0x800000
    const shift = 14 - exp
    let half = mant >>> shift
    const rem = mant & ((1 << shift) - 1)
    const mid = 1 << (shift - 1)
    if (rem > mid || (rem === mid && half & 1)) half++
    return sign | half
  }
  let half = (exp << 10) | (mant >>> 13)
  const rem = mant & 0x1fff
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++
  return sign | half
}

export const toF16Array = (data) => {
  const out = new Uint16Array(data.length)
  for (let i = 0; i < data.length; i++) out[i] = f32ToF16(data[i])
  return out
}

export const fromF16 = f16ToF32

export const readSafetensors = (file) => {
  const buf = readFileSync(file)
  const n = Number(buf.readBigUInt64LE(0))
  const header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8"))
  const base = 8 + n
  const tensors = new Map()
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") continue
    const [start, end] = info.data_offsets
    const raw = buf.subarray(base + start, base + end)
    const count = info.shape.reduce((a, b) => a * b, 1)
    const out = new Float32Array(count)
    if (info.dtype === "F32") {
      out.set(new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength)))
    } else if (info.dtype === "F16") {
      for (let i = 0; i < count; i++) out[i] = f16ToF32(raw.readUInt16LE(2 * i))
    } else if (info.dtype === "BF16") {
      const u = new Uint32Array(out.buffer)
      for (let i = 0; i < count; i++) u[i] = raw.readUInt16LE(2 * i) << 16
    } else throw new Error(`${name}: dtype ${info.dtype} not supported`)
    tensors.set(name, { shape: info.shape, data: out })
  }
  return tensors
}

/** The config fields the converters need, with transformers' LlamaConfig defaults. */
export const readCheckpoint = (dir, tokenizerPath) => {
  const hf = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"))
  const heads = hf.num_attention_heads
  const config = {
    hf,
    dim: hf.hidden_size,
    ffn: hf.intermediate_size,
    layers: hf.num_hidden_layers,
    heads,
    kvHeads: hf.num_key_value_heads ?? heads,
    headDim: hf.head_dim ?? hf.hidden_size / heads,
    vocab: hf.vocab_size,
    context: hf.max_position_embeddings ?? 2048,
    eps: hf.rms_norm_eps ?? 1e-6,
    theta: hf.rope_theta ?? 10000,
    tied: hf.tie_word_embeddings ?? false,
    bos: hf.bos_token_id ?? 1,
    eos: Array.isArray(hf.eos_token_id) ? hf.eos_token_id[0] : (hf.eos_token_id ?? 2),
  }
  if (hf.rope_scaling) throw new Error("rope_scaling is not supported by these converters")
  const tokPath = tokenizerPath ?? join(dir, "tokenizer.json")
  if (!existsSync(tokPath)) throw new Error(`no tokenizer at ${tokPath} (pass --tokenizer)`)
  const tokenizer = JSON.parse(readFileSync(tokPath, "utf8"))
  const tokenizerConfigPath = join(dir, "tokenizer_config.json")
  const tokenizerConfig = existsSync(tokenizerConfigPath) ? JSON.parse(readFileSync(tokenizerConfigPath, "utf8")) : {}
  const tensors = readSafetensors(join(dir, "model.safetensors"))
  return { config, tensors, tokenizer, tokenizerPath: tokPath, tokenizerConfig }
}

export const argv = (args) => {
  const out = {}
  for (let i = 0; i < args.length; i++) {
    const a = args[i]
    if (!a.startsWith("--")) continue
    const next = args[i + 1]
    if (next === undefined || next.startsWith("--")) out[a.slice(2)] = true
    else {
      out[a.slice(2)] = next
      i++
    }
  }
  return out
}
