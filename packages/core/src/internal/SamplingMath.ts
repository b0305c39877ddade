/**
 * The sampler's arithmetic: argmax, softmax, top-k and nucleus (top-p) candidate sets, the draw, and a token's
 * log-probability. Pure functions of logits; the Sampler service (../Sampler.ts) and the engine's parts use them,
 * and the tests check them one by one.
 */
import type { Rng, SamplingParams } from "../Sampler.js"

// Probabilities this close below topP count as reaching it: float32 logits only pin probabilities to ~1e-7, and a
// nucleus boundary must not depend on that noise (e.g. p = [0.5, 0.2, ...] with topP 0.7 is exactly {0, 1}).
const NUCLEUS_EPS = 1e-6

/** Argmax of logits[offset .. offset+vocab); ties -> lowest id; NaN never wins. */
export const argmax = (logits: ArrayLike<number>, offset = 0, vocab = logits.length - offset): number => {
  let best = 0
  let bestValue = Number.NEGATIVE_INFINITY
  for (let i = 0; i < vocab; i++) {
    const v = logits[offset + i]!
    if (v > bestValue) {
      bestValue = v
      best = i
    }
  }
  return best
}

/** Softmax of logits / temperature, in double precision. */
export const softmax = (logits: ArrayLike<number>, temperature = 1): Float64Array => {
  const out = new Float64Array(logits.length)
  let max = Number.NEGATIVE_INFINITY
  for (let i = 0; i < logits.length; i++) if (logits[i]! > max) max = logits[i]!
  let sum = 0
  for (let i = 0; i < logits.length; i++) {
    const e = Math.exp((logits[i]! - max) / temperature)
    out[i] = e
    sum += e
  }
  for (let i = 0; i < out.length; i++) out[i] = out[i]! / sum
  return out
}

// a is a better candidate than b: larger logit, ties -> lower id.
const better = (logits: ArrayLike<number>, offset: number, a: number, b: number): boolean => {
  const la = logits[offset + a]!
  const lb = logits[offset + b]!
  return la > lb || (la === lb && a < b)
}

const sortCandidates = (logits: ArrayLike<number>, offset: number, ids: Int32Array): void => {
  // NaN from (-inf) - (-inf) falls through to the id order.
  ids.sort((a, b) => logits[offset + b]! - logits[offset + a]! || a - b)
}

/**
 * Writes the ids of the k best logits into ids[0..k), best first (ties -> lowest id). A min-heap of size k keeps
 * this O(vocab log k) with no allocation.
 */
const selectTopK = (logits: ArrayLike<number>, offset: number, vocab: number, k: number, ids: Int32Array): void => {
  const siftDown = (start: number) => {
    let i = start
    for (;;) {
      const l = 2 * i + 1
      if (l >= k) return
      const r = l + 1
      // The root holds the worst kept candidate.
      const worse = r < k && better(logits, offset, ids[l]!, ids[r]!) ? r : l
      if (!better(logits, offset, ids[i]!, ids[worse]!)) return
      const t = ids[i]!
      ids[i] = ids[worse]!
      ids[worse] = t
      i = worse
    }
  }
  for (let i = 0; i < k; i++) ids[i] = i
  for (let i = (k >> 1) - 1; i >= 0; i--) siftDown(i)
  for (let id = k; id < vocab; id++) {
    if (better(logits, offset, id, ids[0]!)) {
      ids[0] = id
      siftDown(0)
    }
  }
  sortCandidates(logits, offset, ids.subarray(0, k))
}

/** Ids of the k largest logits, best first (ties -> lowest id); k <= 0 or k >= length gives every id, sorted. */
export const topKFilter = (logits: ArrayLike<number>, k: number): Int32Array => {
  const n = logits.length
  if (k <= 0 || k >= n) {
    const ids = Int32Array.from({ length: n }, (_, i) => i)
    sortCandidates(logits, 0, ids)
    return ids
  }
  const ids = new Int32Array(k)
  selectTopK(logits, 0, n, k, ids)
  return ids
}

/**
 * The nucleus of a probability vector: the smallest set of most likely ids (best first, ties -> lowest id) whose
 * cumulative probability reaches topP; always at least one id. `probs` is normalized by its sum first.
 */
export const nucleus = (probs: ArrayLike<number>, topP: number): Int32Array => {
  const ids = topKFilter(probs, 0)
  let total = 0
  for (let i = 0; i < probs.length; i++) total += probs[i]!
  if (topP >= 1) return ids
  let cum = 0
  for (let j = 0; j < ids.length; j++) {
    cum += probs[ids[j]!]!
    if (cum >= (topP - NUCLEUS_EPS) * total) return ids.slice(0, j + 1)
  }
  return ids
}

/** The nucleus of softmax(logits / temperature). */
export const topPFilter = (logits: ArrayLike<number>, topP: number, temperature = 1): Int32Array =>
  nucleus(softmax(logits, temperature), topP)

/** Every id `sample` can return for these logits and params (top-k, then top-p over the renormalized top-k). */
export const candidateTokens = (logits: ArrayLike<number>, params: SamplingParams): Int32Array => {
  if (params.temperature === 0) return Int32Array.of(argmax(logits))
  const ids = topKFilter(logits, params.topK)
  const probs = softmax(
    Array.from(ids, (id) => logits[id]!),
    params.temperature,
  )
  return Int32Array.from(nucleus(probs, params.topP), (j) => ids[j]!)
}

/** Scratch buffers reused across calls; `sample` is synchronous, so one set per sampler is enough. */
export interface Scratch {
  ids: Int32Array
  weights: Float64Array
  work: Float64Array
}

const ensure = (scratch: Scratch, n: number) => {
  if (scratch.ids.length < n) {
    scratch.ids = new Int32Array(n)
    scratch.weights = new Float64Array(n)
    scratch.work = new Float64Array(n)
  }
}

/** Inverse-CDF draw over ids[0..m) with weights w[0..m) summing to `mass`. */
export const drawFrom = (ids: Int32Array, w: Float64Array, m: number, mass: number, rng: Rng): number => {
  let r = rng.nextFloat() * mass
  for (let j = 0; j < m; j++) {
    r -= w[j]!
    if (r < 0) return ids[j]!
  }
  return ids[m - 1]!
}

/**
 * Finds the nucleus boundary among the n values of `a` (which it reorders) without sorting: a quickselect that keeps
 * the sum of everything known to lie above the range. Returns the boundary weight tau and how many values equal to tau
 * belong to the nucleus; tau = -1 means "everything" (the target was not reached, e.g. by rounding).
 */
const nucleusBoundary = (a: Float64Array, n: number, target: number): { tau: number; ties: number } => {
  let lo = 0
  let hi = n
  let above = 0
  while (hi > lo) {
    const pivot = a[lo + ((hi - lo) >> 1)]!
    // Three-way partition of [lo, hi): > pivot, == pivot, < pivot.
    let gt = lo
    let i = lo
    let lt = hi
    while (i < lt) {
      const v = a[i]!
      if (v > pivot) {
        a[i] = a[gt]!
        a[gt++] = v
        i++
      } else if (v < pivot) {
        a[i] = a[--lt]!
        a[lt] = v
      } else i++
    }
    let sumGt = 0
    for (let j = lo; j < gt; j++) sumGt += a[j]!
    if (above + sumGt >= target) {
      hi = gt
      continue
    }
    let cum = above + sumGt
    for (let t = 1; t <= lt - gt; t++) {
      cum += pivot
      if (cum >= target) return { tau: pivot, ties: t }
    }
    above = cum
    lo = lt
  }
  return { tau: -1, ties: 0 }
}

export const sampleRow = (
  scratch: Scratch,
  logits: Float32Array,
  offset: number,
  vocab: number,
  params: SamplingParams,
  rng: Rng,
): number => {
  const { temperature, topP } = params
  if (temperature === 0) return argmax(logits, offset, vocab)
  ensure(scratch, vocab)
  const { ids, weights, work } = scratch
  const invT = 1 / temperature
  const k = params.topK > 0 && params.topK < vocab ? params.topK : 0

  if (k > 0) {
    // Top-k (then maybe top-p): only k candidates, sorted best first, so the nucleus is a prefix.
    selectTopK(logits, offset, vocab, k, ids)
    const max = logits[offset + ids[0]!]!
    if (!Number.isFinite(max)) return argmax(logits, offset, vocab)
    let total = 0
    for (let j = 0; j < k; j++) {
      const e = Math.exp((logits[offset + ids[j]!]! - max) * invT)
      weights[j] = e
      total += e
    }
    if (topP >= 1) return drawFrom(ids, weights, k, total, rng)
    const threshold = (topP - NUCLEUS_EPS) * total
    let mass = 0
    let m = 0
    while (m < k) {
      mass += weights[m++]!
      if (mass >= threshold) break
    }
    return drawFrom(ids, weights, m, mass, rng)
  }

  let max = Number.NEGATIVE_INFINITY
  for (let i = 0; i < vocab; i++) if (logits[offset + i]! > max) max = logits[offset + i]!
  // Everything masked (or an infinite logit): nothing to weigh, fall back to the argmax.
  if (!Number.isFinite(max)) return argmax(logits, offset, vocab)
  let total = 0
  for (let i = 0; i < vocab; i++) {
    const e = Math.exp((logits[offset + i]! - max) * invT)
    weights[i] = e
    total += e
  }
  if (topP >= 1) {
    // Plain temperature sampling: inverse CDF over the whole row, no sort.
    let r = rng.nextFloat() * total
    let last = 0
    for (let i = 0; i < vocab; i++) {
      const w = weights[i]!
      if (w > 0) last = i
      r -= w
      if (r < 0) return i
    }
    return last
  }

  // Top-p alone: a token with probability < (1 - topP) / (vocab - 1) cannot be in the nucleus (all such tokens
  // together have less than 1 - topP), so the rest is dropped first (llama2.c's trick). A flat row can still leave
  // thousands of candidates, so the boundary is found by quickselect, not by sorting.
  const cutoff = ((1 - topP) / (vocab - 1)) * total
  let n = 0
  for (let i = 0; i < vocab; i++) {
    if (weights[i]! >= cutoff) {
      ids[n] = i
      work[n++] = weights[i]!
    }
  }
  // With a tiny vocabulary and topP the cutoff can exceed every weight; then every token is a candidate.
  if (n === 0) {
    for (let i = 0; i < vocab; i++) {
      ids[n] = i
      work[n++] = weights[i]!
    }
  }
  const { tau, ties } = nucleusBoundary(work, n, (topP - NUCLEUS_EPS) * total)
  // Keep the tokens above tau, and of those equal to tau the lowest ids; ids stay in id order, which is fine to draw
  // from.
  let m = 0
  let mass = 0
  let tiesLeft = ties
  for (let j = 0; j < n; j++) {
    const w = weights[ids[j]!]!
    if (w > tau || (w === tau && tiesLeft-- > 0)) {
      ids[m] = ids[j]!
      work[m++] = w
      mass += w
    }
  }
  return drawFrom(ids, work, m, mass, rng)
}

/** log softmax(logits[offset .. offset+vocab))[id], computed stably (a token's log-probability). */
export const logProbability = (logits: ArrayLike<number>, offset: number, vocab: number, id: number): number => {
  let max = Number.NEGATIVE_INFINITY
  for (let i = 0; i < vocab; i++) max = Math.max(max, logits[offset + i]!)
  let sum = 0
  for (let i = 0; i < vocab; i++) sum += Math.exp(logits[offset + i]! - max)
  return logits[offset + id]! - max - Math.log(sum)
}

/**
 * A token's log-probability from what the head computed over the whole vocabulary already: with `top` its most
 * likely token and `maxProb` that token's probability, log softmax[id] = logit[id] − logit[top] + log maxProb. One
 * row of V exps less per generated token than `logProbability` (measured: ~7% of a decode step on the default model).
 * The top token itself needs no logits (a head called without them, for greedy decoding, has none).
 */
export const logProbabilityFromTop = (
  logits: ArrayLike<number> | undefined,
  offset: number,
  id: number,
  top: number,
  maxProb: number,
): number => (id === top ? Math.log(maxProb) : logits![offset + id]! - logits![offset + top]! + Math.log(maxProb))
