/**
 * The engine's counters: steps, tokens, exits taken and what deciding cost at each early exit. The forward pass and
 * emission write them; `snapshot` reads them for `Engine.stats`.
 */
import type { EngineStats } from "../Engine.js"
import type { KvCacheStats } from "../KvCache.js"
import type { ModelSpec } from "../ModelSpec.js"

export interface ExitCounters {
  readonly layer: number
  scored: number
  headRows: number
  exited: number
  headMs: number
  decisionMs: number
}

export const makeStatistics = (spec: ModelSpec) => {
  const counters = {
    steps: 0,
    prefillTokens: 0,
    decodeTokens: 0,
    layersSkipped: 0,
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
  const token = (exitLayer: number) => {
    exitHistogram[exitLayer] = (exitHistogram[exitLayer] ?? 0) + 1
    counters.layersSkipped += spec.dims.layers - exitLayer
  }

  const snapshot = (
    queues: { readonly running: number; readonly waiting: number; readonly preemptions: number },
    kv: KvCacheStats,
  ): EngineStats => {
    const generated = Object.values(exitHistogram).reduce((a, b) => a + b, 0)
    const depth = Object.entries(exitHistogram).reduce((sum, [layer, n]) => sum + Number(layer) * n, 0)
    return {
      ...counters,
      ...queues,
      exitHistogram: { ...exitHistogram },
      meanExitDepth: generated === 0 ? 0 : depth / generated,
      headMs: exits.reduce((ms, e) => ms + e.headMs + e.decisionMs, 0),
      exits: exits.map((e) => ({ ...e })),
      speculative: { ...speculative },
      kv,
    }
  }

  return { counters, exits, speculative, token, snapshot }
}

export type Statistics = ReturnType<typeof makeStatistics>
