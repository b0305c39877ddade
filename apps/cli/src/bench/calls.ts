/**
 * What each model runner call costs, timed directly (no engine around it), and what those costs allow early exit to
 * gain: the speedup of a token that exits at an early exit over one that runs full depth counts every call either
 * token needs (the embedding, the segments it runs, the head), not only the layers. The head and the embedding are
 * paid whatever the exit, so an exit after half the layers gains less than 2x even with no engine overhead at all.
 * When every token exits, neither KV strategy computes the skipped layers' K/V (both wait for a later token that
 * needs them); `withFill` is the figure if each token's were filled at once, as the paper's fill does.
 */
import { ModelRunner } from "@offramp/core/ModelRunner"
import { buildRowBatch } from "@offramp/core/RowBatch"
import { Effect } from "effect"
import { median } from "./quality.js"

/** Positions already cached in each synthetic row (attention reads them). */
const CONTEXT = 64

export interface CallCosts {
  readonly streams: number
  /** Median µs of one call for `streams` decode rows. */
  readonly embedUs: number
  readonly segmentUs: ReadonlyArray<number>
  /** The head's statistics (greedy decoding), and with the logits copied out (sampling). */
  readonly headUs: number
  readonly headLogitsUs: number
  /** Per early exit: the K/V fill of the layers after it, and its classifier (null: none). */
  readonly kvFillUs: ReadonlyArray<number>
  readonly classifyUs: ReadonlyArray<number | null>
  /**
   * Per early exit: full-depth calls ÷ the calls of a token that exits there (`speedup`), and ÷ those calls plus the
   * fill of its skipped layers (`withFill`).
   */
  readonly forcedExitBound: ReadonlyArray<{
    readonly layer: number
    readonly speedup: number
    readonly withFill: number
  }>
}

/** Median µs per call of `f` over `rounds` rounds of `calls` calls, after a warm-up. */
const time = <E>(calls: number, rounds: number, f: () => Effect.Effect<unknown, E>) =>
  Effect.gen(function* () {
    for (let i = 0; i < calls; i++) yield* f()
    const perRound: Array<number> = []
    for (let r = 0; r < rounds; r++) {
      const started = performance.now()
      for (let i = 0; i < calls; i++) yield* f()
      perRound.push(((performance.now() - started) * 1000) / calls)
    }
    return median(perRound)
  })

export const measureCalls = (streams: number, calls = 200, rounds = 5) =>
  Effect.gen(function* () {
    const runner = yield* ModelRunner
    const { dims, exits, segments } = runner.spec
    const D = dims.hidden
    const blocksPerRow = Math.ceil((CONTEXT + 1) / runner.blockSize)
    const batch = buildRowBatch(
      Array.from({ length: streams }, (_, r) => ({
        cached: CONTEXT,
        count: 1,
        blocks: Array.from({ length: blocksPerRow }, (_, b) => r * blocksPerRow + b),
      })),
      runner.blockSize,
    )
    const hidden = Float32Array.from({ length: streams * D }, (_, i) => Math.sin(i))
    const previous = Float32Array.from({ length: streams * D }, (_, i) => Math.cos(i))
    const ids = BigInt64Array.from({ length: streams }, (_, i) => BigInt(5 + i))
    const positions = new BigInt64Array(streams).fill(BigInt(CONTEXT))
    const slots = Int32Array.from({ length: streams }, (_, r) => r * blocksPerRow * runner.blockSize + CONTEXT)
    const finalExit = exits.length - 1

    const embedUs = yield* time(calls, rounds, () => runner.embed(ids, streams, 1))
    const segmentUs = yield* Effect.forEach(segments, (_, i) =>
      time(calls, rounds, () => runner.segment(i, hidden, batch)),
    )
    const headUs = yield* time(calls, rounds, () => runner.head(finalExit, hidden, streams, false))
    const headLogitsUs = yield* time(calls, rounds, () => runner.head(finalExit, hidden, streams, true))
    const early = exits.slice(0, -1)
    const kvFillUs = yield* Effect.forEach(early, (_, i) =>
      time(calls, rounds, () => runner.kvFill(i, hidden, positions, slots)),
    )
    const classifyUs = yield* Effect.forEach(early, (exit, i) =>
      exit.classifier === undefined
        ? Effect.succeed(null)
        : time(calls, rounds, () => runner.classify(i, hidden, previous, streams)),
    )
    const sum = (xs: ReadonlyArray<number>) => xs.reduce((a, b) => a + b, 0)
    const full = embedUs + sum(segmentUs) + headUs
    const forcedExitBound = early.map((exit, i) => {
      const upTo = embedUs + sum(segmentUs.filter((_, s) => segments[s]!.endLayer <= exit.layer)) + headUs
      return { layer: exit.layer, speedup: full / upTo, withFill: full / (upTo + kvFillUs[i]!) }
    })
    return {
      streams,
      embedUs,
      segmentUs,
      headUs,
      headLogitsUs,
      kvFillUs,
      classifyUs,
      forcedExitBound,
    } satisfies CallCosts
  })

export const describeCalls = (c: CallCosts) =>
  [
    `${String(c.streams).padStart(3)} streams, µs per call:`,
    `embed ${c.embedUs.toFixed(0)}`,
    `segments ${c.segmentUs.map((u) => u.toFixed(0)).join("/")}`,
    `head ${c.headUs.toFixed(0)} (with logits ${c.headLogitsUs.toFixed(0)})`,
    `kvfill ${c.kvFillUs.map((u) => u.toFixed(0)).join("/")}`,
    `classifier ${c.classifyUs.map((u) => (u === null ? "-" : u.toFixed(1))).join("/")};`,
    `forced-exit bound ${c.forcedExitBound
      .map((b) => `L${b.layer} x${b.speedup.toFixed(2)} (filled at once x${b.withFill.toFixed(2)})`)
      .join(", ")}`,
  ].join("  ")
