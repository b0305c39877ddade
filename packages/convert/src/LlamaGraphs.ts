/**
 * Builds the staged ONNX graphs (embed, segments, heads, kvfill) of a Llama-family model from its weights.
 * Attention uses standard ops over a paged cache (Gather by block table, FusedMatMul, Softmax, MatMul): the CPU contrib
 * attention ops refuse batched prefill with a past (DESIGN.md).
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

/** Pre-attention norm, fused K/V projection and RoPE of K of one layer, as in its segment: [R, T, kvHeads·headDim]. */
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
  return { k: applyRope(g, k!, rope, c.kvHeads), v: v! }
}

/** RMSNorm of `x + residual` and the sum itself, in one kernel: [normalized, sum]. */
const addNorm = (g: GraphBuilder, x: string, residual: string, weight: Float32Array, eps: number, name: string) => {
  const [normalized, , , sum] = g.contribN(
    "SkipSimplifiedLayerNormalization",
    [x, residual, g.weight(name, weight, [weight.length])],
    [true, false, false, true],
    { epsilon: float(eps) },
  )
  return { normalized: normalized!, sum: sum! }
}

/**
 * Attention of one layer over the paged cache, from its normalized input `h` [R, T, D]; returns the output
 * projection [R, T, D]. The pools are head-major, [kvHeads, blocks, blockSize, headDim]: gathered by block table they
 * come out as [kvHeads, R, MB·blockSize, headDim], the layout the products want, so only the T new rows are
 * transposed. A gather copies whole blocks (blockSize·headDim floats), not rows. The new K and V rows,
 * [R, T, kvHeads·headDim] each, go to `newRows`.
 */
const attention = (
  g: GraphBuilder,
  fmt: WeightFormat,
  c: LlamaConfig,
  layer: number,
  w: LlamaLayerWeights,
  h: string,
  rope: Rope,
  mask5: string,
  newRows: { readonly k: Array<string>; readonly v: Array<string> },
): string => {
  const { headDim: hd, kvHeads, heads } = c
  const group = heads / kvHeads
  const qDim = heads * hd
  const kvDim = kvHeads * hd
  const qkv = linear(g, fmt, h, stack([w.wq, w.wk, w.wv]), qDim + 2 * kvDim, c.dim, `l${layer}_wqkv`)
  const [qFlat, kFlat, v] = g.nodeN("Split", [qkv, g.ints([qDim, kvDim, kvDim])], 3, { axis: -1 })
  const k = applyRope(g, kFlat!, rope, kvHeads)

  // Queries grouped by the KV head they share: [kv, R, group, T, hd] (query head = kv head · group + g).
  const q = g.node(
    "Transpose",
    [g.node("Reshape", [applyRope(g, qFlat!, rope, heads), g.ints([0, 0, kvHeads, group, hd])])],
    {
      perm: [2, 0, 3, 1, 4],
    },
  )
  // Keys and values: the cached blocks, then the new rows; [kv, R, 1, S, hd] (the 1 broadcasts over the group).
  const cacheAndNew = (pool: string, fresh: string) => {
    const blocks = g.node("Gather", [pool, N.blockTable], { axis: 1 }) // [kv, R, MB, bs, hd]
    const cached = g.node("Reshape", [blocks, g.ints([0, 0, 1, -1, hd])]) // [kv, R, 1, MB·bs, hd]
    const perHead = g.node("Reshape", [fresh, g.ints([0, 0, 1, kvHeads, hd])]) // [R, T, 1, kv, hd]
    const added = g.node("Transpose", [perHead], { perm: [3, 0, 2, 1, 4] }) // [kv, R, 1, T, hd]
    return g.node("Concat", [cached, added], { axis: 3 })
  }
  newRows.k.push(k)
  newRows.v.push(v!)
  const keys = cacheAndNew(N.kPool(layer), k)
  const values = cacheAndNew(N.vPool(layer), v!)
  const scores = g.node("Add", [
    g.contrib("FusedMatMul", [q, keys], { transA: 0, transB: 1, alpha: float(1 / Math.sqrt(hd)) }),
    mask5,
  ])
  const context = g.node("MatMul", [g.node("Softmax", [scores], { axis: -1 }), values]) // [kv, R, group, T, hd]
  const merged = g.node("Reshape", [g.node("Transpose", [context], { perm: [1, 3, 0, 2, 4] }), g.ints([0, 0, qDim])])
  return linear(g, fmt, merged, w.wo, c.dim, qDim, `l${layer}_wo`)
}

/** The MLP of one layer from its normalized input: down(silu(gate(h)) · up(h)), gate and up in one product. */
const mlp = (g: GraphBuilder, fmt: WeightFormat, c: LlamaConfig, layer: number, w: LlamaLayerWeights, h: string) => {
  const f = c.hiddenDim
  const gateUp = linear(g, fmt, h, stack([w.gate, w.up]), 2 * f, c.dim, `l${layer}_w13`)
  const [gate, up] = g.nodeN("Split", [gateUp, g.ints([f, f])], 2, { axis: -1 })
  const silu = g.node("Mul", [gate!, g.node("Sigmoid", [gate!])])
  return linear(g, fmt, g.node("Mul", [silu, up!]), w.down, c.dim, f, `l${layer}_w2`)
}

export const buildEmbedGraph = (w: LlamaWeights, fmt: WeightFormat = FP32): Uint8Array => {
  const c = w.config
  const g = new GraphBuilder("embed")
  g.input(N.ids, "int64", ["R", "T"])
  const q = fmt.quantization
  if (q !== undefined && fmt.embedding === "quantized") {
    // The table in the MatMul weights' blocks, gathered and dequantized by onnxruntime's GatherBlockQuantized (or by
    // the runner in JavaScript). A tied embedding is quantized exactly as the LM head is, so its rows are the head's.
    const packed = quantizeBlocks(w.embedding, c.vocab, c.dim, q)
    const inputs = [
      g.initializer("embedding_q", "uint8", packed.data, [c.vocab, (packed.blocks * q.blockSize * q.bits) / 8]),
      N.ids,
      g.weight("embedding_scales", packed.scales, [c.vocab, packed.blocks]),
    ]
    if (packed.zeroPoints) {
      const zp = packed.zeroPoints
      inputs.push(g.initializer("embedding_zero_points", "uint8", zp, [c.vocab, zp.length / c.vocab]))
    }
    const rows = g.contrib("GatherBlockQuantized", inputs, {
      gather_axis: 0,
      quantize_axis: 1,
      block_size: q.blockSize,
      bits: q.bits,
    })
    g.output(N.hidden, rows, "float32", ["R", "T", c.dim])
    return g.encode()
  }
  // A float16 table is gathered first and the rows cast after, so it stays half-size in memory too.
  const half = fmt.float === "float16"
  const table = half
    ? g.initializer("embedding", "float16", float32ToFloat16Array(w.embedding), [c.vocab, c.dim])
    : g.weight("embedding", w.embedding, [c.vocab, c.dim])
  const rows = g.node("Gather", [table, N.ids], { axis: 0 })
  g.output(N.hidden, half ? g.node("Cast", [rows], { to: 1 }) : rows, "float32", ["R", "T", c.dim])
  return g.encode()
}

/**
 * Layers [first, end) with paged attention; see GraphNames for the I/O contract. Each residual add is fused with the
 * norm that follows it (SkipSimplifiedLayerNormalization), across layer boundaries too: a segment of n layers has
 * one plain RMSNorm and one plain Add.
 */
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
  g.input(N.blockTable, "int32", ["R", "MB"])
  g.input(N.attnMask, "float32", ["R", "T", "S"])
  for (let l = first; l < end; l++) {
    g.input(N.kPool(l), "float32", [c.kvHeads, "blocks", "block_size", c.headDim])
    g.input(N.vPool(l), "float32", [c.kvHeads, "blocks", "block_size", c.headDim])
  }
  const rope = ropeTables(g, c, w.invFreq)
  const mask5 = g.node("Unsqueeze", [N.attnMask, g.ints([0, 2])]) // [1,R,1,T,S]
  let h = rmsNorm(g, x, w.layers[first]!.attnNorm, c.normEps, `l${first}_attn_norm`)
  const newRows = { k: [] as Array<string>, v: [] as Array<string> }
  for (let l = first; l < end; l++) {
    const layer = w.layers[l]!
    const afterAttention = addNorm(
      g,
      attention(g, fmt, c, l, layer, h, rope, mask5, newRows),
      x,
      layer.ffnNorm,
      c.normEps,
      `l${l}_ffn_norm`,
    )
    const down = mlp(g, fmt, c, l, layer, afterAttention.normalized)
    if (l + 1 < end) {
      const next = addNorm(g, down, afterAttention.sum, w.layers[l + 1]!.attnNorm, c.normEps, `l${l + 1}_attn_norm`)
      h = next.normalized
      x = next.sum
    } else {
      x = g.node("Add", [afterAttention.sum, down])
    }
  }
  g.output(N.hiddenOut, x, "float32", ["R", "T", c.dim])
  outputNewRows(g, c, end - first, [...newRows.k, ...newRows.v])
  return g.encode()
}

/**
 * The new K/V rows of a graph's layers as one output, N.kvNew [R, T, 2·layers·kvHeads·headDim]: K of each layer in
 * order, then V of each layer. One output instead of two per layer, because onnxruntime-node allocates a fresh
 * buffer for every output of every call (about 3 µs each; measured in BENCHMARKS.md).
 */
const outputNewRows = (g: GraphBuilder, c: LlamaConfig, layers: number, parts: ReadonlyArray<string>) => {
  const width = 2 * layers * c.kvHeads * c.headDim
  g.output(N.kvNew, parts.length === 1 ? parts[0]! : g.node("Concat", [...parts], { axis: -1 }), "float32", [
    "R",
    "T",
    width,
  ])
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
 * one RotaryEmbedding rotates all K heads (positions are shared), and the output is that product's layout.
 */
export const buildKvFillGraph = (w: LlamaWeights, from: number, fmt: WeightFormat = FP32): Uint8Array => {
  const c = w.config
  const g = new GraphBuilder(`kvfill_${from}`)
  g.input(N.hidden, "float32", ["R", "T", c.dim])
  g.input(N.positions, "int64", ["R", "T"])
  const rope = ropeTables(g, c, w.invFreq)
  if (fmt.quantization !== undefined) {
    // Quantized blocks cannot take the fold: folded before quantizing, a norm weight's outlier channels widen every
    // block they fall in (measured: about twice the K/V error). Without it the layers cannot share a MatMulNBits,
    // and sharing only the RoPE and Splits measured no faster, so each layer keeps the path of its segment.
    const ks: Array<string> = []
    const vs: Array<string> = []
    for (let l = from; l < c.layers; l++) {
      const { k, v } = keyValue(g, fmt, c, l, w.layers[l]!, N.hidden, rope)
      ks.push(k)
      vs.push(v)
    }
    outputNewRows(g, c, ks.length, [...ks, ...vs])
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
  // The product is already laid out as the output is: K of each layer, then V of each layer. Only K is rotated
  // (layer i's heads are heads i·kvHeads .. (i+1)·kvHeads - 1 of it).
  const [k, v] = g.nodeN("Split", [g.node("MatMul", [n, folded]), g.ints([outDim / 2, outDim / 2])], 2, { axis: -1 })
  outputNewRows(g, c, layers.length, [applyRope(g, k!, rope, layers.length * c.kvHeads), v!])
  return g.encode()
}
