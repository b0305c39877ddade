/**
 * The row batch builder the forward passes use: its reused buffers and its memo of the last layout must give, call
 * after call, the batch a fresh build gives — including after a block table changed in place (copy-on-write and
 * rollback do that) — and the attention mask must show each token exactly the positions before it.
 */
import { describe, expect, it } from "@effect/vitest"
import fc from "fast-check"
import { MASKED } from "../src/GraphNames.js"
import type { RowBatch } from "../src/ModelRunner.js"
import { buildRowBatch, makeRowBatchBuilder, type RowInput } from "../src/RowBatch.js"

const BLOCK = 4

const plain = (b: RowBatch) => ({
  rows: b.rows,
  tokens: b.tokens,
  maxBlocks: b.maxBlocks,
  positions: Array.from(b.positions),
  blockTable: Array.from(b.blockTable),
  mask: Array.from(b.mask),
  slots: Array.from(b.slots),
})

const row = fc
  .record({ cached: fc.integer({ min: 0, max: 13 }), count: fc.integer({ min: 1, max: 5 }) })
  .chain(({ cached, count }) =>
    fc
      .uniqueArray(fc.integer({ min: 0, max: 63 }), {
        minLength: Math.ceil((cached + count) / BLOCK),
        maxLength: Math.ceil((cached + count) / BLOCK),
      })
      .map((blocks): RowInput => ({ cached, count, blocks })),
  )

describe("row batches", () => {
  it("a reusing builder gives, call after call, what a fresh build gives", () => {
    fc.assert(
      fc.property(fc.array(fc.array(row, { minLength: 1, maxLength: 4 }), { minLength: 1, maxLength: 6 }), (calls) => {
        const build = makeRowBatchBuilder(BLOCK)
        for (const rows of calls) {
          // Each call twice in a row: the second one is served by the memo.
          expect(plain(build(rows))).toEqual(plain(buildRowBatch(rows, BLOCK)))
          expect(plain(build(rows))).toEqual(plain(buildRowBatch(rows, BLOCK)))
        }
      }),
    )
  })

  it("a block table changed in place is a new layout", () => {
    const build = makeRowBatchBuilder(BLOCK)
    const blocks = [3, 7]
    const rows = [{ cached: 5, count: 1, blocks }]
    expect(Array.from(build(rows).slots)).toEqual([7 * BLOCK + 1])
    blocks[1] = 9 // copy-on-write of the last block
    expect(Array.from(build(rows).slots)).toEqual([9 * BLOCK + 1])
    expect(Array.from(build(rows).blockTable)).toEqual([3, 9])
  })

  it("each token sees the cached positions and the new ones up to its own, and padding sees itself", () => {
    const batch = buildRowBatch(
      [
        { cached: 6, count: 1, blocks: [0, 1] },
        { cached: 1, count: 3, blocks: [2] },
      ],
      BLOCK,
    )
    const keys = batch.maxBlocks * BLOCK + batch.tokens
    const visible = (r: number, t: number) => {
      const at = (r * batch.tokens + t) * keys
      return Array.from(batch.mask.subarray(at, at + keys), (m, k) => (m === 0 ? k : -1)).filter((k) => k >= 0)
    }
    const cached = batch.maxBlocks * BLOCK
    expect(visible(0, 0)).toEqual([0, 1, 2, 3, 4, 5, cached])
    expect(visible(0, 1)).toEqual([cached + 1]) // padding
    expect(visible(1, 2)).toEqual([0, cached, cached + 1, cached + 2])
    expect(batch.mask.every((m) => m === 0 || m === MASKED)).toBe(true)
  })
})
