/**
 * Quality metrics for early-exit benchmarks: how far a shallow-exit generation drifts from the full-depth one.
 * Everything works on token ids / log-probs so no detokenisation choices leak into the numbers.
 */

export interface RougeScore {
  readonly precision: number
  readonly recall: number
  readonly f1: number
}

export interface Summary {
  readonly median: number
  readonly mean: number
  readonly min: number
  readonly max: number
}

/** Length of the longest common subsequence; two rolling rows keep memory at O(min(n, m)). */
export const lcsLength = (a: ReadonlyArray<number>, b: ReadonlyArray<number>): number => {
  // The shorter sequence indexes the rows so memory follows the smaller side.
  const [outer, inner] = a.length >= b.length ? [a, b] : [b, a]
  if (inner.length === 0) return 0
  let prev = new Uint32Array(inner.length + 1)
  let curr = new Uint32Array(inner.length + 1)
  for (let i = 1; i <= outer.length; i++) {
    const x = outer[i - 1]
    for (let j = 1; j <= inner.length; j++) {
      curr[j] = x === inner[j - 1] ? prev[j - 1]! + 1 : Math.max(prev[j]!, curr[j - 1]!)
    }
    const t = prev
    prev = curr
    curr = t
  }
  return prev[inner.length]!
}

/**
 * ROUGE-L over token id sequences. Precision is relative to the candidate, recall to the reference.
 * Two empty sequences agree perfectly (1); exactly one empty shares nothing (0).
 */
export const rougeL = (reference: ReadonlyArray<number>, candidate: ReadonlyArray<number>): RougeScore => {
  if (reference.length === 0 && candidate.length === 0) return { precision: 1, recall: 1, f1: 1 }
  if (reference.length === 0 || candidate.length === 0) return { precision: 0, recall: 0, f1: 0 }
  const lcs = lcsLength(reference, candidate)
  const precision = lcs / candidate.length
  const recall = lcs / reference.length
  const f1 = lcs === 0 ? 0 : (2 * precision * recall) / (precision + recall)
  return { precision, recall, f1 }
}

/**
 * Fraction of positions (up to the longer length) where both sequences hold the same token.
 * Positions past the shorter sequence count as mismatches, so truncation is penalised. Both empty → 1.
 */
export const tokenMatchRate = (reference: ReadonlyArray<number>, candidate: ReadonlyArray<number>): number => {
  const n = Math.max(reference.length, candidate.length)
  if (n === 0) return 1
  const shared = Math.min(reference.length, candidate.length)
  let matches = 0
  for (let i = 0; i < shared; i++) if (reference[i] === candidate[i]) matches++
  return matches / n
}

/** exp(mean(−log p)) with natural-log probabilities, as emitted by the sampler. */
export const perplexity = (logProbs: ReadonlyArray<number> | Float64Array): number => {
  if (logProbs.length === 0) throw new Error("perplexity: no log-probabilities given (empty input)")
  let sum = 0
  for (let i = 0; i < logProbs.length; i++) sum -= logProbs[i]!
  return Math.exp(sum / logProbs.length)
}

const requireNonEmpty = (name: string, values: ReadonlyArray<number>): void => {
  if (values.length === 0) throw new Error(`${name}: no values given (empty input)`)
}

/** Median; the mean of the two middle values for even lengths. Does not mutate its input. */
export const median = (values: ReadonlyArray<number>): number => {
  requireNonEmpty("median", values)
  const sorted = [...values].sort((a, b) => a - b)
  const mid = sorted.length >> 1
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2
}

export const summarize = (values: ReadonlyArray<number>): Summary => {
  requireNonEmpty("summarize", values)
  let sum = 0
  let min = Number.POSITIVE_INFINITY
  let max = Number.NEGATIVE_INFINITY
  for (const v of values) {
    sum += v
    if (v < min) min = v
    if (v > max) max = v
  }
  return { median: median(values), mean: sum / values.length, min, max }
}
