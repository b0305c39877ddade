/**
 * The forward pass of the decode rows of speculative requests, batched across rows.
 *
 * Draft: the current token goes through the layers up to the row's draft exit and the exit head drafts the next
 * token, which goes through the same layers in turn, up to `maxDraft` tokens (fewer when the draft head's top
 * probability falls below the request's threshold, a stop token is drafted, or the sequence has less room). The K/V
 * these passes write are the full model's own for those layers (the same layers on the same tokens).
 * Verify: the drafted positions go through the remaining layers in one call per segment, from their draft-exit
 * states, and the final head scores them all at once. A row keeps the drafts the full model agrees with (greedy: its
 * top token; sampling: the speculative-sampling rule) plus, at the first disagreement, the full model's own token.
 * The K/V of the positions after what it keeps are rolled back.
 */
import { Effect } from "effect"
import type { KvCacheShape } from "../KvCache.js"
import type { HeadOutput, ModelRunnerShape } from "../ModelRunner.js"
import { makeRowBatchBuilder } from "../RowBatch.js"
import type { BatchRow, SchedulerShape } from "../Scheduler.js"
import { logProbabilityFromTop } from "./SamplingMath.js"
import type { Sequence } from "./Sequence.js"
import { drawFrom, samplingDistribution, verifyDraft } from "./Speculative.js"
import type { Statistics } from "./Statistics.js"

/** A token a speculative row keeps this step, in order. */
export interface KeptToken {
  readonly id: number
  readonly logprob: number
  /** The final head's top probability at the token's position. */
  readonly confidence: number
}

/** A speculative row's outcome: the tokens it keeps (at least one). */
export interface SpeculativeResult {
  readonly seq: Sequence
  readonly tokens: ReadonlyArray<KeptToken>
}

interface Draft {
  readonly seq: Sequence
  readonly exitIndex: number
  /** Position of the current token (the first position this step computes). */
  readonly start: number
  /** Most tokens this row may draft. */
  readonly limit: number
  /** Drafted ids, their draft distributions (sampling), and each drafted position's draft-exit state. */
  readonly tokens: Array<number>
  readonly q: Array<Float64Array>
  readonly states: Array<Float32Array>
  drafting: boolean
}

export const makeSpeculativePass = (deps: {
  readonly runner: ModelRunnerShape
  readonly kv: KvCacheShape
  readonly scheduler: SchedulerShape<Sequence>
  readonly statistics: Statistics
}) => {
  const { runner, kv, scheduler, statistics } = deps
  const { spec } = runner
  const { dims } = spec
  const D = dims.hidden
  const V = dims.vocab
  const finalExit = spec.exits.length - 1
  const stopIds = new Set(spec.tokens.stop)
  const segmentsUpTo = (layer: number) => spec.segments.flatMap((s, i) => (s.endLayer <= layer ? [i] : []))
  const segmentsAfter = (layer: number) => spec.segments.flatMap((s, i) => (s.firstLayer >= layer ? [i] : []))

  // Batches for the segment calls, each used only by the call it is built for (see makeRowBatchBuilder).
  const rowBatch = makeRowBatchBuilder(runner.blockSize)

  /** One segment call for rows of `count` new positions each, from `cached` on; marks the layers filled. */
  const runSegment = (
    index: number,
    rows: ReadonlyArray<{ readonly seq: Sequence; readonly cached: number; readonly count: number }>,
    hidden: Float32Array,
  ) =>
    Effect.gen(function* () {
      const batch = rowBatch(rows.map((r) => ({ cached: r.cached, count: r.count, blocks: r.seq.blocks!.blocks })))
      const out = yield* runner.segment(index, hidden, batch)
      const { firstLayer, endLayer } = spec.segments[index]!
      for (const r of rows)
        for (let l = firstLayer; l < endLayer; l++) kv.markFilled(r.seq.blocks!, l, r.cached + r.count)
      return out
    })

  /** Drafts tokens for rows of one draft exit, one position per pass. */
  const draft = (rows: ReadonlyArray<Draft>) =>
    Effect.gen(function* () {
      const exitIndex = rows[0]!.exitIndex
      const segments = segmentsUpTo(spec.exits[exitIndex]!.layer)
      for (let k = 0; ; k++) {
        const active = rows.filter((r) => r.drafting)
        if (active.length === 0) return
        const ids = BigInt64Array.from(active, (r) => BigInt(k === 0 ? r.seq.tokens[r.start]! : r.tokens[k - 1]!))
        let hidden = yield* runner.embed(ids, active.length, 1)
        const positions = active.map((r) => ({ seq: r.seq, cached: r.start + k, count: 1 }))
        for (const s of segments) hidden = yield* runSegment(s, positions, hidden)
        const sampling = active.some((r) => r.seq.request.usesLogits)
        const head = yield* runner.head(exitIndex, hidden, active.length, sampling)
        active.forEach((r, i) => {
          r.states.push(hidden.slice(i * D, (i + 1) * D))
          const { request } = r.seq
          let id = Number(head.topToken[i])
          if (request.usesLogits) {
            const q = samplingDistribution(head.logits!, i * V, V, request.sampling)
            id = drawFrom(q, r.seq.rng)
            r.q.push(q)
          }
          r.tokens.push(id)
          r.drafting =
            r.tokens.length < r.limit && !stopIds.has(id) && head.maxProb[i]! >= request.speculative!.threshold
        })
        statistics.speculative.drafted += active.length
      }
    })

  /** Verifies the rows' drafts through the layers after their draft exit; returns what each row keeps. */
  const verify = (rows: ReadonlyArray<Draft>) =>
    Effect.gen(function* () {
      const exitLayer = spec.exits[rows[0]!.exitIndex]!.layer
      const positions = rows.map((r) => ({ seq: r.seq, cached: r.start, count: r.tokens.length }))
      const T = Math.max(...positions.map((p) => p.count))
      let hidden: Float32Array = new Float32Array(rows.length * T * D)
      rows.forEach((r, i) => r.states.forEach((state, t) => hidden.set(state, (i * T + t) * D)))
      for (const s of segmentsAfter(exitLayer)) hidden = yield* runSegment(s, positions, hidden)
      // The final head over every drafted position of every row, packed.
      const total = positions.reduce((n, p) => n + p.count, 0)
      const packed = new Float32Array(total * D)
      let at = 0
      rows.forEach((r, i) => {
        packed.set(hidden.subarray(i * T * D, (i * T + r.tokens.length) * D), at * D)
        at += r.tokens.length
      })
      const sampling = rows.some((r) => r.seq.request.usesLogits)
      const head: HeadOutput = yield* runner.head(finalExit, packed, total, sampling)
      const results: Array<SpeculativeResult> = []
      let row = 0
      for (const r of rows) {
        const { request } = r.seq
        const kept: Array<KeptToken> = []
        let rejected = false
        for (let j = 0; j < r.tokens.length; j++, row++) {
          const drafted = r.tokens[j]!
          const top = Number(head.topToken[row])
          let id = top
          let accepted = drafted === top
          if (request.usesLogits) {
            const p = samplingDistribution(head.logits!, row * V, V, request.sampling)
            const verdict = verifyDraft(drafted, p, r.q[j]!, r.seq.rng)
            accepted = verdict.accepted
            id = verdict.token
          }
          const logprob = logProbabilityFromTop(head.logits, row * V, id, top, head.maxProb[row]!)
          kept.push({ id, logprob, confidence: head.maxProb[row]! })
          if (!accepted) {
            rejected = true
            row += r.tokens.length - j
            break
          }
        }
        statistics.speculative.accepted += kept.length - (rejected ? 1 : 0)
        statistics.speculative.kept += kept.length
        statistics.speculative.verifications++
        results.push({ seq: r.seq, tokens: kept })
      }
      return results
    })

  /** The step of speculative decode rows (one new token each: the current one). */
  const run = (rows: ReadonlyArray<BatchRow<Sequence>>) =>
    Effect.gen(function* () {
      const drafts: Array<Draft> = rows.map(({ seq }) => {
        const { request } = seq
        // Room: tokens left to generate, and positions left in the context (the last kept token needs a slot too).
        // And the positions reserved for it (a row admitted this step with its prompt cached has no lookahead yet).
        const room = Math.min(
          request.maxTokens - seq.generated,
          dims.contextLength - 1 - seq.computed,
          seq.blocks!.reserved - seq.computed,
        )
        return {
          seq,
          exitIndex: request.speculative!.exitIndex,
          start: seq.computed,
          limit: Math.max(1, Math.min(request.speculative!.maxDraft, room)),
          tokens: [],
          q: [],
          states: [],
          drafting: true,
        }
      })
      const byExit = new Map<number, Array<Draft>>()
      for (const d of drafts) byExit.set(d.exitIndex, [...(byExit.get(d.exitIndex) ?? []), d])
      const results: Array<SpeculativeResult> = []
      for (const group of byExit.values()) {
        yield* draft(group)
        results.push(...(yield* verify(group)))
      }
      for (const { seq, tokens } of results) {
        // Positions start .. start + kept - 1 now hold the full model's K/V; what lies after them is rolled back.
        scheduler.advance(seq, tokens.length)
        kv.truncate(seq.blocks!, seq.computed)
        statistics.counters.decodeTokens += tokens.length
      }
      return results
    })

  return { run }
}

export type SpeculativePass = ReturnType<typeof makeSpeculativePass>
