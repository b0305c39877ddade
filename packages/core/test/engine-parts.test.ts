/**
 * The engine's parts one at a time (internal/): admission, emission and the KV strategies, on the fake model.
 */
import { describe, expect, it } from "@effect/vitest"
import { Effect, Either, Exit } from "effect"
import { FULL_DEPTH } from "../src/EarlyExit.js"
import type { GenerationSink } from "../src/Engine.js"
import type { TokenEvent } from "../src/Generation.js"
import { makeAdmission } from "../src/internal/Admission.js"
import { makeEmission } from "../src/internal/Emission.js"
import { makeKvCache } from "../src/internal/KvCacheImpl.js"
import { makeFill, makeRecompute } from "../src/internal/KvStrategy.js"
import type { DecodeRow, Sequence } from "../src/internal/Sequence.js"
import { drawFrom, samplingDistribution, verifyDraft } from "../src/internal/Speculative.js"
import { makeStatistics } from "../src/internal/Statistics.js"
import type { HeadOutput } from "../src/ModelRunner.js"
import { greedyParams, makeRng, makeSampler } from "../src/Sampler.js"
import { makeScheduler } from "../src/Scheduler.js"
import { FAKE_VOCAB, fakeSpec, fakeTokenizer, makeFakeRunner } from "./support/FakeModel.js"

const spec = fakeSpec()

const parts = (numBlocks = 64) => {
  const kv = makeKvCache({ numBlocks, blockSize: 4, layers: spec.dims.layers, bytesPerBlock: 64, copyBlock: () => {} })
  const scheduler = makeScheduler<Sequence>(kv)
  const sequences = new Map<number, Sequence>()
  const sampler = makeSampler()
  const statistics = makeStatistics(spec)
  const admission = makeAdmission({
    spec,
    tokenizer: fakeTokenizer,
    kv,
    sampler,
    scheduler,
    defaults: FULL_DEPTH,
    sequences,
  })
  const emission = makeEmission({ spec, sampler, scheduler, statistics, sequences })
  return { kv, scheduler, sequences, statistics, admission, emission }
}

const sink = () => {
  const events: Array<TokenEvent> = []
  const ends: Array<Exit.Exit<void, unknown>> = []
  const value: GenerationSink = { onEvent: (e) => events.push(e), onEnd: (e) => ends.push(e) }
  return { events, ends, value }
}

/** A head output whose every row's top token is `token`. */
const headWith = (tokens: ReadonlyArray<number>): HeadOutput => ({
  logits: undefined,
  maxProb: Float32Array.from(tokens, () => 0.9),
  margin: Float32Array.from(tokens, () => 0.5),
  entropy: Float32Array.from(tokens, () => 0.1),
  topToken: BigInt64Array.from(tokens, BigInt),
})

describe("Admission", () => {
  it("refuses, with errors a user can act on, what can never be served", () =>
    Effect.gen(function* () {
      const { admission } = parts(4)
      const { value } = sink()
      const long = yield* Effect.either(
        admission.admit({ prompt: "a".repeat(200), maxTokens: 4, sampling: greedyParams }, value),
      )
      expect(Either.isLeft(long) && long.left.message).toMatch(/the prompt is 201 tokens but the model's context is 96/)
      const pool = yield* Effect.either(
        admission.admit({ prompt: "a".repeat(40), maxTokens: 4, sampling: greedyParams }, value),
      )
      expect(Either.isLeft(pool) && pool.left.message).toMatch(/KV cache holds 16/)
      const classifier = yield* Effect.either(
        admission.admit(
          { prompt: "a", maxTokens: 4, sampling: greedyParams, earlyExit: { measure: "classifier" } },
          value,
        ),
      )
      expect(Either.isLeft(classifier) && classifier.left.message).toMatch(/needs exit classifiers/)
      const forced = yield* Effect.either(
        admission.admit({ prompt: "a", maxTokens: 4, sampling: greedyParams, forcedTokens: [FAKE_VOCAB] }, value),
      )
      expect(Either.isLeft(forced) && forced.left.message).toMatch(/below the vocabulary size 32/)
    }).pipe(Effect.runSync))

  it("starts sample 0 and keeps forks for the others; requests get distinct groups unless they share one", () =>
    Effect.gen(function* () {
      const { admission, sequences } = parts()
      const a = yield* admission.admit({ prompt: "abc", maxTokens: 4, sampling: greedyParams, n: 3 }, sink().value)
      const b = yield* admission.admit({ prompt: "abc", maxTokens: 4, sampling: greedyParams }, sink().value)
      const c = yield* admission.admit({ prompt: "abc", maxTokens: 4, sampling: greedyParams, group: 7 }, sink().value)
      expect(a.tokens).toEqual([0, 3, 4, 5])
      expect(a.request.forks).toHaveLength(2)
      expect(a.request.live).toBe(3)
      expect(new Set([a.group, b.group, c.group]).size).toBe(3)
      expect(c.group).toBe(7)
      expect([...sequences.keys()]).toEqual([a.id, b.id, c.id])
    }).pipe(Effect.runSync))
})

describe("Emission", () => {
  it("emits the head's token, ends on a stop token or at max tokens, and counts exits", () =>
    Effect.gen(function* () {
      const { admission, emission, scheduler, sequences, statistics } = parts()
      const out = sink()
      const seq = yield* admission.admit({ prompt: "ab", maxTokens: 3, sampling: greedyParams }, out.value)
      scheduler.submit(seq)
      scheduler.schedule()
      emission.emit({ seq, head: headWith([5]), row: 0, exitLayer: 2, confidence: 0.9 })
      expect(out.events[0]).toMatchObject({ id: 5, text: "c", exitLayer: 2, finishReason: null })
      expect(seq.tokens.at(-1)).toBe(5)
      emission.emit({ seq, head: headWith([1]), row: 0, exitLayer: 4, confidence: 0.9 })
      expect(out.events[1]).toMatchObject({ id: 1, text: "", finishReason: "stop" })
      expect(out.ends).toEqual([Exit.void])
      expect(sequences.size).toBe(0)
      const weights = { storedBytes: 0, residentBytes: 0 }
      expect(
        statistics.snapshot({ running: 0, waiting: 0, preemptions: 0 }, makeKvCacheStats(), weights).exitHistogram,
      ).toEqual({ 2: 1, 4: 1 })
    }).pipe(Effect.runSync))

  it("a request with n samples ends when its last sample does", () =>
    Effect.gen(function* () {
      const { admission, emission, scheduler } = parts()
      const out = sink()
      const first = yield* admission.admit({ prompt: "ab", maxTokens: 1, sampling: greedyParams, n: 2 }, out.value)
      scheduler.submit(first)
      scheduler.schedule()
      const fork = first.request.forks.splice(0)[0]!()!
      emission.emit({ seq: first, head: headWith([5]), row: 0, exitLayer: 4, confidence: 1 })
      expect(out.ends).toEqual([])
      emission.emit({ seq: fork, head: headWith([5]), row: 0, exitLayer: 4, confidence: 1 })
      expect(out.events.map((e) => [e.sample, e.finishReason])).toEqual([
        [0, "length"],
        [1, "length"],
      ])
      expect(out.ends).toEqual([Exit.void])
    }).pipe(Effect.runSync))
})

const makeKvCacheStats = () => parts().kv.stats()

describe("recompute strategy", () => {
  it("a token that exits keeps its exit state; the KV cache's fill levels make it join at the segment that starts there", () => {
    const runner = makeFakeRunner()
    const kv = makeKvCache({ numBlocks: 8, blockSize: 4, layers: 4, bytesPerBlock: 64, copyBlock: () => {} })
    const recompute = makeRecompute({ runner, kv })
    const blocks = kv.open([0, 1, 2, 3, 4, 5, 6, 7, 8])!
    kv.commit(blocks, [0, 1, 2, 3, 4, 5, 6], 7) // positions 0..6 in every layer
    const seq = { blocks, exitStates: new Map<number, Float32Array>() } as unknown as Sequence
    // Position 7 ran layers 0-1 and exits after layer 2 (exit index 1): layers 2 and 3 lack it.
    for (const l of [0, 1]) kv.markFilled(blocks, l, 8)
    const row: DecodeRow = { seq, positions: [7], hidden: Float32Array.of(1, 2, 3, 4), previous: new Float32Array(4) }
    recompute.skipped(1, row)
    expect([...seq.exitStates.keys()]).toEqual([7])
    // The next token: segment 1 (layer 1) finds nothing missing; segment 2 (layer 2) takes position 7 in first.
    const next: DecodeRow = { seq, positions: [8], hidden: Float32Array.of(5, 6, 7, 8), previous: new Float32Array(4) }
    Effect.runSync(recompute.beforeSegment(1, [next]))
    expect(next.positions).toEqual([8])
    Effect.runSync(recompute.beforeSegment(2, [next]))
    expect(next.positions).toEqual([7, 8])
    expect([...next.hidden]).toEqual([1, 2, 3, 4, 5, 6, 7, 8])
    expect(seq.exitStates.size).toBe(0)
  })
})

describe("fill strategy", () => {
  it("fills nothing while tokens keep exiting; a token that needs a missing layer fills every missing position, in one call", () => {
    const calls: Array<[string, number]> = []
    const runner = makeFakeRunner({ onCall: (stage, rows) => calls.push([stage, rows]) })
    const kv = makeKvCache({ numBlocks: 8, blockSize: 4, layers: 4, bytesPerBlock: 64, copyBlock: () => {} })
    const fill = makeFill({ runner, kv, statistics: makeStatistics(runner.spec) })
    const blocks = kv.open([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])!
    kv.commit(blocks, [0, 1, 2, 3, 4, 5, 6], 7) // positions 0..6 in every layer
    const seq = { blocks, exact: 7, exitStates: new Map<number, Float32Array>() } as unknown as Sequence
    const row = (position: number, value: number): DecodeRow => ({
      seq,
      positions: [position],
      hidden: new Float32Array(4).fill(value),
      previous: new Float32Array(4),
    })
    const run = (position: number, value: number, segments: number, exitIndex: number) => {
      const r = row(position, value)
      for (let s = 0; s < segments; s++) {
        Effect.runSync(fill.beforeSegment(s, [r]))
        kv.markFilled(blocks, s, position + 1)
      }
      fill.skipped(exitIndex, r)
    }
    run(7, 7, 2, 1) // runs layers 0-1, exits after layer 2 (exit index 1)
    run(8, 8, 1, 0) // runs layer 0, exits after layer 1 (exit index 0)
    expect(calls).toEqual([])
    expect([...seq.exitStates.keys()]).toEqual([7, 8])
    // Position 9 goes on past layer 0: layer 1 lacks position 8, so 7 and 8 are filled, each from its exit layer on.
    const next = row(9, 9)
    Effect.runSync(fill.beforeSegment(0, [next]))
    kv.markFilled(blocks, 0, 10)
    expect(calls).toEqual([])
    Effect.runSync(fill.beforeSegment(1, [next]))
    expect(calls).toEqual([["kvfill 0", 2]])
    for (let l = 1; l < 4; l++) expect(kv.filled(blocks, l)).toBe(9)
    expect(seq.exitStates.size).toBe(0)
    expect(seq.exact).toBe(7)
    const at = (layer: number, position: number) => runner.readKv(layer, kv.slot(blocks, position)).k[0]
    expect([1, 2, 3].map((l) => at(l, 8))).toEqual([8, 8, 8])
    // Position 7 ran layer 1 itself: the fill leaves it there.
    expect([1, 2, 3].map((l) => at(l, 7))).toEqual([0, 7, 7])
    // Nothing is missing any more: the next segment calls nothing.
    Effect.runSync(fill.beforeSegment(2, [next]))
    expect(calls).toHaveLength(1)
  })
})

/** Pearson's chi-square statistic of observed counts against expected probabilities (cells with p > 0). */
const chiSquare = (counts: ReadonlyArray<number>, p: ReadonlyArray<number>, n: number) =>
  counts.reduce((x, c, i) => (p[i]! > 0 ? x + (c - n * p[i]!) ** 2 / (n * p[i]!) : x), 0)

describe("speculative sampling", () => {
  it("draft from q, verify against p: the tokens follow p, even where p and q differ a lot", () => {
    const p = Float64Array.of(0.5, 0.3, 0.15, 0.05, 0)
    const q = Float64Array.of(0.02, 0.08, 0.1, 0.4, 0.4) // mostly drafts p finds unlikely or impossible
    const rng = makeRng(1234)
    const n = 20_000
    const counts = [0, 0, 0, 0, 0]
    let accepted = 0
    for (let i = 0; i < n; i++) {
      const draft = drawFrom(q, rng)
      const verdict = verifyDraft(draft, p, q, rng)
      if (verdict.accepted) accepted++
      counts[verdict.token]!++
    }
    // The empty cell stays empty; over the 4 others (3 degrees of freedom) the 0.999 quantile of chi-square is 16.27.
    expect(counts[4]).toBe(0)
    expect(chiSquare(counts, [...p], n)).toBeLessThan(16.27)
    // The acceptance rate is Σ min(p, q) = 0.02 + 0.08 + 0.1 + 0.05 = 0.25.
    expect(accepted / n).toBeGreaterThan(0.23)
    expect(accepted / n).toBeLessThan(0.27)
  })

  it("samplingDistribution is what the sampler draws from (temperature, top-k, top-p)", () => {
    const logits = Float32Array.of(2, 1, 0.5, 0.4, -1, 3)
    const params = { temperature: 0.7, topK: 4, topP: 0.9 }
    const dist = samplingDistribution(logits, 0, logits.length, params)
    const sampler = makeSampler()
    const rng = makeRng(99)
    const n = 20_000
    const counts = [0, 0, 0, 0, 0, 0]
    for (let i = 0; i < n; i++) counts[sampler.sample(logits, 0, logits.length, params, rng)]!++
    for (let id = 0; id < logits.length; id++) if (dist[id] === 0) expect(counts[id]).toBe(0)
    const cells = [...dist].filter((x) => x > 0).length
    // The 0.999 quantile of chi-square with cells − 1 (≤ 3) degrees of freedom is at most 16.27.
    expect(cells).toBeLessThanOrEqual(4)
    expect(chiSquare(counts, [...dist], n)).toBeLessThan(16.27)
  })
})
