/**
 * A plain-TypeScript reference forward pass for Llama-style decoder models, used by tests as an independent numeric
 * reference. It is written from the llama2.c checkpoint description (shared/models/stories260K/README.md) and run.c's
 * conventions, deliberately NOT from the project's converter or any ONNX graph, so a bug in one is caught by the other.
 *
 * Storage is Float32Array (like run.c); dot products accumulate in double. It is slow and simple on purpose.
 */
import { readFileSync } from "node:fs"

export interface ReferenceConfig {
  readonly dim: number
  readonly hiddenDim: number
  readonly nLayers: number
  readonly nHeads: number
  readonly nKvHeads: number
  readonly vocabSize: number
  readonly seqLen: number
  readonly normEps: number
  readonly ropeTheta: number
}

/** One decoder layer; every matrix is row-major [out, in]. */
export interface ReferenceLayerWeights {
  /** [dim] */
  readonly rmsAtt: Float32Array
  /** [nHeads*headSize, dim] */
  readonly wq: Float32Array
  /** [nKvHeads*headSize, dim] */
  readonly wk: Float32Array
  /** [nKvHeads*headSize, dim] */
  readonly wv: Float32Array
  /** [dim, nHeads*headSize] */
  readonly wo: Float32Array
  /** [dim] */
  readonly rmsFfn: Float32Array
  /** gate: [hiddenDim, dim] */
  readonly w1: Float32Array
  /** down: [dim, hiddenDim] */
  readonly w2: Float32Array
  /** up: [hiddenDim, dim] */
  readonly w3: Float32Array
}

export interface ReferenceWeights {
  readonly config: ReferenceConfig
  /** [vocabSize, dim] */
  readonly tokenEmbedding: Float32Array
  readonly layers: ReadonlyArray<ReferenceLayerWeights>
  /** [dim] */
  readonly rmsFinal: Float32Array
  /** [vocabSize, dim]; absent means the classifier is tied to the token embedding. */
  readonly classifier?: Float32Array
}

/**
 * RoPE pairing convention.
 * - `"interleaved"` (llama2.c run.c): rotates adjacent pairs (i, i+1) inside each head; the frequency of the pair
 *   starting at i is theta^-((i mod headSize)/headSize).
 * - `"half"` (Hugging Face `rotate_half`): rotates pairs (j, j + headSize/2) for j < headSize/2 with frequency
 *   theta^-(2j/headSize). Use it for HF checkpoints, whose q/k rows are permuted relative to llama2.c's.
 */
export type RopeStyle = "interleaved" | "half"

export interface ReferenceOptions {
  /** Default "interleaved" (run.c). */
  readonly ropeStyle?: RopeStyle
  /** Compute the shared head on every layer's hidden state (default true). */
  readonly exitLogits?: boolean
}

/** Everything the forward pass produced at one position. */
export interface PositionResult {
  readonly token: number
  readonly pos: number
  /** Residual stream after layer l, l = 0..nLayers-1; each [dim]. */
  readonly hidden: ReadonlyArray<Float32Array>
  /** Final RMSNorm + classifier on the last hidden state; [vocabSize]. */
  readonly logits: Float32Array
  /** The same head on every layer's hidden state (the last equals `logits`); empty when disabled. */
  readonly exitLogits: ReadonlyArray<Float32Array>
  /** Per layer, the K row written at this position (after RoPE); each [nKvHeads*headSize]. */
  readonly k: ReadonlyArray<Float32Array>
  /** Per layer, the V row written at this position; each [nKvHeads*headSize]. */
  readonly v: ReadonlyArray<Float32Array>
}

export interface ReferenceModel {
  readonly config: ReferenceConfig
  readonly weights: ReferenceWeights
  readonly ropeStyle: RopeStyle
  readonly headSize: number
  readonly kvDim: number
  /**
   * Runs one token at `pos`, attending to the cached positions 0..pos-1 (as run.c does). Positions after `pos` are
   * forgotten, so re-running from an earlier position is allowed.
   */
  readonly forward: (token: number, pos: number) => PositionResult
  /** Results of the positions run so far, indexed by position. */
  readonly history: ReadonlyArray<PositionResult>
  /**
   * The K/V rows that `layer` would write for a token whose residual stream entering that layer is `hidden`
   * (pre-attention RMSNorm, K/V projections, RoPE on K): what a skipped layer's KV fill must produce.
   */
  readonly projectKv: (layer: number, hidden: Float32Array, pos: number) => { k: Float32Array; v: Float32Array }
  /** Clears the KV cache and history. */
  readonly reset: () => void
  /** Runs ids from position 0 (after a reset) and returns every position's result. */
  readonly run: (ids: ReadonlyArray<number>) => ReadonlyArray<PositionResult>
  /**
   * Greedy decoding from position 0: feeds the prompt, then `steps` argmax tokens (ties -> lowest id). Returns the
   * whole sequence (prompt + generated). With `stopAt`, stops after generating one of those ids (it is included).
   */
  readonly greedy: (
    promptIds: ReadonlyArray<number>,
    steps: number,
    options?: { readonly stopAt?: ReadonlyArray<number> },
  ) => Array<number>
}

/** Argmax of a row; ties go to the lowest id. */
export const argmax = (row: ArrayLike<number>): number => {
  let best = 0
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i
  return best
}

/** The k largest entries as [id, value], best first (ties -> lowest id). */
export const topK = (row: ArrayLike<number>, k: number): Array<[number, number]> =>
  Array.from(row, (v, i): [number, number] => [i, v])
    .sort((a, b) => b[1] - a[1] || a[0] - b[0])
    .slice(0, k)

/** Parses a llama2.c legacy ("version 0") checkpoint. */
export const loadLlama2cReference = (path: string, options?: ReferenceOptions): ReferenceModel =>
  makeReferenceModel(parseLlama2c(readFileSync(path), path), options)

export const parseLlama2c = (bytes: Uint8Array, path = "<bytes>"): ReferenceWeights => {
  if (bytes.byteLength < 28) throw new Error(`${path}: ${bytes.byteLength} bytes is too short for the header`)
  // Copy so the Float32Array view is 4-byte aligned whatever the Buffer's pool offset.
  const buf = new Uint8Array(bytes).buffer
  const header = new Int32Array(buf, 0, 7)
  const [dim, hiddenDim, nLayers, nHeads, nKvHeads, rawVocab, seqLen] = Array.from(header) as [
    number,
    number,
    number,
    number,
    number,
    number,
    number,
  ]
  const shared = rawVocab > 0
  const vocabSize = Math.abs(rawVocab)
  if (bytes.byteLength % 4 !== 0) throw new Error(`${path}: size ${bytes.byteLength} is not a multiple of 4`)
  const data = new Float32Array(buf, 28)
  const headSize = dim / nHeads
  const kvDim = nKvHeads * headSize
  let offset = 0
  const take = (n: number, what: string): Float32Array => {
    if (offset + n > data.length) throw new Error(`${path}: file ends inside ${what}`)
    const t = data.subarray(offset, offset + n)
    offset += n
    return t
  }
  const tokenEmbedding = take(vocabSize * dim, "token_embedding")
  const stacked = (n: number, what: string) => take(nLayers * n, what)
  const rmsAtt = stacked(dim, "rms_att")
  const wq = stacked(dim * dim, "wq")
  const wk = stacked(kvDim * dim, "wk")
  const wv = stacked(kvDim * dim, "wv")
  const wo = stacked(dim * dim, "wo")
  const rmsFfn = stacked(dim, "rms_ffn")
  const w1 = stacked(hiddenDim * dim, "w1")
  const w2 = stacked(dim * hiddenDim, "w2")
  const w3 = stacked(hiddenDim * dim, "w3")
  const rmsFinal = take(dim, "rms_final")
  // The two legacy RoPE tables (freq_cis_real, freq_cis_imag) are unused: RoPE is computed.
  take(seqLen * (headSize / 2), "freq_cis_real")
  take(seqLen * (headSize / 2), "freq_cis_imag")
  const classifier = shared ? undefined : take(vocabSize * dim, "wcls")
  if (offset !== data.length) {
    throw new Error(`${path}: ${data.length - offset} float32 values left after the last tensor`)
  }
  const layer = (t: Float32Array, l: number, n: number) => t.subarray(l * n, (l + 1) * n)
  const layers = Array.from(
    { length: nLayers },
    (_, l): ReferenceLayerWeights => ({
      rmsAtt: layer(rmsAtt, l, dim),
      wq: layer(wq, l, dim * dim),
      wk: layer(wk, l, kvDim * dim),
      wv: layer(wv, l, kvDim * dim),
      wo: layer(wo, l, dim * dim),
      rmsFfn: layer(rmsFfn, l, dim),
      w1: layer(w1, l, hiddenDim * dim),
      w2: layer(w2, l, dim * hiddenDim),
      w3: layer(w3, l, hiddenDim * dim),
    }),
  )
  const config: ReferenceConfig = {
    dim,
    hiddenDim,
    nLayers,
    nHeads,
    nKvHeads,
    vocabSize,
    seqLen,
    normEps: 1e-5,
    ropeTheta: 10000,
  }
  return classifier === undefined
    ? { config, tokenEmbedding, layers, rmsFinal }
    : { config, tokenEmbedding, layers, rmsFinal, classifier }
}

const checkLength = (t: Float32Array, n: number, what: string) => {
  if (t.length !== n) throw new Error(`reference weights: ${what} has ${t.length} values, expected ${n}`)
}

/** out[i] = sum_j w[i*n + j] * x[j], for i < d. */
const matmul = (out: Float32Array, x: Float32Array, w: Float32Array, n: number, d: number) => {
  for (let i = 0; i < d; i++) {
    let s = 0
    const row = i * n
    for (let j = 0; j < n; j++) s += w[row + j]! * x[j]!
    out[i] = s
  }
}

const rmsNorm = (out: Float32Array, x: Float32Array, weight: Float32Array, eps: number) => {
  let ss = 0
  for (let i = 0; i < x.length; i++) ss += x[i]! * x[i]!
  const scale = 1 / Math.sqrt(ss / x.length + eps)
  for (let i = 0; i < x.length; i++) out[i] = weight[i]! * (x[i]! * scale)
}

export const makeReferenceModel = (weights: ReferenceWeights, options?: ReferenceOptions): ReferenceModel => {
  const config = weights.config
  const { dim, hiddenDim, nLayers, nHeads, nKvHeads, vocabSize, seqLen, normEps, ropeTheta } = config
  const ropeStyle = options?.ropeStyle ?? "interleaved"
  const withExitLogits = options?.exitLogits ?? true
  if (dim % nHeads !== 0 || nHeads % nKvHeads !== 0) throw new Error("reference weights: bad head counts")
  const headSize = dim / nHeads
  if (headSize % 2 !== 0) throw new Error("reference weights: RoPE needs an even head size")
  const kvDim = nKvHeads * headSize
  const group = nHeads / nKvHeads
  checkLength(weights.tokenEmbedding, vocabSize * dim, "tokenEmbedding")
  checkLength(weights.rmsFinal, dim, "rmsFinal")
  if (weights.layers.length !== nLayers) throw new Error(`reference weights: ${weights.layers.length} layers`)
  weights.layers.forEach((w, l) => {
    checkLength(w.rmsAtt, dim, `layer ${l} rmsAtt`)
    checkLength(w.wq, dim * dim, `layer ${l} wq`)
    checkLength(w.wk, kvDim * dim, `layer ${l} wk`)
    checkLength(w.wv, kvDim * dim, `layer ${l} wv`)
    checkLength(w.wo, dim * dim, `layer ${l} wo`)
    checkLength(w.rmsFfn, dim, `layer ${l} rmsFfn`)
    checkLength(w.w1, hiddenDim * dim, `layer ${l} w1`)
    checkLength(w.w2, dim * hiddenDim, `layer ${l} w2`)
    checkLength(w.w3, hiddenDim * dim, `layer ${l} w3`)
  })
  const classifier = weights.classifier ?? weights.tokenEmbedding
  checkLength(classifier, vocabSize * dim, "classifier")

  // KV cache: per layer [seqLen, kvDim].
  const keyCache = Array.from({ length: nLayers }, () => new Float32Array(seqLen * kvDim))
  const valueCache = Array.from({ length: nLayers }, () => new Float32Array(seqLen * kvDim))
  const history: Array<PositionResult> = []

  const x = new Float32Array(dim)
  const xb = new Float32Array(dim)
  const xb2 = new Float32Array(dim)
  const q = new Float32Array(dim)
  const hb = new Float32Array(hiddenDim)
  const hb2 = new Float32Array(hiddenDim)
  const att = new Float64Array(seqLen)

  // Rotates `n` values of `vec` (a whole number of heads) in place.
  const rope = (vec: Float32Array, n: number, pos: number) => {
    for (let h = 0; h < n / headSize; h++) {
      const base = h * headSize
      for (let j = 0; j < headSize / 2; j++) {
        const freq = 1 / ropeTheta ** ((2 * j) / headSize)
        const angle = pos * freq
        const c = Math.cos(angle)
        const s = Math.sin(angle)
        const i0 = ropeStyle === "interleaved" ? base + 2 * j : base + j
        const i1 = ropeStyle === "interleaved" ? i0 + 1 : i0 + headSize / 2
        const v0 = vec[i0]!
        const v1 = vec[i1]!
        vec[i0] = v0 * c - v1 * s
        vec[i1] = v0 * s + v1 * c
      }
    }
  }

  const head = (hidden: Float32Array): Float32Array => {
    const normed = new Float32Array(dim)
    rmsNorm(normed, hidden, weights.rmsFinal, normEps)
    const logits = new Float32Array(vocabSize)
    matmul(logits, normed, classifier, dim, vocabSize)
    return logits
  }

  const projectKv = (layer: number, hidden: Float32Array, pos: number) => {
    const w = weights.layers[layer]!
    const normed = new Float32Array(dim)
    rmsNorm(normed, hidden, w.rmsAtt, normEps)
    const k = new Float32Array(kvDim)
    const v = new Float32Array(kvDim)
    matmul(k, normed, w.wk, dim, kvDim)
    matmul(v, normed, w.wv, dim, kvDim)
    rope(k, kvDim, pos)
    return { k, v }
  }

  const forward = (token: number, pos: number): PositionResult => {
    if (!Number.isInteger(token) || token < 0 || token >= vocabSize) throw new Error(`token ${token} out of range`)
    if (!Number.isInteger(pos) || pos < 0 || pos >= seqLen || pos > history.length) {
      throw new Error(`position ${pos} out of range (have ${history.length} cached, seqLen ${seqLen})`)
    }
    history.length = pos
    x.set(weights.tokenEmbedding.subarray(token * dim, (token + 1) * dim))
    const hidden: Array<Float32Array> = []
    const ks: Array<Float32Array> = []
    const vs: Array<Float32Array> = []
    const scale = 1 / Math.sqrt(headSize)
    for (let l = 0; l < nLayers; l++) {
      const w = weights.layers[l]!
      rmsNorm(xb, x, w.rmsAtt, normEps)
      const kRow = keyCache[l]!.subarray(pos * kvDim, (pos + 1) * kvDim)
      const vRow = valueCache[l]!.subarray(pos * kvDim, (pos + 1) * kvDim)
      matmul(q, xb, w.wq, dim, dim)
      matmul(kRow, xb, w.wk, dim, kvDim)
      matmul(vRow, xb, w.wv, dim, kvDim)
      rope(q, dim, pos)
      rope(kRow, kvDim, pos)
      ks.push(kRow.slice())
      vs.push(vRow.slice())

      const kc = keyCache[l]!
      const vc = valueCache[l]!
      for (let h = 0; h < nHeads; h++) {
        const qo = h * headSize
        const kvo = Math.floor(h / group) * headSize
        let max = Number.NEGATIVE_INFINITY
        for (let t = 0; t <= pos; t++) {
          let s = 0
          const ko = t * kvDim + kvo
          for (let i = 0; i < headSize; i++) s += q[qo + i]! * kc[ko + i]!
          s *= scale
          att[t] = s
          if (s > max) max = s
        }
        let sum = 0
        for (let t = 0; t <= pos; t++) {
          const e = Math.exp(att[t]! - max)
          att[t] = e
          sum += e
        }
        for (let i = 0; i < headSize; i++) {
          let acc = 0
          for (let t = 0; t <= pos; t++) acc += att[t]! * vc[t * kvDim + kvo + i]!
          xb[qo + i] = acc / sum
        }
      }
      matmul(xb2, xb, w.wo, dim, dim)
      for (let i = 0; i < dim; i++) x[i] = x[i]! + xb2[i]!

      rmsNorm(xb, x, w.rmsFfn, normEps)
      matmul(hb, xb, w.w1, dim, hiddenDim)
      matmul(hb2, xb, w.w3, dim, hiddenDim)
      for (let i = 0; i < hiddenDim; i++) {
        const g = hb[i]!
        hb[i] = (g / (1 + Math.exp(-g))) * hb2[i]!
      }
      matmul(xb2, hb, w.w2, hiddenDim, dim)
      for (let i = 0; i < dim; i++) x[i] = x[i]! + xb2[i]!
      hidden.push(x.slice())
    }
    const exitLogits = withExitLogits ? hidden.map(head) : []
    const logits = withExitLogits ? exitLogits[nLayers - 1]! : head(hidden[nLayers - 1]!)
    const result: PositionResult = { token, pos, hidden, logits, exitLogits, k: ks, v: vs }
    history.push(result)
    return result
  }

  const reset = () => {
    history.length = 0
  }

  const run = (ids: ReadonlyArray<number>) => {
    reset()
    return ids.map((id, pos) => forward(id, pos))
  }

  const greedy: ReferenceModel["greedy"] = (promptIds, steps, opts) => {
    if (promptIds.length === 0) throw new Error("greedy needs at least one prompt token")
    reset()
    const seq = [...promptIds]
    let last: PositionResult | undefined
    promptIds.forEach((id, pos) => {
      last = forward(id, pos)
    })
    for (let s = 0; s < steps; s++) {
      const next = argmax(last!.logits)
      seq.push(next)
      if (opts?.stopAt?.includes(next)) break
      if (s + 1 < steps) last = forward(next, seq.length - 1)
    }
    return seq
  }

  return { config, weights, ropeStyle, headSize, kvDim, forward, history, projectKv, reset, run, greedy }
}

/** Reorders a row of K from run.c's interleaved RoPE pairs to the rotate-half layout of the staged graphs. */
export const interleavedToHalfRow = (row: Float32Array, headDim: number): Float32Array => {
  const out = new Float32Array(row.length)
  for (let h = 0; h < row.length / headDim; h++) {
    for (let i = 0; i < headDim / 2; i++) {
      out[h * headDim + i] = row[h * headDim + 2 * i]!
      out[h * headDim + i + headDim / 2] = row[h * headDim + 2 * i + 1]!
    }
  }
  return out
}
