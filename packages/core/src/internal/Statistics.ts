/**
 * The engine's counters: steps, tokens, exits taken and what deciding cost at each early exit. The forward pass and
 * emission write them; `snapshot` reads them for `Engine.stats`.
 */
import type { EngineStats } from "../Engine.js"
import type { GenerationSummary } from "../Generation.js"
import type { KvCacheStats } from "../KvCache.js"
import type { ModelWeightBytes } from "../ModelRunner.js"
import type { ModelSpec } from "../ModelSpec.js"

export interface ExitCounters {
  readonly layer: number
  scored: number
  headRows: number
  exited: number
  headMs: number
  decisionMs: number
}

/** Counts a token generated at `exitLayer` into `histogram`. */
export const countExit = (histogram: Record<number, number>, exitLayer: number) => {
  histogram[exitLayer] = (histogram[exitLayer] ?? 0) + 1
}

/** The early-exit figures of the tokens in `histogram`, on a model of `layers` layers. */
export const summarizeExits = (histogram: Readonly<Record<number, number>>, layers: number): GenerationSummary => {
  let tokens = 0
  let depth = 0
  for (const [layer, n] of Object.entries(histogram)) {
    tokens += n
    depth += Number(layer) * n
  }
  return {
    tokens,
    exitHistogram: { ...histogram },
    meanExitDepth: tokens === 0 ? 0 : depth / tokens,
    layersSkipped: tokens * layers - depth,
    layers,
  }
}

export const makeStatistics = (spec: ModelSpec) => {
  const counters = {
    steps: 0,
    prefillTokens: 0,
    decodeTokens: 0,
    kvFillMs: 0,
    decodeSegmentMs: 0,
    decodeLayerRows: 0,
  }
  const exits: ReadonlyArray<ExitCounters> = spec.exits
    .slice(0, -1)
    .map((e) => ({ layer: e.layer, scored: 0, headRows: 0, exited: 0, headMs: 0, decisionMs: 0 }))
  const exitHistogram: Record<number, number> = {}
  const speculative = { drafted: 0, accepted: 0, kept: 0, verifications: 0 }

  /** A token was generated at `exitLayer`. */
  const token = (exitLayer: number) => countExit(exitHistogram, exitLayer)

  const snapshot = (
    queues: { readonly running: number; readonly waiting: number; readonly preemptions: number },
    kv: KvCacheStats,
    weights: ModelWeightBytes,
  ): EngineStats => {
    const { exitHistogram: histogram, meanExitDepth, layersSkipped } = summarizeExits(exitHistogram, spec.dims.layers)
    return {
      ...counters,
      ...queues,
      exitHistogram: histogram,
      meanExitDepth,
      layersSkipped,
      headMs: exits.reduce((ms, e) => ms + e.headMs + e.decisionMs, 0),
      exits: exits.map((e) => ({ ...e })),
      speculative: { ...speculative },
      kv,
      weights: { ...weights },
    }
  }

  return { counters, exits, speculative, token, snapshot }
}

export type Statistics = ReturnType<typeof makeStatistics>
