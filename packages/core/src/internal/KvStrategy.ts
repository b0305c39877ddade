/**
 * What happens to the K/V of the layers a token skipped when it exits early. Each request chooses its strategy;
 * one step can hold rows of both.
 *
 * - fill: the K/V of the skipped layers are computed from the token's exit hidden state (the paper's "fill"), in one
 *   kvfill call per step for every row that exited (the earliest exit's graph; each row writes only its layers).
 *   Filled K/V approximate the full-depth ones, so nothing from there on enters the prefix cache.
 * - recompute: the token is left pending at its exit layer, with its hidden state there; the next time the sequence
 *   runs through those layers, its pending tokens join the row and are computed exactly.
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

export const makeRecompute = ({ runner }: Pick<Deps, "runner">): KvStrategy => {
  const { spec } = runner
  const D = spec.dims.hidden
  return {
    name: "recompute",
    beforeSegment: (index, row) => {
      const { firstLayer } = spec.segments[index]!
      // Pending tokens stopped at this segment's first layer join ahead of the row's tokens.
      const joiners = row.seq.pending.filter((p) => p.layer === firstLayer)
      if (joiners.length === 0) return
      const hidden = new Float32Array((joiners.length + row.positions.length) * D)
      joiners.forEach((p, i) => hidden.set(p.hidden, i * D))
      hidden.set(row.hidden, joiners.length * D)
      row.positions = [...joiners.map((p) => p.position), ...row.positions]
      row.hidden = hidden
      row.seq.pending = row.seq.pending.filter((p) => p.layer !== firstLayer)
    },
    skipped: (exitIndex, row) => {
      const layer = spec.exits[exitIndex]!.layer
      const stopped = row.positions.map((position, i) => ({
        position,
        hidden: row.hidden.slice(i * D, (i + 1) * D),
        layer,
      }))
      row.seq.pending = [...row.seq.pending, ...stopped].sort((a, b) => a.position - b.position)
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
  seq.exact = Math.min(seq.computed, seq.pending[0]?.position ?? seq.computed, seq.exact)
  kv.commit(seq.blocks!, seq.tokens, seq.exact)
}
