/**
 * Tiny random Hugging Face Llama checkpoints for tests: config.json + safetensors (single or sharded, F32/F16/BF16),
 * optional dedicated exit heads. Returns the weights exactly as stored (after F16/BF16 rounding), so a reference
 * forward pass can run on the same numbers the converter reads.
 */
import { mkdir, writeFile } from "node:fs/promises"
import { join } from "node:path"
import { float16ToFloat32Array, float32ToBfloat16Array, float32ToFloat16Array } from "../../src/Float16.js"
import { encodeSafetensors, type TensorToWrite } from "../../src/Safetensors.js"

export interface TinyLlamaOptions {
  readonly dim?: number
  readonly hiddenDim?: number
  readonly layers?: number
  readonly heads?: number
  readonly kvHeads?: number
  readonly vocab?: number
  readonly contextLength?: number
  readonly tied?: boolean
  readonly dtype?: "F32" | "F16" | "BF16"
  /** Split the tensors over this many shards with a model.safetensors.index.json. */
  readonly shards?: number
  /** Layers (1..layers-1) with dedicated exit heads. */
  readonly exitHeads?: ReadonlyArray<number>
  readonly seed?: number
  /** Merged into config.json last (to break it on purpose). */
  readonly config?: Readonly<Record<string, unknown>>
  /** Tensors left out of the checkpoint. */
  readonly omit?: ReadonlyArray<string>
  /** Tensors stored with another shape (their values are random). */
  readonly reshape?: Readonly<Record<string, ReadonlyArray<number>>>
  /** A tokenizer.json document to write next to the weights. */
  readonly tokenizer?: unknown
  readonly tokenizerConfig?: unknown
}

export interface TinyLlama {
  readonly dir: string
  readonly config: {
    readonly dim: number
    readonly hiddenDim: number
    readonly layers: number
    readonly heads: number
    readonly kvHeads: number
    readonly vocab: number
    readonly contextLength: number
    readonly normEps: number
    readonly ropeTheta: number
  }
  /** Every tensor as stored, in float32. */
  readonly tensors: ReadonlyMap<string, Float32Array>
}

/** mulberry32: a small deterministic PRNG. */
const random = (seed: number) => {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

const roundTo = (values: Float32Array, dtype: "F32" | "F16" | "BF16"): { stored: Float32Array; bits?: Uint16Array } => {
  if (dtype === "F32") return { stored: values }
  if (dtype === "F16") {
    const bits = float32ToFloat16Array(values)
    return { stored: float16ToFloat32Array(bits), bits }
  }
  const bits = float32ToBfloat16Array(values)
  const stored = new Float32Array(values.length)
  const out = new Uint32Array(stored.buffer)
  for (let i = 0; i < bits.length; i++) out[i] = bits[i]! << 16
  return { stored, bits }
}

export const writeTinyLlama = async (dir: string, options: TinyLlamaOptions = {}): Promise<TinyLlama> => {
  const dim = options.dim ?? 32
  const hiddenDim = options.hiddenDim ?? 64
  const layers = options.layers ?? 3
  const heads = options.heads ?? 4
  const kvHeads = options.kvHeads ?? 2
  const vocab = options.vocab ?? 512
  const contextLength = options.contextLength ?? 64
  const tied = options.tied ?? false
  const dtype = options.dtype ?? "F32"
  const headDim = dim / heads
  const next = random(options.seed ?? 1)
  const uniform = (n: number, scale: number, offset = 0) =>
    Float32Array.from({ length: n }, () => offset + (2 * next() - 1) * scale)
  // Scales keep activations O(1) and logits spread out, so top-1 comparisons are meaningful.
  const matrix = (rows: number, cols: number) => uniform(rows * cols, Math.sqrt(3 / cols))
  const norm = () => uniform(dim, 0.2, 1)
  const specs: Array<[string, Float32Array, ReadonlyArray<number>]> = [
    ["model.embed_tokens.weight", uniform(vocab * dim, 1), [vocab, dim]],
  ]
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}`
    specs.push(
      [`${p}.input_layernorm.weight`, norm(), [dim]],
      [`${p}.self_attn.q_proj.weight`, matrix(heads * headDim, dim), [heads * headDim, dim]],
      [`${p}.self_attn.k_proj.weight`, matrix(kvHeads * headDim, dim), [kvHeads * headDim, dim]],
      [`${p}.self_attn.v_proj.weight`, matrix(kvHeads * headDim, dim), [kvHeads * headDim, dim]],
      [`${p}.self_attn.o_proj.weight`, matrix(dim, heads * headDim), [dim, heads * headDim]],
      [`${p}.post_attention_layernorm.weight`, norm(), [dim]],
      [`${p}.mlp.gate_proj.weight`, matrix(hiddenDim, dim), [hiddenDim, dim]],
      [`${p}.mlp.up_proj.weight`, matrix(hiddenDim, dim), [hiddenDim, dim]],
      [`${p}.mlp.down_proj.weight`, matrix(dim, hiddenDim), [dim, hiddenDim]],
    )
  }
  specs.push(["model.norm.weight", norm(), [dim]])
  const lmHead = () => uniform(vocab * dim, 3 * Math.sqrt(3 / dim))
  if (!tied) specs.push(["lm_head.weight", lmHead(), [vocab, dim]])
  for (const layer of options.exitHeads ?? []) {
    specs.push([`exit_heads.${layer}.norm.weight`, norm(), [dim]])
    specs.push([`exit_heads.${layer}.lm_head.weight`, lmHead(), [vocab, dim]])
  }

  const tensors = new Map<string, Float32Array>()
  const toWrite: Array<[string, TensorToWrite]> = []
  for (const [name, values, shape] of specs) {
    if (options.omit?.includes(name)) continue
    const reshaped = options.reshape?.[name]
    const v = reshaped
      ? uniform(
          reshaped.reduce((a, b) => a * b, 1),
          0.1,
        )
      : values
    const { stored, bits } = roundTo(v, dtype)
    tensors.set(name, stored)
    toWrite.push([name, { dtype, shape: reshaped ?? shape, data: bits ?? stored }])
  }

  await mkdir(dir, { recursive: true })
  const shards = options.shards ?? 1
  if (shards <= 1) {
    await writeFile(join(dir, "model.safetensors"), encodeSafetensors(Object.fromEntries(toWrite)))
  } else {
    const weightMap: Record<string, string> = {}
    for (let s = 0; s < shards; s++) {
      const file = `model-${String(s + 1).padStart(5, "0")}-of-${String(shards).padStart(5, "0")}.safetensors`
      const part = toWrite.filter((_, i) => i % shards === s)
      for (const [name] of part) weightMap[name] = file
      await writeFile(join(dir, file), encodeSafetensors(Object.fromEntries(part), { format: "pt" }))
    }
    const index = { metadata: { total_size: 0 }, weight_map: weightMap }
    await writeFile(join(dir, "model.safetensors.index.json"), JSON.stringify(index, null, 2))
  }
  const config = {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    hidden_size: dim,
    intermediate_size: hiddenDim,
    num_hidden_layers: layers,
    num_attention_heads: heads,
    num_key_value_heads: kvHeads,
    vocab_size: vocab,
    max_position_embeddings: contextLength,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    hidden_act: "silu",
    tie_word_embeddings: tied,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: dtype === "F32" ? "float32" : dtype === "F16" ? "float16" : "bfloat16",
    ...options.config,
  }
  await writeFile(join(dir, "config.json"), JSON.stringify(config, null, 2))
  if (options.tokenizer !== undefined) await writeFile(join(dir, "tokenizer.json"), JSON.stringify(options.tokenizer))
  if (options.tokenizerConfig !== undefined) {
    await writeFile(join(dir, "tokenizer_config.json"), JSON.stringify(options.tokenizerConfig))
  }
  return {
    dir,
    config: { dim, hiddenDim, layers, heads, kvHeads, vocab, contextLength, normEps: 1e-5, ropeTheta: 10000 },
    tensors,
  }
}
