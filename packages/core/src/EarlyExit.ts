/**
 * Early-exit settings: the confidence measure, thresholds (global, per exit, CALM's decaying schedule, a minimum
 * exit layer), the batch exit policy and the KV strategy for skipped layers. Settable per request over engine
 * defaults.
 */
import { Schema } from "effect"
import type { ModelSpec } from "./ModelSpec.js"

export const ConfidenceMeasure = Schema.Literal("softmax", "margin", "entropy", "saturation", "classifier")
export type ConfidenceMeasure = typeof ConfidenceMeasure.Type

/** Measures decided from hidden states alone: the engine runs an exit's head only for the rows that take it. */
export const isHeadFree = (measure: ConfidenceMeasure): boolean => measure === "classifier" || measure === "saturation"

/** `per-sequence`: a confident row exits alone; `all` (the paper's): rows exit together when every one is confident. */
export const ExitPolicy = Schema.Literal("per-sequence", "all")
export type ExitPolicy = typeof ExitPolicy.Type

/** `fill`: K/V of skipped layers from the exit hidden state; `recompute`: push the token through them next step. */
export const KvStrategy = Schema.Literal("fill", "recompute")
export type KvStrategy = typeof KvStrategy.Type

const Threshold = Schema.Number.pipe(Schema.nonNegative())

export const EarlyExitParams = Schema.Struct({
  /**
   * How an exit's confidence is measured: "softmax" (the head's max probability), "margin" (top-1 − top-2
   * probability), "entropy" (1 − normalized entropy), "saturation" (the hidden state stopped changing since the last
   * exit) or "classifier" (the model's exit classifiers).
   */
  measure: ConfidenceMeasure,
  /** Exit when confidence ≥ threshold. Above 1, never exit early. */
  threshold: Threshold,
  /** Per-exit thresholds by exit layer (e.g. { "2": 0.9 }); exits not listed use `threshold`. */
  thresholds: Schema.optionalWith(Schema.Record({ key: Schema.String, value: Threshold }), { exact: true }),
  /**
   * CALM's decaying schedule: λ_t = clip(0.9λ + 0.1λ·e^(−τt/N)) for the t-th of N tokens. Absent: constant.
   */
  decayTau: Schema.optionalWith(Schema.Number.pipe(Schema.nonNegative()), { exact: true }),
  /** No exit before this many layers. */
  minExitLayer: Schema.Int.pipe(Schema.positive()),
  /**
   * A gated decision, for the measures that need no exit head (classifier, saturation): a row that passes the measure
   * takes its token only if the head's max probability also reaches `confirm`; otherwise it goes on, having paid one
   * head. Absent: the cheap measure decides alone. Ignored by the head measures (softmax, margin, entropy).
   */
  confirm: Schema.optionalWith(Schema.Number.pipe(Schema.between(0, 1)), { exact: true }),
  /** "per-sequence": a confident row exits alone; "all": rows exit together when every one is confident. */
  policy: ExitPolicy,
  /** The K/V of skipped layers: "fill" (from the exit's hidden state) or "recompute" (pushed through next step). */
  kv: KvStrategy,
})
export type EarlyExitParams = typeof EarlyExitParams.Type

/** What a request may override. */
export const EarlyExitRequest = Schema.partialWith(EarlyExitParams, { exact: true })
export type EarlyExitRequest = typeof EarlyExitRequest.Type

/** Full depth: no early exit, and no exit head is run before the last layer. */
export const FULL_DEPTH: EarlyExitParams = {
  measure: "softmax",
  threshold: Number.POSITIVE_INFINITY,
  minExitLayer: 1,
  policy: "per-sequence",
  kv: "fill",
}

/** Settings resolved against a model: one base threshold per exit of spec.exits (Infinity: never exit there). */
export interface ResolvedEarlyExit {
  readonly params: EarlyExitParams
  readonly thresholds: ReadonlyArray<number>
  /** False when no early exit can ever fire, so the engine skips intermediate heads. */
  readonly active: boolean
}

export const resolveEarlyExit = (spec: ModelSpec, params: EarlyExitParams): ResolvedEarlyExit => {
  const last = spec.exits.length - 1
  const thresholds = spec.exits.map((exit, i) => {
    if (i === last || exit.layer < params.minExitLayer) return Number.POSITIVE_INFINITY
    return params.thresholds?.[String(exit.layer)] ?? params.threshold
  })
  return { params, thresholds, active: thresholds.some((t) => t <= 1) }
}

/** The threshold of `exitIndex` for the `t`-th generated token of `n` (CALM's schedule when decayTau is set). */
export const thresholdAt = (resolved: ResolvedEarlyExit, exitIndex: number, t: number, n: number): number => {
  const base = resolved.thresholds[exitIndex]!
  const tau = resolved.params.decayTau
  if (tau === undefined || !Number.isFinite(base)) return base
  const decayed = 0.9 * base + 0.1 * base * Math.exp((-tau * t) / Math.max(1, n))
  return Math.min(1, Math.max(0, decayed))
}
