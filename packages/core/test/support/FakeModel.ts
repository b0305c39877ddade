/**
 * A deterministic fake model for fast engine tests: a ModelRunner over tiny tables instead of ONNX graphs, a
 * character tokenizer, and a plain reference decoder that recomputes every position from scratch (no cache).
 *
 * The fake is a real causal model in miniature, so the engine's bookkeeping is what it tests: each layer writes its
 * K/V rows into paged pools and attends over all earlier positions through the block table, so a wrong block table,
 * a stale or missing K/V row, a wrong fill or a bad rollback changes the next tokens. Layer l maps a hidden state h
 * at position p to tanh(W_l · h + ½ · mean over q ≤ p of V_l[q]) with V_l[q] = K_l[q] = the layer's input at q. Every
 * layer ends a segment and an exit; the shared head is logits = E · h.
 */
import { Effect, Layer } from "effect"
import { ConfidenceEvaluator } from "../../src/ConfidenceEvaluator.js"
import { Engine, type EngineOptions } from "../../src/Engine.js"
import { layer as KvCacheLive } from "../../src/KvCache.js"
import { type HeadOutput, ModelRunner, type ModelRunnerShape, type RowBatch } from "../../src/ModelRunner.js"
import { FORMAT_VERSION, type ModelSpec } from "../../src/ModelSpec.js"
import { Sampler } from "../../src/Sampler.js"
import { Scheduler, type SchedulerOptions } from "../../src/Scheduler.js"
import { Tokenizer, type TokenizerShape } from "../../src/Tokenizer.js"

export const FAKE_HIDDEN = 4
export const FAKE_LAYERS = 4
/** BOS, EOS, space, a–z, and three punctuation marks. */
export const FAKE_VOCAB = 32
const BOS = 0
const EOS = 1
const CHARS = " abcdefghijklmnopqrstuvwxyz.,!"

export const fakeSpec = (options: { readonly layers?: number; readonly classifiers?: boolean } = {}): ModelSpec => {
  const layers = options.layers ?? FAKE_LAYERS
  return {
    formatVersion: FORMAT_VERSION,
    name: "fake",
    architecture: "llama",
    dtype: "float32",
    dims: {
      hidden: FAKE_HIDDEN,
      intermediate: FAKE_HIDDEN,
      layers,
      heads: 1,
      kvHeads: 1,
      headDim: FAKE_HIDDEN,
      vocab: FAKE_VOCAB,
      contextLength: 96,
    },
    normEps: 1e-5,
    rope: { theta: 10000, style: "half" },
    headKind: "shared",
    tokens: { bos: BOS, eos: EOS, stop: [EOS] },
    files: { tokenizer: "fake", embed: "fake" },
    segments: [
      { file: "fake", firstLayer: 0, endLayer: 1 },
      ...Array.from({ length: layers - 1 }, (_, i) => ({ file: "fake", firstLayer: i + 1, endLayer: i + 2 })),
    ],
    exits: [
      ...Array.from({ length: layers - 1 }, (_, i) => ({
        layer: i + 1,
        head: "fake",
        kvfill: "fake",
        ...(options.classifiers ? { classifier: "fake" } : {}),
      })),
      { layer: layers, head: "fake" },
    ] as unknown as ModelSpec["exits"],
  }
}

/** A fixed pseudo-random table in [-1, 1). */
const table = (length: number, seed: number) => {
  let state = seed
  return Float64Array.from({ length }, () => {
    state = (state * 1103515245 + 12345) % 2 ** 31
    return (state / 2 ** 31) * 2 - 1
  })
}

/** The fake model's arithmetic, shared by the runner and the reference decoder. */
export const fakeMath = (layers = FAKE_LAYERS) => {
  const D = FAKE_HIDDEN
  const weights = Array.from({ length: layers }, (_, l) => table(D * D, 17 + l))
  const unembed = table(FAKE_VOCAB * D, 99)
  const embed = (id: number, out: Float32Array, at: number) => {
    out[at] = Math.sin(id * 0.7)
    out[at + 1] = Math.cos(id * 1.3)
    out[at + 2] = ((id * 37) % 11) / 11 - 0.5
    out[at + 3] = 0.25
  }
  /** One layer on one position: `context` is the mean of V over positions 0..p (this one included). */
  const layer = (l: number, h: ArrayLike<number>, context: ArrayLike<number>, out: Float32Array, at: number) => {
    const w = weights[l]!
    for (let i = 0; i < D; i++) {
      let s = 0.5 * context[i]!
      for (let j = 0; j < D; j++) s += w[i * D + j]! * h[j]!
      out[at + i] = Math.tanh(s)
    }
  }
  const logits = (h: ArrayLike<number>, out: Float32Array, at: number) => {
    for (let v = 0; v < FAKE_VOCAB; v++) {
      let s = 0
      for (let j = 0; j < D; j++) s += unembed[v * D + j]! * h[j]!
      out[at + v] = 4 * s
    }
  }
  return { embed, layer, logits }
}

export interface FakeRunnerOptions {
  readonly layers?: number
  readonly numBlocks?: number
  readonly blockSize?: number
  readonly classifiers?: boolean
  /** Called before every runner call with its stage ("embed", "segment 0", "head 1", "kvfill 0", ...). */
  readonly onCall?: (stage: string, rows: number) => void
}

export const makeFakeRunner = (options: FakeRunnerOptions = {}): ModelRunnerShape => {
  const spec = fakeSpec(options)
  const { layers } = spec.dims
  const D = FAKE_HIDDEN
  const V = FAKE_VOCAB
  const blockSize = options.blockSize ?? 4
  const numBlocks = options.numBlocks ?? 256
  const math = fakeMath(layers)
  // K and V are equal in this model, so one pool per layer holds both.
  const pools = Array.from({ length: layers }, () => new Float32Array(numBlocks * blockSize * D))
  const call = (stage: string, rows: number) => options.onCall?.(stage, rows)

  const runLayer = (l: number, input: Float32Array, batch: RowBatch, out: Float32Array) => {
    const pool = pools[l]!
    const { rows, tokens, positions, blockTable, maxBlocks, slots } = batch
    // The new rows' K/V first, then attention over every position up to each token's own.
    for (let i = 0; i < rows * tokens; i++)
      if (slots[i]! >= 0) pool.set(input.subarray(i * D, (i + 1) * D), slots[i]! * D)
    const context = new Float64Array(D)
    for (let r = 0; r < rows; r++) {
      const first = Number(positions[r * tokens])
      for (let t = 0; t < tokens; t++) {
        const i = r * tokens + t
        if (slots[i]! < 0) continue
        const p = Number(positions[i])
        context.fill(0)
        for (let q = 0; q <= p; q++) {
          const slot =
            q < first
              ? blockTable[r * maxBlocks + Math.floor(q / blockSize)]! * blockSize + (q % blockSize)
              : slots[r * tokens + (q - first)]!
          for (let d = 0; d < D; d++) context[d] += pool[slot * D + d]! / (p + 1)
        }
        math.layer(l, input.subarray(i * D, (i + 1) * D), context, out, i * D)
      }
    }
  }

  const head = (hidden: Float32Array, count: number, withLogits: boolean): HeadOutput => {
    const logits = new Float32Array(count * V)
    const maxProb = new Float32Array(count)
    const margin = new Float32Array(count)
    const entropy = new Float32Array(count)
    const topToken = new BigInt64Array(count)
    for (let r = 0; r < count; r++) {
      math.logits(hidden.subarray(r * D, (r + 1) * D), logits, r * V)
      const row = logits.subarray(r * V, (r + 1) * V)
      let top = 0
      for (let v = 1; v < V; v++) if (row[v]! > row[top]!) top = v
      let sum = 0
      for (let v = 0; v < V; v++) sum += Math.exp(row[v]! - row[top]!)
      let second = 0
      let h = 0
      for (let v = 0; v < V; v++) {
        const p = Math.exp(row[v]! - row[top]!) / sum
        if (v !== top) second = Math.max(second, p)
        if (p > 0) h -= p * Math.log(p)
      }
      topToken[r] = BigInt(top)
      maxProb[r] = 1 / sum
      margin[r] = 1 / sum - second
      entropy[r] = h
    }
    return { logits: withLogits ? logits : undefined, maxProb, margin, entropy, topToken }
  }

  return {
    spec,
    blockSize,
    numBlocks,
    bytesPerBlock: layers * blockSize * D * 4 * 2,
    // The fake's weights are a formula: nothing is stored or held.
    weights: { storedBytes: 0, residentBytes: 0 },
    embed: (ids, rows, tokens) =>
      Effect.sync(() => {
        call("embed", rows)
        const out = new Float32Array(rows * tokens * D)
        for (let i = 0; i < rows * tokens; i++) math.embed(Number(ids[i]), out, i * D)
        return out
      }),
    segment: (index, hidden, batch) =>
      Effect.sync(() => {
        call(`segment ${index}`, batch.rows)
        const { firstLayer, endLayer } = spec.segments[index]!
        let input = hidden.slice(0, batch.rows * batch.tokens * D)
        for (let l = firstLayer; l < endLayer; l++) {
          const out = new Float32Array(input.length)
          runLayer(l, input, batch, out)
          input = out
        }
        return input
      }),
    head: (index, hidden, count, logits) =>
      Effect.sync(() => {
        call(`head ${index}`, count)
        return head(hidden, count, logits)
      }),
    classify: (index, hidden, _previous, count) =>
      Effect.sync(() => {
        if (!spec.exits[index]!.classifier) return undefined
        call(`classifier ${index}`, count)
        return Float32Array.from({ length: count }, (_, r) => 1 / (1 + Math.exp(-3 * hidden[r * D]!)))
      }),
    // The fake's classifier runs as a call (the path of a classifier graph); the ONNX runner's tests cover the other.
    exitPredictor: () => undefined,
    kvFill: (index, hidden, positions, slots, fromLayers) =>
      Effect.sync(() => {
        call(`kvfill ${index}`, slots.length)
        const exitLayer = spec.exits[index]!.layer
        for (let r = 0; r < slots.length; r++) {
          const from = Math.max(exitLayer, fromLayers?.[r] ?? exitLayer)
          for (let l = from; l < layers; l++) pools[l]!.set(hidden.subarray(r * D, (r + 1) * D), slots[r]! * D)
        }
        void positions
      }),
    copyBlock: (from, to) => {
      for (const pool of pools) pool.copyWithin(to * blockSize * D, from * blockSize * D, (from + 1) * blockSize * D)
    },
    readKv: (layer, slot) => {
      const row = pools[layer]!.slice(slot * D, (slot + 1) * D)
      return { k: row, v: row.slice() }
    },
  }
}

/** Characters to ids and back; encode adds BOS; unknown characters become spaces. */
export const fakeTokenizer: TokenizerShape = {
  vocabSize: FAKE_VOCAB,
  // One token a code point: up to 4 UTF-8 bytes.
  maxTokenBytes: 4,
  encode: (text, options = {}) =>
    Effect.succeed([
      ...(options.addSpecialTokens === false ? [] : [BOS]),
      ...[...text.toLowerCase()].map((c) => 2 + Math.max(0, CHARS.indexOf(c))),
    ]),
  decode: (ids) => Effect.succeed(ids.map((id) => (id >= 2 ? CHARS[id - 2] : "")).join("")),
  detokenizer: () => ({ push: (id) => (id >= 2 ? CHARS[id - 2]! : ""), flush: () => "" }),
  idToToken: (id) => (id >= 2 ? CHARS[id - 2] : id === BOS ? "<s>" : id === EOS ? "</s>" : undefined),
}

/**
 * Greedy full-depth decoding by the fake model with no cache at all: every step recomputes every position through
 * every layer. The oracle for the engine's output on the fake runner.
 */
export const referenceGreedy = (prompt: ReadonlyArray<number>, maxTokens: number, layers = FAKE_LAYERS) => {
  const D = FAKE_HIDDEN
  const math = fakeMath(layers)
  const ids = [...prompt]
  const out: Array<number> = []
  const logits = new Float32Array(FAKE_VOCAB)
  while (out.length < maxTokens && ids.length < 96) {
    let states = new Float32Array(ids.length * D)
    ids.forEach((id, p) => math.embed(id, states, p * D))
    for (let l = 0; l < layers; l++) {
      const next = new Float32Array(states.length)
      const context = new Float64Array(D)
      for (let p = 0; p < ids.length; p++) {
        // The same sum in the same order as the runner's attention, so the two agree to the bit.
        context.fill(0)
        for (let q = 0; q <= p; q++) for (let d = 0; d < D; d++) context[d] += states[q * D + d]! / (p + 1)
        math.layer(l, states.subarray(p * D, (p + 1) * D), context, next, p * D)
      }
      states = next
    }
    math.logits(states.subarray((ids.length - 1) * D), logits, 0)
    let top = 0
    for (let v = 1; v < FAKE_VOCAB; v++) if (logits[v]! > logits[top]!) top = v
    out.push(top)
    ids.push(top)
    if (top === EOS) break
  }
  return out
}

/** The Engine over the fake runner, with the real scheduler, KV cache, sampler and confidence evaluator. */
export const fakeEngineLayer = (
  options: {
    readonly runner?: FakeRunnerOptions
    readonly scheduler?: SchedulerOptions
    readonly engine?: EngineOptions
    /** The tokenizer (default: fakeTokenizer), e.g. one that counts its calls. */
    readonly tokenizer?: TokenizerShape
  } = {},
) =>
  Engine.layer(options.engine).pipe(
    Layer.provideMerge(Scheduler.layer(options.scheduler)),
    Layer.provideMerge(KvCacheLive),
    Layer.provideMerge(Layer.succeed(ModelRunner, makeFakeRunner(options.runner))),
    Layer.provideMerge(Layer.succeed(Tokenizer, options.tokenizer ?? fakeTokenizer)),
    Layer.provideMerge(Sampler.layer),
    Layer.provideMerge(ConfidenceEvaluator.layer),
  )
