/**
 * Validates the test-only reference forward pass against the ground truth in shared/models/stories260K/README.md
 * (karpathy's run.c greedy output and an independent numpy re-implementation's top-5 logits).
 */
import { fileURLToPath } from "node:url"
import { describe, expect, it } from "@effect/vitest"
import { loadLlama2cReference, makeReferenceModel, type ReferenceModel, topK } from "./support/reference-llama.js"

const checkpoint = fileURLToPath(new URL("../../shared/models/stories260K/stories260K.bin", import.meta.url))

const prompt = [1, 403, 407, 261, 378]
// run.c -t 0 -n 64 -i "Once upon a time": BOS plus 64 steps.
const expected = [
  1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419,
  292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352, 266, 268, 388, 426, 338, 391,
  266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270, 333, 415, 426, 13, 438, 310,
]

const expectTop5 = (logits: Float32Array, want: ReadonlyArray<readonly [number, number]>) => {
  const got = topK(logits, 5)
  expect(got.map(([id]) => id)).toEqual(want.map(([id]) => id))
  got.forEach(([, value], i) => {
    expect(Math.abs(value - want[i]![1])).toBeLessThan(1e-3)
  })
}

describe("reference Llama forward (stories260K)", () => {
  const model: ReferenceModel = loadLlama2cReference(checkpoint)

  it("parses the header", () => {
    expect(model.config).toMatchObject({
      dim: 64,
      hiddenDim: 172,
      nLayers: 5,
      nHeads: 8,
      nKvHeads: 4,
      vocabSize: 512,
      seqLen: 512,
    })
    expect(model.weights.classifier).toBeUndefined()
  })

  it("reproduces run.c's greedy sequence", () => {
    expect(expected).toHaveLength(65)
    expect(model.greedy(prompt, 60)).toEqual(expected)
  })

  it("matches the README's top-5 logits at positions 0 and 4", () => {
    const results = model.run(prompt)
    expectTop5(results[0]!.logits, [
      [403, 17.0235],
      [385, 15.4062],
      [410, 13.1083],
      [317, 12.7692],
      [407, 12.4181],
    ])
    expectTop5(results[4]!.logits, [
      [432, 17.7994],
      [383, 14.2813],
      [322, 9.7097],
      [353, 9.5873],
      [323, 9.1342],
    ])
  })

  it("exposes per-layer hidden states, exit logits and K/V rows", () => {
    const results = model.run(prompt)
    const last = results[4]!
    expect(last.hidden).toHaveLength(5)
    expect(last.exitLogits).toHaveLength(5)
    expect(last.exitLogits[4]).toEqual(last.logits)
    expect(last.k.map((r) => r.length)).toEqual([32, 32, 32, 32, 32])
    expect(last.v.map((r) => r.length)).toEqual([32, 32, 32, 32, 32])
    // At position 0 RoPE is the identity, so layer 0's K row is the plain projection of the normed embedding.
    const { dim } = model.config
    const emb = model.weights.tokenEmbedding.subarray(prompt[0]! * dim, (prompt[0]! + 1) * dim)
    const l0 = model.weights.layers[0]!
    const rms = 1 / Math.sqrt(emb.reduce((s, v) => s + v * v, 0) / dim + 1e-5)
    for (let i = 0; i < model.kvDim; i++) {
      let k = 0
      for (let j = 0; j < dim; j++) k += l0.wk[i * dim + j]! * emb[j]! * rms * l0.rmsAtt[j]!
      expect(Math.abs(results[0]!.k[0]![i]! - k)).toBeLessThan(1e-5)
    }
    expect(model.history).toHaveLength(5)
  })

  it("recomputing from an earlier position gives the same results", () => {
    const first = model.run(prompt).map((r) => r.logits)
    model.forward(prompt[3]!, 3)
    const again = model.forward(prompt[4]!, 4)
    expect(again.logits).toEqual(first[4])
  })

  it("half-style RoPE on permuted q/k rows equals interleaved RoPE (HF export convention)", () => {
    // HF's convert script permutes each head's q/k rows so that rotate_half pairs (j, j+hs/2) hold the values run.c
    // pairs as (2j, 2j+1). Applying that permutation and switching ropeStyle must give identical logits.
    const w = model.weights
    const hs = model.headSize
    const permute = (m: Float32Array, heads: number) => {
      const out = new Float32Array(m.length)
      const cols = w.config.dim
      for (let h = 0; h < heads; h++) {
        for (let j = 0; j < hs / 2; j++) {
          for (const [from, to] of [
            [2 * j, j],
            [2 * j + 1, j + hs / 2],
          ] as const) {
            const src = (h * hs + from) * cols
            out.set(m.subarray(src, src + cols), (h * hs + to) * cols)
          }
        }
      }
      return out
    }
    const hf = makeReferenceModel(
      {
        ...w,
        layers: w.layers.map((l) => ({
          ...l,
          wq: permute(l.wq, w.config.nHeads),
          wk: permute(l.wk, w.config.nKvHeads),
        })),
      },
      { ropeStyle: "half" },
    )
    const a = model.run(prompt)[4]!.logits
    const b = hf.run(prompt)[4]!.logits
    for (let i = 0; i < a.length; i++) expect(Math.abs(a[i]! - b[i]!)).toBeLessThan(1e-4)
  })
})
