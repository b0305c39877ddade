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

/** Whether two row lists lay out the same batch: the same positions, in the same blocks. */
const sameLayout = (a: ReadonlyArray<RowInput>, b: ReadonlyArray<RowInput>, blockSize: number) => {
  if (a.length !== b.length) return false
  for (let r = 0; r < a.length; r++) {
    const x = a[r]!
    const y = b[r]!
    if (x.cached !== y.cached || x.count !== y.count) return false
    const used = Math.ceil((x.cached + x.count) / blockSize)
    for (let i = 0; i < used; i++) if (x.blocks[i] !== y.blocks[i]) return false
  }
  return true
}

/**
 * A builder that lays out batches without allocating per call: its typed arrays grow as needed and are reused, and a
 * call with the same layout as the previous one (the next segment of a step that no row left) returns the previous
 * batch as it is. A batch is valid until the builder's next call with another layout: use it for the segment call
 * it was built for, and do not keep it.
 */
export const makeRowBatchBuilder = (blockSize: number) => {
  let positionsStore = new BigInt64Array(0)
  let blockStore = new Int32Array(0)
  let slotStore = new Int32Array(0)
  let maskStore = new Float32Array(0)
  let last: { readonly rows: ReadonlyArray<RowInput>; readonly batch: RowBatch } | undefined
  return (rows: ReadonlyArray<RowInput>): RowBatch => {
    // The layout is compared with a copy: block tables change in place (copy-on-write, rollback).
    if (last && sameLayout(last.rows, rows, blockSize)) return last.batch
    const R = rows.length
    let T = 1
    let MB = 1 // at least one block column, so the gather never sees an empty index tensor; the mask hides it
    for (const row of rows) {
      T = Math.max(T, row.count)
      MB = Math.max(MB, Math.ceil(row.cached / blockSize))
    }
    const keys = MB * blockSize + T
    if (positionsStore.length < R * T) positionsStore = new BigInt64Array(2 * R * T)
    if (slotStore.length < R * T) slotStore = new Int32Array(2 * R * T)
    if (blockStore.length < R * MB) blockStore = new Int32Array(2 * R * MB)
    if (maskStore.length < R * T * keys) maskStore = new Float32Array(2 * R * T * keys)
    const positions = positionsStore.subarray(0, R * T).fill(0n)
    const slots = slotStore.subarray(0, R * T).fill(-1)
    const blockTable = blockStore.subarray(0, R * MB)
    const mask = maskStore.subarray(0, R * T * keys).fill(MASKED)
    for (let r = 0; r < R; r++) {
      const row = rows[r]!
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
    }
    const batch = { rows: R, tokens: T, positions, blockTable, maxBlocks: MB, mask, slots }
    const copies = rows.map((r) => ({
      cached: r.cached,
      count: r.count,
      blocks: r.blocks.slice(0, Math.ceil((r.cached + r.count) / blockSize)),
    }))
    last = { rows: copies, batch }
    return batch
  }
}

/** One batch in arrays of its own (for callers that keep it); see makeRowBatchBuilder for the engine's path. */
export const buildRowBatch = (rows: ReadonlyArray<RowInput>, blockSize: number): RowBatch =>
  makeRowBatchBuilder(blockSize)(rows)
