/**
 * Lays out rows of new tokens for a segment call: positions, block table, pool slots and the additive
 * attention mask of the padded [rows, tokens] layout (see GraphNames and ModelRunner.RowBatch).
 */
import { MASKED } from "./GraphNames.js"
import type { RowBatch } from "./ModelRunner.js"

export interface RowInput {
  /** Positions already in the cache for this row (they are attended through the block table). */
  readonly cached: number
  /** New tokens of this row in this call (≥ 1). */
  readonly count: number
  /** The row's block table: physical block ids covering at least positions [0, cached + count). */
  readonly blocks: ReadonlyArray<number>
}

export const buildRowBatch = (rows: ReadonlyArray<RowInput>, blockSize: number): RowBatch => {
  const R = rows.length
  const T = Math.max(...rows.map((r) => r.count))
  // At least one block column, so the gather never sees an empty index tensor; the mask hides it.
  const MB = Math.max(1, ...rows.map((r) => Math.ceil(r.cached / blockSize)))
  const keys = MB * blockSize + T
  const positions = new BigInt64Array(R * T)
  const blockTable = new Int32Array(R * MB)
  const slots = new Int32Array(R * T).fill(-1)
  const mask = new Float32Array(R * T * keys).fill(MASKED)
  rows.forEach((row, r) => {
    for (let b = 0; b < MB; b++) blockTable[r * MB + b] = row.blocks[b] ?? row.blocks[0] ?? 0
    for (let t = 0; t < T; t++) {
      const i = r * T + t
      const maskRow = i * keys
      if (t >= row.count) {
        // Padding: attends to itself only, so softmax stays finite; its outputs are ignored.
        mask[maskRow + MB * blockSize + t] = 0
        continue
      }
      const position = row.cached + t
      positions[i] = BigInt(position)
      slots[i] = row.blocks[Math.floor(position / blockSize)]! * blockSize + (position % blockSize)
      mask.fill(0, maskRow, maskRow + row.cached)
      mask.fill(0, maskRow + MB * blockSize, maskRow + MB * blockSize + t + 1)
    }
  })
  return { rows: R, tokens: T, positions, blockTable, maxBlocks: MB, mask, slots }
}
