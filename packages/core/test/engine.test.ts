/**
 * The Engine on the fake runner (test/support/FakeModel.ts): continuous batching, the paged KV cache, preemption,
 * forks and early exit against a reference decoder that recomputes everything, in milliseconds. The real-model
 * tests (test/engine-*.test.ts) remain the end-to-end proof on onnxruntime.
 */
import { describe, expect, it } from "@effect/vitest"
import { Chunk, Effect, Stream } from "effect"
import { Engine } from "../src/Engine.js"
import type { GenerationRequest, TokenEvent } from "../src/Generation.js"
import { greedyParams } from "../src/Sampler.js"
import type { TokenizerShape } from "../src/Tokenizer.js"
import { FAKE_LAYERS, FAKE_VOCAB, fakeEngineLayer, fakeTokenizer, referenceGreedy } from "./support/FakeModel.js"

const PROMPTS = ["once upon a time", "the cat sat", "hello, world", "a", "we went to the park and", "zebra crossing"]

type TextRequest = GenerationRequest & { readonly prompt: string }

const greedy = (
  prompt: string,
  maxTokens: number,
  extra: Omit<Partial<GenerationRequest>, "prompt"> = {},
): TextRequest => ({
  prompt,
  maxTokens,
  sampling: greedyParams,
  ...extra,
})

const requests = Array.from({ length: 16 }, (_, i) =>
  greedy(`${PROMPTS[i % PROMPTS.length]}${i >= 6 ? " x" : ""}`, 5 + ((i * 7) % 30)),
)

const collect = (request: GenerationRequest) =>
  Effect.flatMap(Engine, (engine) => Stream.runCollect(engine.generate(request))).pipe(
    Effect.map((events) => Chunk.toArray(events)),
  )
const ids = (events: ReadonlyArray<TokenEvent>) => events.map((e) => e.id)
const expected = (request: TextRequest) =>
  referenceGreedy(Effect.runSync(fakeTokenizer.encode(request.prompt)), request.maxTokens)

describe("Engine on the fake runner", () => {
  it.effect("a single greedy request equals the reference decoder", () =>
    Effect.gen(function* () {
      for (const request of requests.slice(0, 6)) expect(ids(yield* collect(request))).toEqual(expected(request))
    }).pipe(Effect.provide(fakeEngineLayer())),
  )

  it.effect("16 concurrent requests of different lengths each equal the reference decoder", () =>
    Effect.gen(function* () {
      const outputs = yield* Effect.forEach(requests, collect, { concurrency: "unbounded" })
      outputs.forEach((events, i) => expect(ids(events)).toEqual(expected(requests[i]!)))
    }).pipe(Effect.provide(fakeEngineLayer())),
  )

  it.effect("a pool too small for all sequences preempts, and the outputs stay the reference's", () =>
    Effect.gen(function* () {
      const outputs = yield* Effect.forEach(requests, collect, { concurrency: "unbounded" })
      outputs.forEach((events, i) => expect(ids(events)).toEqual(expected(requests[i]!)))
      const stats = yield* Effect.flatMap(Engine, (e) => e.stats)
      expect(stats.preemptions).toBeGreaterThan(0)
    }).pipe(Effect.provide(fakeEngineLayer({ runner: { numBlocks: 24, blockSize: 4 } }))),
  )

  it.effect("n greedy samples, some waiting for room under the per-group cap, all equal the reference", () =>
    Effect.gen(function* () {
      const request = greedy(PROMPTS[0]!, 20, { n: 5 })
      const events = yield* collect(request)
      for (let sample = 0; sample < 5; sample++)
        expect(ids(events.filter((e) => e.sample === sample))).toEqual(expected(request))
    }).pipe(Effect.provide(fakeEngineLayer({ scheduler: { maxRunning: 4, maxRunningPerGroup: 2 } }))),
  )

  it.effect("early exit with a threshold above 1 is full depth, under both policies and both KV strategies", () =>
    Effect.gen(function* () {
      for (const policy of ["per-sequence", "all"] as const)
        for (const kv of ["fill", "recompute"] as const) {
          const batch = requests.slice(0, 8).map((r) => ({ ...r, earlyExit: { threshold: 1.5, policy, kv } }))
          const outputs = yield* Effect.forEach(batch, collect, { concurrency: "unbounded" })
          outputs.forEach((events, i) => expect(ids(events)).toEqual(expected(requests[i]!)))
        }
    }).pipe(Effect.provide(fakeEngineLayer())),
  )

  it.effect("forced exit at layer 2 of 4 runs half the layers, and no block leaks", () =>
    Effect.gen(function* () {
      const batch = requests.map((r) => ({
        ...r,
        earlyExit: { threshold: 0, minExitLayer: 2, kv: "recompute" as const },
      }))
      const outputs = yield* Effect.forEach(batch, collect, { concurrency: "unbounded" })
      for (const events of outputs) for (const e of events.slice(1)) expect(e.exitLayer).toBe(2)
      const engine = yield* Engine
      const stats = yield* engine.stats
      expect(stats.kv.usedBlocks).toBe(0)
    }).pipe(Effect.provide(fakeEngineLayer())),
  )

  it.effect("speculative greedy decoding equals the reference token for token, for every draft exit and length", () =>
    Effect.gen(function* () {
      for (const exit of [1, 2, 3])
        for (const maxDraft of [1, 3, 6]) {
          const batch = requests.map((r) => ({ ...r, speculative: { exit, maxDraft } }))
          const outputs = yield* Effect.forEach(batch, collect, { concurrency: "unbounded" })
          outputs.forEach((events, i) => expect(ids(events)).toEqual(expected(requests[i]!)))
        }
      const stats = yield* Effect.flatMap(Engine, (e) => e.stats)
      expect(stats.speculative.verifications).toBeGreaterThan(0)
      expect(stats.speculative.accepted).toBeGreaterThan(0)
      expect(stats.speculative.accepted).toBeLessThan(stats.speculative.drafted)
      expect(stats.kv.usedBlocks).toBe(0)
    }).pipe(Effect.provide(fakeEngineLayer())),
  )

  it.effect("speculative rows beside plain and early-exit rows, under a pool small enough to preempt", () =>
    Effect.gen(function* () {
      const batch = requests.map((r, i) =>
        i % 3 === 0
          ? { ...r, speculative: { exit: 2, maxDraft: 4, threshold: 0.2 } }
          : i % 3 === 1
            ? { ...r, earlyExit: { threshold: 1.5 } }
            : r,
      )
      const outputs = yield* Effect.forEach(batch, collect, { concurrency: "unbounded" })
      outputs.forEach((events, i) => expect(ids(events)).toEqual(expected(requests[i]!)))
      const stats = yield* Effect.flatMap(Engine, (e) => e.stats)
      expect(stats.preemptions).toBeGreaterThan(0)
    }).pipe(Effect.provide(fakeEngineLayer({ runner: { numBlocks: 28, blockSize: 4 } }))),
  )

  it.effect("a speculative request refuses a draft exit the model does not have, and early exit settings", () =>
    Effect.gen(function* () {
      const engine = yield* Engine
      const bad = yield* Effect.flip(
        Stream.runDrain(engine.generate(greedy("abc", 4, { speculative: { exit: 4, maxDraft: 2 } }))),
      )
      expect(bad.message).toMatch(/speculative.exit must be one of the model's early exits \(1, 2, 3\), got 4/)
      const mixed = yield* Effect.flip(
        Stream.runDrain(
          engine.generate(greedy("abc", 4, { speculative: { exit: 2, maxDraft: 2 }, earlyExit: { threshold: 0.5 } })),
        ),
      )
      expect(mixed.message).toMatch(/does not combine with early exit/)
    }).pipe(Effect.provide(fakeEngineLayer())),
  )

  it.effect("a request without sampling, or with some of its fields, is greedy and equals the reference", () =>
    Effect.gen(function* () {
      for (const request of requests.slice(0, 6)) {
        const { prompt, maxTokens } = request
        expect(ids(yield* collect({ prompt, maxTokens }))).toEqual(expected(request))
        expect(ids(yield* collect({ prompt, maxTokens, sampling: { seed: 3, topK: 5 } }))).toEqual(expected(request))
      }
    }).pipe(Effect.provide(fakeEngineLayer())),
  )

  it.effect("a prompt of token ids gives the text prompt's output, and the engine does not tokenize it", () => {
    let encodes = 0
    const counting: TokenizerShape = {
      ...fakeTokenizer,
      encode: (text, options) =>
        Effect.zipRight(
          Effect.sync(() => encodes++),
          fakeTokenizer.encode(text, options),
        ),
    }
    return Effect.gen(function* () {
      for (const request of requests.slice(0, 6)) {
        const text = yield* collect(request)
        const before = encodes
        const promptIds = yield* fakeTokenizer.encode(request.prompt)
        expect(yield* collect({ ...request, prompt: promptIds })).toEqual(text)
        expect(encodes).toBe(before)
      }
      expect(encodes).toBe(6)
    }).pipe(Effect.provide(fakeEngineLayer({ tokenizer: counting })))
  })

  it.effect("a prompt of ids outside the vocabulary, or of none, is refused with what is wrong", () =>
    Effect.gen(function* () {
      const engine = yield* Engine
      const refusal = (prompt: ReadonlyArray<number>) =>
        Effect.flip(Stream.runDrain(engine.generate({ prompt, maxTokens: 4 }))).pipe(Effect.map((e) => e.message))
      expect(yield* refusal([0, 5, FAKE_VOCAB, FAKE_VOCAB + 1])).toBe(
        `prompt: token id ${FAKE_VOCAB} (at index 2) is not below the model's vocabulary size ${FAKE_VOCAB}; pass ids from this model's tokenizer`,
      )
      for (const prompt of [[], [-1], [0, 1.5]])
        expect(yield* refusal(prompt)).toBe(
          "prompt: must be a string or a non-empty array of token ids (integers >= 0)",
        )
      // The last id of the vocabulary is a prompt like any other.
      expect(yield* collect({ prompt: [0, FAKE_VOCAB - 1], maxTokens: 2 })).toHaveLength(2)
    }).pipe(Effect.provide(fakeEngineLayer())),
  )

  it.effect("each sample's last event sums up its exits: histogram, mean depth, layers skipped", () =>
    Effect.gen(function* () {
      const batch = requests.flatMap((r, i) => [
        { ...r, n: 2, earlyExit: { threshold: 0, minExitLayer: 2, kv: i % 2 === 0 ? "fill" : "recompute" } } as const,
        ...(i < 4 ? [{ ...r, speculative: { exit: 2, maxDraft: 3 } }, r] : []),
      ])
      const outputs = yield* Effect.forEach(batch, collect, { concurrency: "unbounded" })
      let skipped = 0
      for (const events of outputs)
        for (const sample of new Set(events.map((e) => e.sample))) {
          const own = events.filter((e) => e.sample === sample)
          const last = own.at(-1)!
          expect(last.finishReason).not.toBeNull()
          expect(own.slice(0, -1).every((e) => e.summary === undefined)).toBe(true)
          const histogram: Record<string, number> = {}
          for (const e of own) histogram[e.exitLayer] = (histogram[e.exitLayer] ?? 0) + 1
          const depth = own.reduce((sum, e) => sum + e.exitLayer, 0)
          expect(last.summary).toEqual({
            tokens: own.length,
            exitHistogram: histogram,
            meanExitDepth: depth / own.length,
            layersSkipped: own.length * FAKE_LAYERS - depth,
            layers: FAKE_LAYERS,
          })
          skipped += last.summary!.layersSkipped
        }
      // Early exit at layer 2 did skip layers, and the engine's own count agrees with the samples'.
      const stats = yield* Effect.flatMap(Engine, (e) => e.stats)
      expect(skipped).toBeGreaterThan(0)
      expect(stats.layersSkipped).toBe(skipped)
    }).pipe(Effect.provide(fakeEngineLayer())),
  )
})
