/**
 * Builds the staged ONNX graphs (embed, segments, heads, kvfill) of a Llama-family model from its weights.
 * Attention uses standard ops only (Gather by block table, MatMul, Softmax): the CPU contrib attention ops
 * refuse batched prefill with a past (DESIGN.md).
 */
import { GraphNames as N } from "@offramp/core/GraphNames"
import { float32ToFloat16Array } from "./Float16.js"
import { float, GraphBuilder } from "./GraphBuilder.js"
import type { ExitHeadWeights, LlamaConfig, LlamaLayerWeights, LlamaWeights } from "./LlamaWeights.js"
import { transpose } from "./LlamaWeights.js"
import { quantizeBlocks } from "./Quantize.js"
import { FP32, type WeightFormat } from "./WeightFormat.js"

/** Concatenates row-major [out_i, in] matrices along `out` (one MatMul instead of several). */
const stack = (mats: ReadonlyArray<Float32Array>): Float32Array => {
  const stacked = new Float32Array(mats.reduce((n, m) => n + m.length, 0))
  let offset = 0
  for (const m of mats) {
    stacked.set(m, offset)
    offset += m.length
  }
  return stacked
}

/** A float32 value stored as float16 when the format says so, cast back to float32 for compute. */
const floatParam = (
  g: GraphBuilder,
  fmt: WeightFormat,
  name: string,
  data: Float32Array,
  dims: ReadonlyArray<number>,
) =>
  fmt.float === "float16"
    ? g.node("Cast", [g.initializer(name, "float16", float32ToFloat16Array(data), dims)], { to: 1 }, `${name}_f32`)
    : g.weight(name, data, dims)

/**
 * x [..., inDim] times the row-major [outDim, inDim] matrix `w` transposed: a MatMul over float32 or float16
 * weights (onnxruntime folds the Cast of an initializer at load), or MatMulNBits over block-quantized ones.
 */
const linear = (
  g: GraphBuilder,
  fmt: WeightFormat,
  x: string,
  w: Float32Array,
  outDim: number,
  inDim: number,
  name: string,
): string => {
  const q = fmt.quantization
  if (q === undefined)
    return g.node("MatMul", [x, floatParam(g, fmt, name, transpose(w, outDim, inDim), [inDim, outDim])])
  const packed = quantizeBlocks(w, outDim, inDim, q)
  const inputs = [
    x,
    g.initializer(`${name}_q${q.bits}`, "uint8", packed.data, [outDim, packed.blocks, (q.blockSize * q.bits) / 8]),
    g.weight(`${name}_scales`, packed.scales, [outDim * packed.blocks]),
  ]
  if (packed.zeroPoints) {
    inputs.push(g.initializer(`${name}_zero_points`, "uint8", packed.zeroPoints, [packed.zeroPoints.length]))
  }
  return g.contrib("MatMulNBits", inputs, {
    K: inDim,
    N: outDim,
    bits: q.bits,
    block_size: q.blockSize,
    ...(q.accuracyLevel !== undefined ? { accuracy_level: q.accuracyLevel } : {}),
  })
}

/** RMSNorm as onnxruntime's fused SimplifiedLayerNormalization (one kernel instead of six elementwise nodes). */
const rmsNorm = (g: GraphBuilder, x: string, weight: Float32Array, eps: number, name: string): string =>
  g.node("SimplifiedLayerNormalization", [x, g.weight(name, weight, [weight.length])], {
    axis: -1,
    epsilon: float(eps),
  })

/** RoPE tables [contextLength, headDim/2] for onnxruntime's RotaryEmbedding, shared by every layer of a graph. */
interface Rope {
  readonly cos: string
  readonly sin: string
}

const ropeTables = (g: GraphBuilder, c: LlamaConfig, invFreq: Float32Array): Rope => {
  const half = invFreq.length
  const cos = new Float32Array(c.contextLength * half)
  const sin = new Float32Array(c.contextLength * half)
  for (let p = 0; p < c.contextLength; p++) {
    for (let i = 0; i < half; i++) {
      const angle = Math.fround(p * invFreq[i]!)
      cos[p * half + i] = Math.cos(angle)
      sin[p * half + i] = Math.sin(angle)
    }
  }
  return {
    cos: g.weight("rope_cos", cos, [c.contextLength, half]),
    sin: g.weight("rope_sin", sin, [c.contextLength, half]),
  }
}

/** Rotate-half RoPE on x [R, T, heads × headDim] at N.positions. */
const applyRope = (g: GraphBuilder, x: string, rope: Rope, heads: number): string =>
  g.contrib("RotaryEmbedding", [x, N.positions, rope.cos, rope.sin], { interleaved: 0, num_heads: heads })

/** Pre-attention norm, fused K/V projection and RoPE of K of one layer, as in its segment. */
const keyValue = (
  g: GraphBuilder,
  fmt: WeightFormat,
  c: LlamaConfig,
  layer: number,
  w: LlamaLayerWeights,
  x: string,
  rope: Rope,
) => {
  const h = rmsNorm(g, x, w.attnNorm, c.normEps, `l${layer}_attn_norm`)
  const kvDim = c.kvHeads * c.headDim
  const kv = linear(g, fmt, h, stack([w.wk, w.wv]), 2 * kvDim, c.dim, `l${layer}_wkv`)
  const [k, v] = g.nodeN("Split", [kv, g.ints([kvDim, kvDim])], 2, { axis: -1 })
  const heads = g.ints([0, 0, c.kvHeads, c.headDim])
  return { k: g.node("Reshape", [applyRope(g, k!, rope, c.kvHeads), heads]), v: g.node("Reshape", [v!, heads]) }
}

const attentionAndMlp = (
  g: GraphBuilder,
  fmt: WeightFormat,
  c: LlamaConfig,
  layer: number,
  w: LlamaLayerWeights,
  x: string,
  rope: Rope,
  mask5: string,
): string => {
  const { headDim: hd, kvHeads, heads } = c
  const group = heads / kvHeads
  const h = rmsNorm(g, x, w.attnNorm, c.normEps, `l${layer}_attn_norm`)
  const qDim = heads * hd
  const kvDim = kvHeads * hd
  const qkv = linear(g, fmt, h, stack([w.wq, w.wk, w.wv]), qDim + 2 * kvDim, c.dim, `l${layer}_wqkv`)
  const [qFlat, kFlat, vFlat] = g.nodeN("Split", [qkv, g.ints([qDim, kvDim, kvDim])], 3, { axis: -1 })
  const q = g.node("Reshape", [applyRope(g, qFlat!, rope, heads), g.ints([0, 0, heads, hd])])
  const k = g.node("Reshape", [applyRope(g, kFlat!, rope, kvHeads), g.ints([0, 0, kvHeads, hd])])
  const v = g.node("Reshape", [vFlat!, g.ints([0, 0, kvHeads, hd])])
  g.output(N.kNew(layer), k, "float32", ["R", "T", kvHeads, hd])
  g.output(N.vNew(layer), v, "float32", ["R", "T", kvHeads, hd])

  // Keys and values: the row's cached blocks (gathered by block table), then the new rows.
  const gathered = (pool: string) =>
    g.node("Reshape", [g.node("Gather", [pool, N.blockTable], { axis: 0 }), g.ints([0, -1, kvHeads, hd])])
  const keys = g.node("Concat", [gathered(N.kPool(layer)), k], { axis: 1 }) // [R, S, kv, hd]
  const values = g.node("Concat", [gathered(N.vPool(layer)), v], { axis: 1 })
  const keysT = g.node("Unsqueeze", [g.node("Transpose", [keys], { perm: [0, 2, 3, 1] }), g.ints([2])]) // [R,kv,1,hd,S]
  const valuesT = g.node("Unsqueeze", [g.node("Transpose", [values], { perm: [0, 2, 1, 3] }), g.ints([2])]) // [R,kv,1,S,hd]

  // Queries grouped by the KV head they share: [R, kv, group, T, hd].
  const qScaled = g.node("Mul", [q, g.scalar(1 / Math.sqrt(hd))])
  const qGrouped = g.node("Transpose", [g.node("Reshape", [qScaled, g.ints([0, 0, kvHeads, group, hd])])], {
    perm: [0, 2, 3, 1, 4],
  })
  const scores = g.node("Add", [g.node("MatMul", [qGrouped, keysT]), mask5])
  const context = g.node("MatMul", [g.node("Softmax", [scores], { axis: -1 }), valuesT]) // [R,kv,group,T,hd]
  const merged = g.node("Reshape", [g.node("Transpose", [context], { perm: [0, 3, 1, 2, 4] }), g.ints([0, 0, qDim])])
  const attnOut = linear(g, fmt, merged, w.wo, c.dim, qDim, `l${layer}_wo`)
  const x1 = g.node("Add", [x, attnOut])

  const h2 = rmsNorm(g, x1, w.ffnNorm, c.normEps, `l${layer}_ffn_norm`)
  const f = c.hiddenDim
  const gateUp = linear(g, fmt, h2, stack([w.gate, w.up]), 2 * f, c.dim, `l${layer}_w13`)
  const [gate, up] = g.nodeN("Split", [gateUp, g.ints([f, f])], 2, { axis: -1 })
  const silu = g.node("Mul", [gate!, g.node("Sigmoid", [gate!])])
  const down = linear(g, fmt, g.node("Mul", [silu, up!]), w.down, c.dim, f, `l${layer}_w2`)
  return g.node("Add", [x1, down])
}

export const buildEmbedGraph = (w: LlamaWeights, fmt: WeightFormat = FP32): Uint8Array => {
  const c = w.config
  const g = new GraphBuilder("embed")
  g.input(N.ids, "int64", ["R", "T"])
  // A float16 table is gathered first and the rows cast after, so it stays half-size in memory too.
  const half = fmt.float === "float16"
  const table = half
    ? g.initializer("embedding", "float16", float32ToFloat16Array(w.embedding), [c.vocab, c.dim])
    : g.weight("embedding", w.embedding, [c.vocab, c.dim])
  const rows = g.node("Gather", [table, N.ids], { axis: 0 })
  g.output(N.hidden, half ? g.node("Cast", [rows], { to: 1 }) : rows, "float32", ["R", "T", c.dim])
  return g.encode()
}

/** Layers [first, end) with paged attention; see GraphNames for the I/O contract. */
export const buildSegmentGraph = (
  w: LlamaWeights,
  first: number,
  end: number,
  fmt: WeightFormat = FP32,
): Uint8Array => {
  const c = w.config
  const g = new GraphBuilder(`segment_${first}_${end}`)
  let x = g.input(N.hidden, "float32", ["R", "T", c.dim])
  g.input(N.positions, "int64", ["R", "T"])
  g.input(N.blockTable, "int64", ["R", "MB"])
  g.input(N.attnMask, "float32", ["R", "T", "S"])
  for (let l = first; l < end; l++) {
    g.input(N.kPool(l), "float32", ["blocks", "block_size", c.kvHeads, c.headDim])
    g.input(N.vPool(l), "float32", ["blocks", "block_size", c.kvHeads, c.headDim])
  }
  const rope = ropeTables(g, c, w.invFreq)
  const mask5 = g.node("Unsqueeze", [N.attnMask, g.ints([1, 2])]) // [R,1,1,T,S]
  for (let l = first; l < end; l++) x = attentionAndMlp(g, fmt, c, l, w.layers[l]!, x, rope, mask5)
  g.output(N.hiddenOut, x, "float32", ["R", "T", c.dim])
  return g.encode()
}

/** What a masked logit is: exp underflows to 0, and 0 · log-softmax stays 0 (with −∞ the entropy would be NaN). */
const MASKED_LOGIT = -1e9

/**
 * Norm + LM head with the confidence statistics computed in-graph, so only small results leave ONNX. With `tokens`
 * below the vocabulary (a tokenizer smaller than the checkpoint's padded vocabulary), the ids from `tokens` on are
 * masked out of the logits: no head ever prefers or samples an id the tokenizer cannot decode.
 */
export const buildHeadGraph = (
  c: LlamaConfig,
  head: ExitHeadWeights,
  fmt: WeightFormat = FP32,
  tokens: number = c.vocab,
): Uint8Array => {
  const g = new GraphBuilder("head")
  g.input(N.hidden, "float32", ["N", c.dim])
  const h = rmsNorm(g, N.hidden, head.norm, c.normEps, "head_norm")
  const raw = linear(g, fmt, h, head.lmHead, c.vocab, c.dim, "lm_head")
  const logits =
    tokens < c.vocab
      ? g.node("Add", [
          raw,
          g.weight(
            "vocab_mask",
            Float32Array.from({ length: c.vocab }, (_, v) => (v < tokens ? 0 : MASKED_LOGIT)),
            [c.vocab],
          ),
        ])
      : raw
  const probs = g.node("Softmax", [logits], { axis: -1 })
  const [top, topIds] = g.nodeN("TopK", [probs, g.ints([2])], 2, { axis: -1 })
  const [first, second] = g.nodeN("Split", [top!, g.ints([1, 1])], 2, { axis: -1 })
  const squeeze = (t: string) => g.node("Squeeze", [t, g.ints([-1])])
  const [topId] = g.nodeN("Split", [topIds!, g.ints([1, 1])], 2, { axis: -1 })
  const plogp = g.node("Mul", [probs, g.node("LogSoftmax", [logits], { axis: -1 })])
  const entropy = g.node("Neg", [g.node("ReduceSum", [plogp, g.ints([-1])], { keepdims: 0 })])
  g.output(N.logits, logits, "float32", ["N", c.vocab])
  g.output(N.maxProb, squeeze(first!), "float32", ["N"])
  g.output(N.margin, squeeze(g.node("Sub", [first!, second!])), "float32", ["N"])
  g.output(N.entropy, entropy, "float32", ["N"])
  g.output(N.topToken, squeeze(topId!), "int64", ["N"])
  return g.encode()
}

/**
 * K/V rows of every layer from `from` on, computed from an exit's hidden state (CALM's state propagation).
 * At small batch a graph costs per node, not per multiply-add, so with float weights the layers share nodes:
 * RMSNorm_l(h)·W = (h / rms(h))·diag(g_l)·W, so one unweighted norm feeds one MatMul over every layer's K and V
 * projections with the norm weights folded into the weight rows, laid out [K of each layer, V of each layer];
 * one RotaryEmbedding rotates all K heads (positions are shared), and one Split each cuts the per-layer outputs.
 */
export const buildKvFillGraph = (w: LlamaWeights, from: number, fmt: WeightFormat = FP32): Uint8Array => {
  const c = w.config
  const g = new GraphBuilder(`kvfill_${from}`)
  g.input(N.hidden, "float32", ["R", "T", c.dim])
  g.input(N.positions, "int64", ["R", "T"])
  const rope = ropeTables(g, c, w.invFreq)
  const output = (layer: number, k: string, v: string) => {
    g.output(N.kNew(layer), k, "float32", ["R", "T", c.kvHeads, c.headDim])
    g.output(N.vNew(layer), v, "float32", ["R", "T", c.kvHeads, c.headDim])
  }
  if (fmt.quantization !== undefined) {
    // Quantized blocks cannot take the fold: folded before quantizing, a norm weight's outlier channels widen every
    // block they fall in (measured: about twice the K/V error). Without it the layers cannot share a MatMulNBits,
    // and sharing only the RoPE and Splits measured no faster, so each layer keeps the path of its segment.
    for (let l = from; l < c.layers; l++) {
      const { k, v } = keyValue(g, fmt, c, l, w.layers[l]!, N.hidden, rope)
      output(l, k, v)
    }
    return g.encode()
  }
  const layers = w.layers.slice(from)
  const kvDim = c.kvHeads * c.headDim
  const mats = [...layers.map((l) => l.wk), ...layers.map((l) => l.wv)]
  const outDim = mats.length * kvDim
  // The fold is in-graph, after the Cast of float16 weights, so the products are those of the stored weights, as in
  // the segments; onnxruntime folds these constant nodes into one initializer at load.
  const stored = floatParam(g, fmt, "wkv", transpose(stack(mats), outDim, c.dim), [c.dim, outDim])
  const norms = transpose(stack(layers.map((l) => l.attnNorm)), layers.length, c.dim)
  const perMatrix = g.node("Reshape", [stored, g.ints([c.dim, 2, layers.length, kvDim])]) // [D, K|V, layer, kvDim]
  const scaled = g.node("Mul", [perMatrix, g.weight("wkv_norms", norms, [c.dim, 1, layers.length, 1])])
  const folded = g.node("Reshape", [scaled, g.ints([c.dim, outDim])])
  const n = rmsNorm(g, N.hidden, new Float32Array(c.dim).fill(1), c.normEps, "kv_norm")
  const [k, v] = g.nodeN("Split", [g.node("MatMul", [n, folded]), g.ints([outDim / 2, outDim / 2])], 2, { axis: -1 })
  // Layer i's heads are heads i·kvHeads .. (i+1)·kvHeads - 1 of the stacked K (or V).
  const heads = layers.length * c.kvHeads
  const perLayer = (x: string) =>
    g.nodeN(
      "Split",
      [g.node("Reshape", [x, g.ints([0, 0, heads, c.headDim])]), g.ints(layers.map(() => c.kvHeads))],
      layers.length,
      { axis: 2 },
    )
  const ks = perLayer(applyRope(g, k!, rope, heads))
  const vs = perLayer(v!)
  layers.forEach((_, i) => output(from + i, ks[i]!, vs[i]!))
  return g.encode()
}
