/**
 * The arithmetic of self-speculative decoding (LayerSkip's draft-then-verify, with the speculative-sampling rule of
 * Leviathan et al. and Chen et al.): a draft token d drawn from the draft head's distribution q is kept with
 * probability min(1, p(d)/q(d)) under the full model's distribution p; on rejection the token is drawn from
 * norm(max(0, p − q)). The kept and drawn tokens are then distributed exactly as p: the output is the full model's.
 * Greedy decoding keeps a draft when it is the full model's top token, and otherwise takes that top token.
 */
import type { Rng, SamplingParams } from "../Sampler.js"
import { nucleus, softmax, topKFilter } from "./SamplingMath.js"

/**
 * The distribution that sampling with `params` draws from for one row of logits: top-k, then the nucleus of the
 * renormalized top-k at the temperature, renormalized. Zero outside the candidates. (Temperature > 0.)
 */
export const samplingDistribution = (
  logits: Float32Array,
  offset: number,
  vocab: number,
  params: SamplingParams,
): Float64Array => {
  const row = logits.subarray(offset, offset + vocab)
  const ids = topKFilter(row, params.topK)
  const probs = softmax(
    Array.from(ids, (id) => row[id]!),
    params.temperature,
  )
  const kept = nucleus(probs, params.topP)
  let mass = 0
  for (const j of kept) mass += probs[j]!
  const out = new Float64Array(vocab)
  for (const j of kept) out[ids[j]!] = probs[j]! / mass
  return out
}

/** Draws an id from a distribution over the vocabulary (inverse CDF). */
export const drawFrom = (dist: Float64Array, rng: Rng): number => {
  let r = rng.nextFloat()
  let last = 0
  for (let id = 0; id < dist.length; id++) {
    if (dist[id]! <= 0) continue
    last = id
    r -= dist[id]!
    if (r < 0) return id
  }
  return last
}

/**
 * Verifies one drafted token under speculative sampling: returns the draft when it is kept, else a token drawn from
 * the residual norm(max(0, p − q)).
 */
export const verifyDraft = (
  draft: number,
  p: Float64Array,
  q: Float64Array,
  rng: Rng,
): { readonly accepted: boolean; readonly token: number } => {
  const pd = p[draft]!
  const qd = q[draft]!
  if (qd > 0 && rng.nextFloat() * qd < pd) return { accepted: true, token: draft }
  const residual = new Float64Array(p.length)
  let mass = 0
  for (let id = 0; id < p.length; id++) {
    const r = p[id]! - q[id]!
    if (r > 0) {
      residual[id] = r
      mass += r
    }
  }
  // p = q exactly (up to rounding) leaves no residual: the draft was rejected only by rounding, p is as good.
  if (mass <= 0) return { accepted: false, token: drawFrom(p, rng) }
  for (let id = 0; id < p.length; id++) residual[id] = residual[id]! / mass
  return { accepted: false, token: drawFrom(residual, rng) }
}
