/**
 * What happens to the K/V of the layers a token skipped when it exits early. Each request chooses its strategy;
 * one step can hold rows of both. Under both, a token that exits keeps its hidden state at the exit, and its K/V stay
 * missing from its exit layer on (the KV cache's fill levels stop below it) until a later token of the sequence
 * needs them: one that runs a segment from a layer where positions are missing.
 *
 * - fill: the missing K/V are computed from the kept exit hidden states (the paper's "fill"), in one kvfill call for
 *   every row that needs them before that segment (the earliest exit's graph; each position writes only the layers
 *   it skipped). The values are the ones an immediate fill gives; deferring the call means a sequence whose tokens
 *   keep exiting pays no fill at all, and one that goes deep now and then pays one call for all its pending tokens.
 *   Filled K/V approximate the full-depth ones, so nothing from there on enters the prefix cache.
 * - recompute: the missing positions join the row ahead of its token, and are computed exactly.
 */
import { Effect } from "effect"
import type { KvStrategy as KvStrategyName } from "../EarlyExit.js"
import type { RunnerError } from "../Errors.js"
import type { KvCacheShape } from "../KvCache.js"
import type { ModelRunnerShape } from "../ModelRunner.js"
import type { DecodeRow, Sequence } from "./Sequence.js"
import type { Statistics } from "./Statistics.js"

export interface KvStrategy {
  readonly name: KvStrategyName
  /** Before segment `index` runs for `rows` (the step's rows that use this strategy): they get the K/V it reads. */
  readonly beforeSegment: (index: number, rows: ReadonlyArray<DecodeRow>) => Effect.Effect<void, RunnerError>
  /** The row exits at early exit `exitIndex`: the layers after it were skipped. */
  readonly skipped: (exitIndex: number, row: DecodeRow) => void
}

interface Deps {
  readonly runner: ModelRunnerShape
  readonly kv: KvCacheShape
  readonly statistics: Statistics
}

/** Keeps the exit hidden state of each of the row's positions until its K/V are computed. */
const keepExitStates = (D: number) => (_exitIndex: number, row: DecodeRow) => {
  row.positions.forEach((position, i) => {
    row.seq.exitStates.set(position, row.hidden.slice(i * D, (i + 1) * D))
  })
}

/** The row's positions missing from `layer` (they exited before it), ahead of its first position. */
const missingFrom = (kv: KvCacheShape, row: DecodeRow, layer: number) => {
  const from = kv.filled(row.seq.blocks!, layer)
  return { from, count: Math.max(0, row.positions[0]! - from) }
}

const exitState = (seq: Sequence, position: number, layer: number) => {
  const state = seq.exitStates.get(position)
  if (state === undefined) throw new Error(`no exit state for position ${position} missing at layer ${layer}`)
  return state
}

export const makeRecompute = ({ runner, kv }: Pick<Deps, "runner" | "kv">): KvStrategy => {
  const { spec } = runner
  const D = spec.dims.hidden
  const carry = (index: number, row: DecodeRow) => {
    const { firstLayer } = spec.segments[index]!
    // Positions missing from this segment's first layer (they stopped at the exit there) join ahead of the row.
    const { from, count } = missingFrom(kv, row, firstLayer)
    if (count === 0) return
    const hidden = new Float32Array((count + row.positions.length) * D)
    for (let i = 0; i < count; i++) {
      hidden.set(exitState(row.seq, from + i, firstLayer), i * D)
      row.seq.exitStates.delete(from + i)
    }
    hidden.set(row.hidden, count * D)
    row.positions = [...Array.from({ length: count }, (_, i) => from + i), ...row.positions]
    row.hidden = hidden
  }
  return {
    name: "recompute",
    beforeSegment: (index, rows) =>
      Effect.sync(() => {
        for (const row of rows) carry(index, row)
      }),
    skipped: keepExitStates(D),
  }
}

export const makeFill = ({ runner, kv, statistics }: Deps): KvStrategy => {
  const { spec } = runner
  const { layers } = spec.dims
  const D = spec.dims.hidden
  const exitAt = new Map(spec.exits.map((e, i) => [e.layer, i]))
  return {
    name: "fill",
    beforeSegment: (index, rows) =>
      Effect.suspend(() => {
        const { firstLayer } = spec.segments[index]!
        // Fill levels are contiguous, so a sequence that needs any position here is filled at every layer: all its
        // missing positions, each from its own exit layer on.
        const due = rows.flatMap((row) => {
          if (missingFrom(kv, row, firstLayer).count === 0) return []
          const { from, count } = missingFrom(kv, row, layers - 1)
          return [{ row, from, count }]
        })
        if (due.length === 0) return Effect.void
        const total = due.reduce((n, d) => n + d.count, 0)
        const hidden = new Float32Array(total * D)
        const positions = new BigInt64Array(total)
        const slots = new Int32Array(total)
        const fromLayers = new Int32Array(total)
        let earliest = layers
        let i = 0
        for (const { row, from, count } of due) {
          const blocks = row.seq.blocks!
          for (let position = from; position < from + count; position++, i++) {
            // The layer it exited at: the first whose fill level stops at or below it.
            let exitLayer = 0
            while (kv.filled(blocks, exitLayer) > position) exitLayer++
            earliest = Math.min(earliest, exitLayer)
            hidden.set(exitState(row.seq, position, exitLayer), i * D)
            positions[i] = BigInt(position)
            slots[i] = kv.slot(blocks, position)
            fromLayers[i] = exitLayer
          }
        }
        const exitIndex = exitAt.get(earliest)
        if (exitIndex === undefined) throw new Error(`fill: positions stop at layer ${earliest}, which has no exit`)
        const started = performance.now()
        return runner.kvFill(exitIndex, hidden, positions, slots, fromLayers).pipe(
          Effect.ensuring(
            Effect.sync(() => {
              statistics.counters.kvFillMs += performance.now() - started
            }),
          ),
          Effect.tap(() =>
            Effect.sync(() => {
              for (const { row, from, count } of due) {
                for (let l = earliest; l < layers; l++) kv.markFilled(row.seq.blocks!, l, from + count)
                for (let position = from; position < from + count; position++) row.seq.exitStates.delete(position)
                // Filled K/V approximate the full-depth ones: nothing from here on enters the prefix cache.
                row.seq.exact = Math.min(row.seq.exact, from)
              }
            }),
          ),
        )
      }),
    skipped: keepExitStates(D),
  }
}

/** Publishes what is exact of a sequence's K/V (full-depth computed, nothing pending before it) to the prefix cache. */
export const commitExact = (kv: KvCacheShape, seq: Sequence) => {
  let filled = seq.computed
  for (let l = 0; l < kv.layers; l++) filled = Math.min(filled, kv.filled(seq.blocks!, l))
  seq.exact = Math.min(filled, seq.exact)
  kv.commit(seq.blocks!, seq.tokens, seq.exact)
}
