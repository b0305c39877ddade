/**
 * Early-exit settings resolved against a model: per-exit thresholds, the minimum exit layer, CALM's decay.
 */
import { describe, expect, it } from "vitest"
import { FULL_DEPTH, resolveEarlyExit, thresholdAt } from "../src/EarlyExit.js"
import type { ModelSpec } from "../src/ModelSpec.js"

const spec = {
  exits: [{ layer: 2 }, { layer: 4 }, { layer: 6 }, { layer: 8 }],
} as unknown as ModelSpec

describe("resolveEarlyExit", () => {
  it("gives each exit its threshold, closes exits below the minimum and the final one", () => {
    const resolved = resolveEarlyExit(spec, {
      ...FULL_DEPTH,
      threshold: 0.9,
      thresholds: { "4": 0.7 },
      minExitLayer: 3,
    })
    expect(resolved.thresholds).toEqual([Infinity, 0.7, 0.9, Infinity])
    expect(resolved.active).toBe(true)
  })

  it("full depth is inactive, so no intermediate head runs", () => {
    expect(resolveEarlyExit(spec, FULL_DEPTH).active).toBe(false)
    expect(resolveEarlyExit(spec, { ...FULL_DEPTH, threshold: 1.01 }).active).toBe(false)
  })
})

describe("thresholdAt (CALM's decaying schedule)", () => {
  const resolved = resolveEarlyExit(spec, { ...FULL_DEPTH, threshold: 0.8, decayTau: 4 })

  it("starts at λ and decays towards 0.9λ over the generation", () => {
    expect(thresholdAt(resolved, 0, 0, 100)).toBeCloseTo(0.8, 12)
    expect(thresholdAt(resolved, 0, 50, 100)).toBeCloseTo(0.9 * 0.8 + 0.1 * 0.8 * Math.exp(-2), 12)
    expect(thresholdAt(resolved, 0, 100, 100)).toBeCloseTo(0.72 + 0.08 * Math.exp(-4), 12)
    const values = Array.from({ length: 20 }, (_, t) => thresholdAt(resolved, 1, t * 5, 100))
    expect(values).toEqual([...values].sort((a, b) => b - a))
  })

  it("stays clipped to [0, 1] and leaves closed exits closed", () => {
    const high = resolveEarlyExit(spec, { ...FULL_DEPTH, threshold: 1, decayTau: 1 })
    expect(thresholdAt(high, 0, 0, 10)).toBeLessThanOrEqual(1)
    expect(thresholdAt(resolved, 3, 5, 10)).toBe(Infinity)
  })

  it("is constant without decay", () => {
    const constant = resolveEarlyExit(spec, { ...FULL_DEPTH, threshold: 0.8 })
    expect(thresholdAt(constant, 0, 0, 10)).toBe(0.8)
    expect(thresholdAt(constant, 0, 9, 10)).toBe(0.8)
  })
})
