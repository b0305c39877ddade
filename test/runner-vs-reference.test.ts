/**
 * The ONNX runner against the plain-TypeScript reference forward pass on stories260K: the hidden state after
 * every layer and the logits of every exit head, within 1e-4, through chunked prefill, single-token decode and a
 * batch of rows with different lengths over scattered KV blocks.
 */

import { describe, expect, it } from "@effect/vitest"
import { ModelRunner } from "@offramp/core/ModelRunner"
import { buildRowBatch, type RowInput } from "@offramp/core/RowBatch"
import { OnnxModelRunner } from "@offramp/onnx/OnnxModelRunner"
import { Effect } from "effect"
import { beforeAll } from "vitest"
import { argmax } from "../packages/core/src/internal/SamplingMath.js"
import { interleavedToHalfRow, loadLlama2cReference, type PositionResult } from "./support/reference-llama.js"
import { convertStories, REFERENCE_IDS, STORIES_CHECKPOINT, tempDir } from "./support/stories.js"

const TOLERANCE = 1e-4
const BLOCK_SIZE = 4

const maxAbsDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  expect(a.length).toBe(b.length)
  let worst = 0
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!))
  return worst
}

/** A sequence of the test: its ids, the blocks it owns, and how far it has been run. */
interface Row {
  readonly ids: ReadonlyArray<number>
  readonly blocks: Array<number>
  cached: number
}

let modelDir = ""
beforeAll(async () => {
  modelDir = tempDir("runner")
  await convertStories(modelDir)
})

const reference = loadLlama2cReference(STORIES_CHECKPOINT)
const referenceRun = (ids: ReadonlyArray<number>): ReadonlyArray<PositionResult> => reference.run(ids).slice()

/**
 * Runs one step: `counts[i]` new tokens of rows[i], all rows in one padded batch, and checks every layer's
 * hidden state and every exit head against the reference for each new position.
 */
const step = (
  rows: ReadonlyArray<Row>,
  counts: ReadonlyArray<number>,
  expected: ReadonlyArray<ReadonlyArray<PositionResult>>,
) =>
  Effect.gen(function* () {
    const runner = yield* ModelRunner
    const { spec } = runner
    const D = spec.dims.hidden
    const inputs: Array<RowInput> = rows.map((row, r) => ({
      cached: row.cached,
      count: counts[r]!,
      blocks: row.blocks,
    }))
    const batch = buildRowBatch(inputs, runner.blockSize)
    const ids = new BigInt64Array(batch.rows * batch.tokens)
    rows.forEach((row, r) => {
      for (let t = 0; t < counts[r]!; t++) ids[r * batch.tokens + t] = BigInt(row.ids[row.cached + t]!)
    })
    let hidden = yield* runner.embed(ids, batch.rows, batch.tokens)
    let worst = 0
    for (let s = 0; s < spec.segments.length; s++) {
      hidden = yield* runner.segment(s, hidden, batch)
      const layer = spec.segments[s]!.endLayer - 1
      const exitIndex = spec.exits.findIndex((e) => e.layer === layer + 1)
      const head = yield* runner.head(exitIndex, hidden, batch.rows * batch.tokens, true)
      // Without logits (greedy decoding) the head returns the same statistics, and its top token is the argmax.
      const statistics = yield* runner.head(exitIndex, hidden, batch.rows * batch.tokens, false)
      expect(statistics.logits).toBeUndefined()
      expect(statistics.maxProb).toEqual(head.maxProb)
      rows.forEach((row, r) => {
        for (let t = 0; t < counts[r]!; t++) {
          const i = r * batch.tokens + t
          const want = expected[r]![row.cached + t]!
          worst = Math.max(worst, maxAbsDiff(hidden.subarray(i * D, (i + 1) * D), want.hidden[layer]!))
          const V = spec.dims.vocab
          worst = Math.max(worst, maxAbsDiff(head.logits!.subarray(i * V, (i + 1) * V), want.exitLogits[layer]!))
          expect(Number(statistics.topToken[i])).toBe(argmax(want.exitLogits[layer]!))
        }
      })
    }
    rows.forEach((row, r) => {
      row.cached += counts[r]!
    })
    return worst
  })

/** Hands out blocks in a scrambled order so block tables are not contiguous. */
const scrambledBlocks = (count: number) => {
  const order = Array.from({ length: count }, (_, i) => (i * 7 + 3) % count)
  return (n: number) => order.splice(0, n)
}

describe("ONNX runner vs the TypeScript reference (stories260K)", () => {
  it.effect("chunked prefill then decode of one sequence matches at every layer and exit", () =>
    Effect.gen(function* () {
      const ids = REFERENCE_IDS.slice(0, 30)
      const expected = [referenceRun(ids)]
      const take = scrambledBlocks(64)
      const row: Row = { ids, blocks: take(Math.ceil(ids.length / BLOCK_SIZE)), cached: 0 }
      let worst = 0
      for (const count of [7, 1, 1, 5, 1, 9, 1, 1, 4]) worst = Math.max(worst, yield* step([row], [count], expected))
      expect(row.cached).toBe(30)
      expect(worst).toBeLessThan(TOLERANCE)
    }).pipe(Effect.provide(OnnxModelRunner.layer(modelDir, { blockSize: BLOCK_SIZE, numBlocks: 64 }))),
  )

  it.effect("a batch of rows with different cached lengths and new-token counts matches each row alone", () =>
    Effect.gen(function* () {
      const prompts = [
        REFERENCE_IDS.slice(0, 23),
        [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317],
        [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314, 315, 316, 317],
        [1, 500, 17, 290, 411, 300],
      ]
      const expected = prompts.map(referenceRun)
      const take = scrambledBlocks(64)
      const rows: Array<Row> = prompts.map((ids) => ({
        ids,
        blocks: take(Math.ceil(ids.length / BLOCK_SIZE)),
        cached: 0,
      }))
      let worst = 0
      // Mixed steps: rows prefill different chunk sizes, then decode together.
      worst = Math.max(worst, yield* step(rows, [9, 6, 3, 2], expected))
      worst = Math.max(worst, yield* step(rows, [1, 4, 8, 1], expected))
      for (let i = 0; i < 2; i++) worst = Math.max(worst, yield* step(rows, [1, 1, 1, 1], expected))
      worst = Math.max(worst, yield* step(rows, [5, 3, 6, 1], expected))
      expect(rows.map((r) => r.cached)).toEqual([17, 15, 19, 6])
      expect(worst).toBeLessThan(TOLERANCE)
    }).pipe(Effect.provide(OnnxModelRunner.layer(modelDir, { blockSize: BLOCK_SIZE, numBlocks: 64 }))),
  )
})

describe("kvfill graphs vs the reference projection", () => {
  it.effect(
    "each early exit's kvfill writes norm + K/V projection + RoPE of its hidden state for every later layer",
    () =>
      Effect.gen(function* () {
        const runner = yield* ModelRunner
        const { spec } = runner
        const { hidden: D, headDim } = spec.dims
        const ids = REFERENCE_IDS.slice(0, 11)
        const positions = referenceRun(ids)
        // Run the sequence in one call to collect each exit's hidden states.
        const row: Row = { ids, blocks: [0, 1, 2], cached: 0 }
        const batch = buildRowBatch([{ cached: 0, count: ids.length, blocks: row.blocks }], runner.blockSize)
        let hidden = yield* runner.embed(BigInt64Array.from(ids, BigInt), 1, ids.length)
        let worst = 0
        for (let s = 0; s < spec.segments.length; s++) {
          hidden = yield* runner.segment(s, hidden, batch)
          const exitIndex = spec.exits.findIndex((e) => e.layer === spec.segments[s]!.endLayer && e.kvfill)
          if (exitIndex < 0) continue
          const exitLayer = spec.exits[exitIndex]!.layer
          // Fill into fresh blocks 10.. so the segment-written K/V cannot be mistaken for the fill.
          const slots = Int32Array.from(ids, (_, p) => 10 * BLOCK_SIZE + p)
          yield* runner.kvFill(exitIndex, hidden, batch.positions, slots)
          for (let p = 0; p < ids.length; p++) {
            const exitHidden = Float32Array.from(hidden.subarray(p * D, (p + 1) * D))
            expect(maxAbsDiff(exitHidden, positions[p]!.hidden[exitLayer - 1]!)).toBeLessThan(TOLERANCE)
            for (let l = exitLayer; l < spec.dims.layers; l++) {
              const want = reference.projectKv(l, exitHidden, p)
              const got = runner.readKv(l, slots[p]!)
              worst = Math.max(worst, maxAbsDiff(got.k, interleavedToHalfRow(want.k, headDim)))
              worst = Math.max(worst, maxAbsDiff(got.v, want.v))
            }
          }
        }
        expect(worst).toBeLessThan(TOLERANCE)
      }).pipe(Effect.provide(OnnxModelRunner.layer(modelDir, { blockSize: BLOCK_SIZE, numBlocks: 64 }))),
  )
})
