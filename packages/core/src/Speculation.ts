/**
 * Defaults of self-speculative decoding (see GenerationRequest.speculative): the draft exit nearest half the depth,
 * 4 drafted tokens a verification, and no early stop of drafting by the draft head's confidence (threshold 0). On the
 * default model a threshold shortened drafts more than it raised acceptance: at 0.2 to 0.3 the tokens kept per
 * verification fell from 3.5 to 2.0-2.6 and 16 streams got slower than full depth (BENCHMARKS.md).
 */
import type { SpeculativeRequest } from "./Generation.js"
import type { ModelSpec } from "./ModelSpec.js"

export const DEFAULT_MAX_DRAFT = 4
export const DEFAULT_DRAFT_THRESHOLD = 0

/** The early exit nearest half the model's depth (the shallower of two equally near); undefined with no early exit. */
export const defaultDraftExit = (spec: ModelSpec): number | undefined => {
  const early = spec.exits.slice(0, -1).map((e) => e.layer)
  if (early.length === 0) return undefined
  const half = spec.dims.layers / 2
  return early.reduce((best, layer) => (Math.abs(layer - half) < Math.abs(best - half) ? layer : best))
}

/** A speculative request with the defaults filled in; undefined when the model has no early exit to draft with. */
export const speculativeDefaults = (
  spec: ModelSpec,
  given: Partial<SpeculativeRequest> = {},
): SpeculativeRequest | undefined => {
  const exit = given.exit ?? defaultDraftExit(spec)
  if (exit === undefined) return undefined
  return {
    exit,
    maxDraft: given.maxDraft ?? DEFAULT_MAX_DRAFT,
    threshold: given.threshold ?? DEFAULT_DRAFT_THRESHOLD,
  }
}
