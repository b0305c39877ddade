/**
 * Defaults of self-speculative decoding (see GenerationRequest.speculative): the draft exit nearest half the depth,
 * up to 4 drafted tokens a verification, and drafting stops early once the draft head's top probability is below 0.4.
 */
import type { SpeculativeRequest } from "./Generation.js"
import type { ModelSpec } from "./ModelSpec.js"

export const DEFAULT_MAX_DRAFT = 4
export const DEFAULT_DRAFT_THRESHOLD = 0.4

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
