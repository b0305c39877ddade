/**
 * What happens to the K/V of the layers a token skipped when it exits early. Each request chooses its strategy;
 * one step can hold rows of both.
 *
 * - fill: the K/V of the skipped layers are computed from the token's exit hidden state (the paper's "fill"), in one
 *   kvfill call per step for every row that exited (the earliest exit's graph; each row writes only its layers).
 *   Filled K/V approximate the full-depth ones, so nothing from there on enters the prefix cache.
 * - recompute: the token's K/V stay missing from its exit layer on (the KV cache's fill levels stop below it) and its
 *   hidden state there is kept; the next time the sequence runs a segment from a layer where positions are missing,
 *   they join the row ahead of its token and are computed exactly.
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
  /** Before segment `index` runs: the row takes in the tokens it must carry through it. */
  readonly beforeSegment: (index: number, row: DecodeRow) => void
  /** The row exits at early exit `exitIndex`: the layers after it were skipped. */
  readonly skipped: (exitIndex: number, row: DecodeRow) => void
  /** At the end of the step's forward pass. */
  readonly endStep: Effect.Effect<void, RunnerError>
}

interface Deps {
  readonly runner: ModelRunnerShape
  readonly kv: KvCacheShape
  readonly statistics: Statistics
}

export const makeRecompute = ({ runner, kv }: Pick<Deps, "runner" | "kv">): KvStrategy => {
  const { spec } = runner
  const D = spec.dims.hidden
  return {
    name: "recompute",
    beforeSegment: (index, row) => {
      const { firstLayer } = spec.segments[index]!
      // Positions missing from this segment's first layer (they stopped at the exit there) join ahead of the row.
      const from = kv.filled(row.seq.blocks!, firstLayer)
      const first = row.positions[0]!
      if (from >= first) return
      const joining = first - from
      const hidden = new Float32Array((joining + row.positions.length) * D)
      for (let i = 0; i < joining; i++) {
        const state = row.seq.exitStates.get(from + i)
        if (state === undefined)
          throw new Error(`recompute: no exit state for position ${from + i} at layer ${firstLayer}`)
        hidden.set(state, i * D)
        row.seq.exitStates.delete(from + i)
      }
      hidden.set(row.hidden, joining * D)
      row.positions = [...Array.from({ length: joining }, (_, i) => from + i), ...row.positions]
      row.hidden = hidden
    },
    skipped: (_exitIndex, row) => {
      row.positions.forEach((position, i) => {
        row.seq.exitStates.set(position, row.hidden.slice(i * D, (i + 1) * D))
      })
    },
    endStep: Effect.void,
  }
}

export const makeFill = ({ runner, kv, statistics }: Deps): KvStrategy => {
  const { spec } = runner
  const D = spec.dims.hidden
  let fills: Array<{ readonly row: DecodeRow; readonly exitIndex: number }> = []
  return {
    name: "fill",
    beforeSegment: () => {},
    skipped: (exitIndex, row) => {
      fills.push({ row, exitIndex })
    },
    // No row of a step reads another's skipped K/V, so the fill waits for the step's end and takes one call.
    endStep: Effect.suspend(() => {
      const step = fills
      fills = []
      if (step.length === 0) return Effect.void
      const first = Math.min(...step.map((f) => f.exitIndex))
      const count = step.reduce((n, f) => n + f.row.positions.length, 0)
      const hidden = new Float32Array(count * D)
      const positions = new BigInt64Array(count)
      const slots = new Int32Array(count)
      const fromLayers = new Int32Array(count)
      let i = 0
      for (const { row, exitIndex } of step) {
        hidden.set(row.hidden, i * D)
        for (const position of row.positions) {
          positions[i] = BigInt(position)
          fromLayers[i] = spec.exits[exitIndex]!.layer
          slots[i++] = kv.slot(row.seq.blocks!, position)
        }
      }
      const started = performance.now()
      return runner.kvFill(first, hidden, positions, slots, fromLayers).pipe(
        Effect.ensuring(
          Effect.sync(() => {
            statistics.counters.kvFillMs += performance.now() - started
          }),
        ),
        Effect.tap(() =>
          Effect.sync(() => {
            for (const { row, exitIndex } of step) {
              const upTo = row.positions.at(-1)! + 1
              for (let l = spec.exits[exitIndex]!.layer; l < spec.dims.layers; l++)
                kv.markFilled(row.seq.blocks!, l, upTo)
              // Filled K/V approximate the full-depth ones: nothing from here on enters the prefix cache.
              row.seq.exact = Math.min(row.seq.exact, row.positions[0]!)
            }
          }),
        ),
      )
    }),
  }
}

/** Publishes what is exact of a sequence's K/V (full-depth computed, nothing pending before it) to the prefix cache. */
export const commitExact = (kv: KvCacheShape, seq: Sequence) => {
  let filled = seq.computed
  for (let l = 0; l < kv.layers; l++) filled = Math.min(filled, kv.filled(seq.blocks!, l))
  seq.exact = Math.min(filled, seq.exact)
  kv.commit(seq.blocks!, seq.tokens, seq.exact)
}
