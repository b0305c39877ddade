/**
 * Reader for llama2.c checkpoints in the legacy ("version 0") export: a 7 × int32 header, then float32 tensors.
 * A positive vocab size in the header means the classifier shares the token embedding.
 */
import { readFile } from "node:fs/promises"
import { CheckpointError } from "@offramp/core/Errors"
import { Effect } from "effect"
import type { LlamaConfig, LlamaLayerWeights, LlamaWeights } from "./LlamaWeights.js"
import { interleavedToHalf, ropeInvFreq } from "./LlamaWeights.js"

const HEADER_BYTES = 7 * 4

/** llama2.c's fixed conventions (run.c): RMSNorm epsilon and RoPE base. */
const LLAMA2C_NORM_EPS = 1e-5
const LLAMA2C_ROPE_THETA = 10000

export const readLlama2cCheckpoint = (path: string): Effect.Effect<LlamaWeights, CheckpointError> =>
  Effect.gen(function* () {
    const bytes = yield* Effect.tryPromise({
      try: () => readFile(path),
      catch: (e) => new CheckpointError({ path, message: `cannot read the checkpoint: ${(e as Error).message}` }),
    })
    return yield* Effect.try({
      try: () => parseLlama2c(bytes),
      catch: (e) => new CheckpointError({ path, message: (e as Error).message }),
    })
  })

export const parseLlama2c = (bytes: Uint8Array): LlamaWeights => {
  if (bytes.byteLength < HEADER_BYTES) {
    throw new Error(`file is ${bytes.byteLength} bytes, shorter than the 28-byte llama2.c header`)
  }
  const header = new DataView(bytes.buffer, bytes.byteOffset, HEADER_BYTES)
  const [dim, hiddenDim, layers, heads, kvHeads, rawVocab, seqLen] = Array.from({ length: 7 }, (_, i) =>
    header.getInt32(i * 4, true),
  ) as [number, number, number, number, number, number, number]
  const sharedClassifier = rawVocab > 0
  const vocab = Math.abs(rawVocab)
  const fields = { dim, hiddenDim, layers, heads, kvHeads, vocab, seqLen }
  for (const [name, value] of Object.entries(fields)) {
    if (!(value > 0 && value < 1 << 24)) throw new Error(`header field ${name} = ${value} is not a plausible size`)
  }
  if (dim % heads !== 0 || heads % kvHeads !== 0) {
    throw new Error(`header dims are inconsistent: dim ${dim}, heads ${heads}, kv heads ${kvHeads}`)
  }
  const headDim = dim / heads
  const kvDim = kvHeads * headDim
  const sizes = {
    embedding: vocab * dim,
    attnNorm: layers * dim,
    wq: layers * dim * dim,
    wk: layers * kvDim * dim,
    wv: layers * kvDim * dim,
    wo: layers * dim * dim,
    ffnNorm: layers * dim,
    gate: layers * hiddenDim * dim,
    down: layers * dim * hiddenDim,
    up: layers * hiddenDim * dim,
    finalNorm: dim,
    freqCis: seqLen * headDim, // real and imaginary halves: unused, RoPE is recomputed
    classifier: sharedClassifier ? 0 : vocab * dim,
  }
  const floats = Object.values(sizes).reduce((a, b) => a + b, 0)
  const expected = HEADER_BYTES + 4 * floats
  if (bytes.byteLength !== expected) {
    throw new Error(
      `size ${bytes.byteLength} bytes disagrees with its header (dim ${dim}, hidden ${hiddenDim}, layers ${layers}, ` +
        `heads ${heads}/${kvHeads}, vocab ${rawVocab}, seq ${seqLen}), which needs ${expected} bytes: ` +
        "the file is truncated, corrupt, or not a legacy llama2.c export",
    )
  }
  // Copy so the tensors are 4-byte aligned whatever the Buffer's offset.
  const data = new Float32Array(bytes.buffer.slice(bytes.byteOffset + HEADER_BYTES, bytes.byteOffset + expected))
  let cursor = 0
  const take = (n: number) => {
    cursor += n
    return data.subarray(cursor - n, cursor)
  }
  const perLayer = (total: number) => {
    const all = take(total)
    const n = total / layers
    return Array.from({ length: layers }, (_, l) => all.subarray(l * n, (l + 1) * n))
  }
  const embedding = take(sizes.embedding)
  const attnNorm = perLayer(sizes.attnNorm)
  const wq = perLayer(sizes.wq)
  const wk = perLayer(sizes.wk)
  const wv = perLayer(sizes.wv)
  const wo = perLayer(sizes.wo)
  const ffnNorm = perLayer(sizes.ffnNorm)
  const gate = perLayer(sizes.gate)
  const down = perLayer(sizes.down)
  const up = perLayer(sizes.up)
  const finalNorm = take(sizes.finalNorm)
  take(sizes.freqCis)
  const lmHead = sharedClassifier ? embedding : take(sizes.classifier)

  const config: LlamaConfig = {
    dim,
    hiddenDim,
    layers,
    heads,
    kvHeads,
    headDim,
    vocab,
    contextLength: seqLen,
    normEps: LLAMA2C_NORM_EPS,
    ropeTheta: LLAMA2C_ROPE_THETA,
  }
  const layerWeights: Array<LlamaLayerWeights> = Array.from({ length: layers }, (_, l) => ({
    attnNorm: attnNorm[l]!,
    // run.c rotates adjacent pairs; our graphs use rotate-half, so Q/K rows are permuted once here.
    wq: interleavedToHalf(wq[l]!, heads, headDim, dim),
    wk: interleavedToHalf(wk[l]!, kvHeads, headDim, dim),
    wv: wv[l]!,
    wo: wo[l]!,
    ffnNorm: ffnNorm[l]!,
    gate: gate[l]!,
    down: down[l]!,
    up: up[l]!,
  }))
  return {
    config,
    embedding,
    layers: layerWeights,
    finalHead: { norm: finalNorm, lmHead },
    invFreq: ropeInvFreq(headDim, LLAMA2C_ROPE_THETA),
  }
}
