/**
 * Calibration of early-exit thresholds: how often each exit head agrees with the full-depth head at every
 * confidence level, measured teacher-forced on a text, and the per-exit thresholds that keep the agreement of
 * the tokens an exit admits at a target rate (`offramp calibrate` writes them to calibration.json).
 */
import { Effect } from "effect"
import type { ConfidenceEvaluatorShape } from "./ConfidenceEvaluator.js"
import type { ConfidenceMeasure, EarlyExitParams, ExitPolicy, KvStrategy } from "./EarlyExit.js"
import { InvalidRequestError, type RunnerError } from "./Errors.js"
import { featureCount, writeFeatures } from "./ExitClassifier.js"
import { logProbability } from "./internal/SamplingMath.js"
import type { HeadOutput, ModelRunnerShape } from "./ModelRunner.js"
import { buildRowBatch } from "./RowBatch.js"

/** Positions per calibration window (BOS included) unless the context is shorter. */
export const CALIBRATION_WINDOW = 256

/** The threshold of a closed exit: above every confidence, so it never fires. */
export const CLOSED_THRESHOLD = 2

/** One scored position at one exit. */
export interface ExitSample {
  readonly confidence: number
  /** The exit head's top token equals the full-depth head's top token at this position. */
  readonly agrees: boolean
  /** Natural-log probability the exit head gives the text's next token (NaN at a window's last position). */
  readonly logprob: number
}

/** The scored positions of one early exit. */
export interface ExitStatistics {
  /** The exit's layer count (spec.exits[i].layer). */
  readonly layer: number
  readonly samples: ReadonlyArray<ExitSample>
  /** With `features`: the exit classifier's features of every sample, [samples × featureCount(hidden)]. */
  readonly features?: Float32Array
}

/** The threshold found for one exit, and what it does on the calibration text. */
export interface ExitCalibration {
  readonly layer: number
  /** Exit when confidence ≥ threshold; CLOSED_THRESHOLD when no threshold reaches the target. */
  readonly threshold: number
  /** Fraction of positions the threshold admits. */
  readonly coverage: number
  /** Agreement rate with full depth among admitted positions (0 when none is admitted). */
  readonly agreement: number
}

export interface CollectOptions {
  readonly measure: ConfidenceMeasure
  /** Positions per window, BOS included (default CALIBRATION_WINDOW, at most the context length). */
  readonly window?: number
  /** Also return the full-depth exit's statistics, as the last entry (for evaluation). */
  readonly includeFinal?: boolean
  /** Also return each early exit's classifier features (for fitting exit classifiers). */
  readonly features?: boolean
}

/** The window length used for a model: positions per prefill call, BOS included. */
export const calibrationWindow = (contextLength: number, window: number = CALIBRATION_WINDOW): number =>
  Math.min(contextLength, window)

/**
 * Runs `tokens` (text ids, no BOS) teacher-forced at full depth, in windows that each start with the model's BOS,
 * and scores every position of every window at every early exit (every entry of spec.exits but the last).
 * Uses blocks 0..k-1 of the runner's pool, so it must run alone on its runner (no engine).
 */
export const collectExitStatistics = (
  runner: ModelRunnerShape,
  evaluator: ConfidenceEvaluatorShape,
  tokens: ReadonlyArray<number>,
  options: CollectOptions,
): Effect.Effect<ReadonlyArray<ExitStatistics>, RunnerError | InvalidRequestError> =>
  Effect.gen(function* () {
    const { spec } = runner
    const { hidden: D, vocab } = spec.dims
    const window = calibrationWindow(spec.dims.contextLength, options.window)
    if (!Number.isInteger(window) || window < 2) {
      return yield* new InvalidRequestError({
        message: `a calibration window needs at least 2 positions, got ${window}`,
      })
    }
    const blocksNeeded = Math.ceil(window / runner.blockSize)
    if (blocksNeeded > runner.numBlocks) {
      return yield* new InvalidRequestError({
        message:
          `a calibration window of ${window} positions needs ${blocksNeeded} KV blocks; ` +
          `the runner has ${runner.numBlocks}`,
      })
    }
    const blocks = Array.from({ length: blocksNeeded }, (_, b) => b)
    const finalExit = spec.exits.length - 1
    const earlyExits = options.includeFinal ? spec.exits : spec.exits.slice(0, finalExit)
    const samples: Array<Array<ExitSample>> = earlyExits.map(() => [])
    const F = featureCount(D)
    const features: Array<Array<Float32Array>> = earlyExits.map(() => [])

    for (let start = 0; start < tokens.length; start += window - 1) {
      const ids = [spec.tokens.bos, ...tokens.slice(start, start + window - 1)]
      const count = ids.length
      const batch = buildRowBatch([{ cached: 0, count, blocks }], runner.blockSize)
      let hidden = yield* runner.embed(BigInt64Array.from(ids, BigInt), 1, count)
      // Saturation compares each exit's hidden state with the previous exit's (the embedding for the first).
      let previous = hidden
      const heads: Array<{ head: HeadOutput; confidence: Float64Array }> = []
      for (let s = 0; s < spec.segments.length; s++) {
        hidden = yield* runner.segment(s, hidden, batch)
        const exitIndex = spec.exits.findIndex((e) => e.layer === spec.segments[s]!.endLayer)
        if (exitIndex < 0) continue
        const head = yield* runner.head(exitIndex, hidden, count, true)
        if (exitIndex === finalExit) {
          heads.push({ head, confidence: Float64Array.from(head.maxProb) })
          break
        }
        const classifier =
          options.measure === "classifier" ? yield* runner.classify(exitIndex, hidden, previous, count) : undefined
        if (options.measure === "classifier" && classifier === undefined) {
          return yield* new InvalidRequestError({
            message: `no exit classifier after layer ${spec.exits[exitIndex]!.layer}; use another measure`,
          })
        }
        const confidence = new Float64Array(count)
        for (let p = 0; p < count; p++) {
          const c = evaluator.confidence({
            measure: options.measure,
            exitIndex,
            head,
            row: p,
            hidden: hidden.subarray(p * D, (p + 1) * D),
            previousHidden: previous.subarray(p * D, (p + 1) * D),
            vocab,
            ...(classifier ? { classifier: classifier[p]! } : {}),
          })
          // Rounding can put a cosine a hair above 1; thresholds live in [0, 1], and NaN counts as no confidence.
          confidence[p] = Number.isNaN(c) ? 0 : Math.min(1, Math.max(0, c))
        }
        heads.push({ head, confidence })
        if (options.features) {
          const rows = new Float32Array(count * F)
          for (let p = 0; p < count; p++) {
            writeFeatures(
              hidden.subarray(p * D, (p + 1) * D),
              previous.subarray(p * D, (p + 1) * D),
              rows.subarray(p * F, (p + 1) * F),
            )
          }
          features[heads.length - 1]!.push(rows)
        }
        previous = hidden
      }
      const final = heads.at(-1)!.head
      heads.slice(0, earlyExits.length).forEach(({ head, confidence }, e) => {
        for (let p = 0; p < count; p++) {
          samples[e]!.push({
            confidence: confidence[p]!,
            agrees: head.topToken[p] === final.topToken[p],
            logprob: p + 1 < count ? logProbability(head.logits!, p * vocab, vocab, ids[p + 1]!) : Number.NaN,
          })
        }
      })
    }
    const concat = (parts: ReadonlyArray<Float32Array>) => {
      const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0))
      let offset = 0
      for (const p of parts) {
        out.set(p, offset)
        offset += p.length
      }
      return out
    }
    return earlyExits.map((exit, e) => ({
      layer: exit.layer,
      samples: samples[e]!,
      ...(options.features && e < finalExit ? { features: concat(features[e]!) } : {}),
    }))
  })

/** Perplexity and top-1 agreement with the full-depth head of one exit, over its scored positions. Pure. */
export const exitQuality = (statistics: ExitStatistics) => {
  const logprobs = statistics.samples.map((s) => s.logprob).filter((l) => !Number.isNaN(l))
  return {
    layer: statistics.layer,
    perplexity: Math.exp(-logprobs.reduce((a, b) => a + b, 0) / logprobs.length),
    agreement: statistics.samples.filter((s) => s.agrees).length / statistics.samples.length,
    positions: statistics.samples.length,
  }
}

/**
 * The threshold of one exit: positions sorted by confidence descending, the largest prefix whose agreement rate
 * is ≥ target, cut only between different confidences (an exit admits every position at or above its threshold,
 * so positions of equal confidence come in or stay out together). Pure.
 */
export const thresholdForTarget = (statistics: ExitStatistics, target: number): ExitCalibration => {
  const sorted = [...statistics.samples].sort((a, b) => b.confidence - a.confidence)
  const total = sorted.length
  let best: { count: number; agreeing: number; threshold: number } | undefined
  let agreeing = 0
  let i = 0
  while (i < total) {
    const confidence = sorted[i]!.confidence
    while (i < total && sorted[i]!.confidence === confidence) if (sorted[i++]!.agrees) agreeing++
    // A relative epsilon, so a rate equal to the target in exact arithmetic is not lost to rounding.
    if (agreeing >= target * i * (1 - 1e-12)) best = { count: i, agreeing, threshold: confidence }
  }
  if (best === undefined) {
    return { layer: statistics.layer, threshold: CLOSED_THRESHOLD, coverage: 0, agreement: 0 }
  }
  return {
    layer: statistics.layer,
    threshold: best.threshold,
    coverage: best.count / total,
    agreement: best.agreeing / best.count,
  }
}

/** Per-exit thresholds that keep early-exit tokens in agreement with full depth at `target` (0..1]. Pure. */
export const thresholdsForTarget = (
  statistics: ReadonlyArray<ExitStatistics>,
  target: number,
): ReadonlyArray<ExitCalibration> => statistics.map((s) => thresholdForTarget(s, target))

/**
 * Per-exit thresholds that let tokens leave as early as possible while the teacher-forced perplexity of the tokens'
 * exits stays within `budget` (0.02: 2% above full depth's) on the calibration text. A position takes the first exit
 * whose confidence reaches its threshold, else full depth; the search tries every combination of thresholds at the
 * deciles of each exit's confidences (and closed) and keeps the one of least mean depth. `final` is the full-depth
 * exit's statistics (collected with `includeFinal`). Pure.
 */
export const thresholdsForPerplexity = (
  statistics: ReadonlyArray<ExitStatistics>,
  final: ExitStatistics,
  budget: number,
  layers: number,
): ReadonlyArray<ExitCalibration> => {
  const positions = final.samples.flatMap((s, p) => (Number.isNaN(s.logprob) ? [] : [p]))
  const n = positions.length
  const fullNll = -positions.reduce((sum, p) => sum + final.samples[p]!.logprob, 0)
  const limit = fullNll + n * Math.log(1 + budget)
  // Candidates: deciles of each exit's confidences, and closed.
  const candidates = statistics.map((e) => {
    const sorted = positions.map((p) => e.samples[p]!.confidence).sort((a, b) => a - b)
    const deciles = Array.from({ length: 11 }, (_, i) => sorted[Math.min(n - 1, Math.floor((i / 10) * n))]!)
    return [...new Set(deciles), CLOSED_THRESHOLD]
  })
  let best = { depth: Number.POSITIVE_INFINITY, thresholds: statistics.map(() => CLOSED_THRESHOLD) }
  const choice = statistics.map(() => 0)
  const evaluate = () => {
    const thresholds = choice.map((c, e) => candidates[e]![c]!)
    let nll = 0
    let depth = 0
    for (const p of positions) {
      let e = 0
      while (e < statistics.length && statistics[e]!.samples[p]!.confidence < thresholds[e]!) e++
      const sample = e < statistics.length ? statistics[e]!.samples[p]! : final.samples[p]!
      nll -= sample.logprob
      depth += e < statistics.length ? statistics[e]!.layer : layers
    }
    if (nll <= limit && depth < best.depth) best = { depth, thresholds }
  }
  const visit = (e: number): void => {
    if (e === statistics.length) {
      evaluate()
      return
    }
    for (let c = 0; c < candidates[e]!.length; c++) {
      choice[e] = c
      visit(e + 1)
    }
  }
  visit(0)
  return statistics.map((e, i) => {
    const threshold = best.thresholds[i]!
    // What the exit admits of the positions that reach it, as thresholdForTarget reports.
    const reaching = positions.filter((p) =>
      best.thresholds.slice(0, i).every((t, j) => statistics[j]!.samples[p]!.confidence < t),
    )
    const taken = reaching.filter((p) => e.samples[p]!.confidence >= threshold)
    return {
      layer: e.layer,
      threshold,
      coverage: threshold > 1 ? 0 : taken.length / n,
      agreement: taken.length === 0 ? 0 : taken.filter((p) => e.samples[p]!.agrees).length / taken.length,
    }
  })
}

/**
 * Early-exit settings from calibrated exits: each open exit gets its threshold, every other exit stays closed
 * (the base threshold is CLOSED_THRESHOLD). Pure.
 */
export const calibratedEarlyExit = (
  exits: ReadonlyArray<ExitCalibration>,
  options: { readonly measure: ConfidenceMeasure; readonly policy: ExitPolicy; readonly kv: KvStrategy },
): EarlyExitParams => ({
  measure: options.measure,
  threshold: CLOSED_THRESHOLD,
  thresholds: Object.fromEntries(
    exits.filter((e) => e.threshold <= 1).map((e) => [String(e.layer), e.threshold] as const),
  ),
  minExitLayer: 1,
  policy: options.policy,
  kv: options.kv,
})
