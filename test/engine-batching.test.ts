/**
 * Continuous batching over the paged KV cache, on stories260K: batched outputs equal solo outputs, preemption,
 * prefix caching, n > 1, cancellation, bad input and shutdown.
 */

import { describe, expect, it } from "@effect/vitest"
import { Engine } from "@offramp/core/Engine"
import type { GenerationRequest, TokenEvent } from "@offramp/core/Generation"
import { KvCache } from "@offramp/core/KvCache"
import { type OnnxEngineConfig, onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { Chunk, Context, Effect, Either, Exit, Fiber, Layer, Scope, Stream } from "effect"
import { beforeAll } from "vitest"
import { BENCH_PROMPTS } from "../apps/cli/src/commands/bench.js"
import { loadLlama2cReference } from "./support/reference-llama.js"
import { convertStories, REFERENCE_IDS, STORIES_CHECKPOINT, tempDir } from "./support/stories.js"

let modelDir = ""
beforeAll(async () => {
  modelDir = tempDir("engine")
  await convertStories(modelDir)
})

const greedy = (prompt: string, maxTokens: number): GenerationRequest => ({
  prompt,
  maxTokens,
  sampling: { temperature: 0, topK: 0, topP: 1 },
})

/** 16 requests: different prompts and lengths. */
const REQUESTS = Array.from({ length: 16 }, (_, i) =>
  greedy(`${BENCH_PROMPTS[i % BENCH_PROMPTS.length]}${i >= 8 ? ". Then" : ""}`, 20 + ((i * 13) % 50)),
)

const collect = (request: GenerationRequest) =>
  Effect.flatMap(Engine, (engine) => Stream.runCollect(engine.generate(request))).pipe(
    Effect.map((events) => Chunk.toArray(events)),
  )

const ids = (events: ReadonlyArray<TokenEvent>) => events.map((e) => e.id)

const withEngine = (config: OnnxEngineConfig = {}) => Effect.provide(onnxEngineLayer(modelDir, config))

const solo = (requests: ReadonlyArray<GenerationRequest>) =>
  Effect.forEach(requests, (r) => Effect.map(collect(r), ids)).pipe(withEngine())

/** Waits until the engine loop has nothing running, then reads the KV figures (tests using it run on the live clock). */
const idleKv = Effect.gen(function* () {
  const engine = yield* Engine
  for (let i = 0; i < 200; i++) {
    const stats = yield* engine.stats
    if (stats.running === 0 && stats.waiting === 0) return stats.kv
    yield* Effect.sleep("5 millis")
  }
  throw new Error("the engine did not become idle")
})

describe("continuous batching (stories260K)", () => {
  it.effect("16 concurrent greedy requests give each request's solo output", () =>
    Effect.gen(function* () {
      const alone = yield* solo(REQUESTS)
      const together = yield* Effect.forEach(REQUESTS, (r) => Effect.map(collect(r), ids), {
        concurrency: "unbounded",
      }).pipe(withEngine())
      expect(together).toEqual(alone)
      expect(alone.map((a) => a.length)).toEqual(REQUESTS.map((r) => r.maxTokens))
    }),
  )

  it.live("a pool too small for all sequences preempts and still gives the same outputs", () =>
    Effect.gen(function* () {
      const requests = REQUESTS.slice(0, 8).map((r) => ({ ...r, maxTokens: 60 }))
      const alone = yield* solo(requests)
      const program = Effect.gen(function* () {
        const outputs = yield* Effect.forEach(requests, (r) => Effect.map(collect(r), ids), {
          concurrency: "unbounded",
        })
        const engine = yield* Engine
        const stats = yield* engine.stats
        const kv = yield* idleKv
        return { outputs, preemptions: stats.preemptions, used: kv.usedBlocks }
      })
      // 8 sequences of ~70 positions need ~40 blocks of 16; 12 blocks force preemption.
      const small = yield* program.pipe(withEngine({ runner: { numBlocks: 12, blockSize: 16 } }))
      expect(small.outputs).toEqual(alone)
      expect(small.preemptions).toBeGreaterThan(0)
      expect(small.used).toBe(0)
    }),
  )

  it.effect("a repeated long prompt reuses cached blocks, computes fewer prefill tokens, same output", () =>
    Effect.gen(function* () {
      const prompt = Array.from({ length: 6 }, (_, i) => BENCH_PROMPTS[i]).join(". ")
      const request = greedy(prompt, 16)
      const program = Effect.gen(function* () {
        const engine = yield* Engine
        const first = yield* collect(request)
        const afterFirst = yield* engine.stats
        const second = yield* collect(request)
        const afterSecond = yield* engine.stats
        return { first, second, afterFirst, afterSecond }
      })
      const { first, second, afterFirst, afterSecond } = yield* program.pipe(withEngine({ runner: { blockSize: 8 } }))
      expect(ids(second)).toEqual(ids(first))
      expect(afterFirst.kv.prefixHits).toBe(0)
      expect(afterSecond.kv.prefixHits).toBeGreaterThan(0)
      const firstPrefill = afterFirst.prefillTokens
      const secondPrefill = afterSecond.prefillTokens - afterFirst.prefillTokens
      expect(secondPrefill).toBeLessThan(firstPrefill)
      expect(secondPrefill).toBe(firstPrefill - afterSecond.kv.prefixHits * 8)
    }),
  )

  it.effect("n = 3 greedy samples share the prompt's blocks and equal the single greedy output", () =>
    Effect.gen(function* () {
      const request = greedy(BENCH_PROMPTS[1]!, 30)
      const [single] = yield* solo([request])
      const events = yield* collect({ ...request, n: 3 }).pipe(withEngine({ runner: { blockSize: 4 } }))
      for (const sample of [0, 1, 2]) expect(ids(events.filter((e) => e.sample === sample))).toEqual(single)
    }),
  )

  it.effect("samples that wait for room (n above the per-group running cap) still equal the single greedy output", () =>
    Effect.gen(function* () {
      const request = greedy(BENCH_PROMPTS[1]!, 30)
      const [single] = yield* solo([request])
      const engine = withEngine({ runner: { blockSize: 4 }, scheduler: { maxRunning: 8, maxRunningPerGroup: 2 } })
      const events = yield* collect({ ...request, n: 5 }).pipe(engine)
      for (const sample of [0, 1, 2, 3, 4]) expect(ids(events.filter((e) => e.sample === sample))).toEqual(single)
    }),
  )

  it.effect(
    "one request with many prompts and samples takes a bounded share: another request is served meanwhile",
    () =>
      Effect.gen(function* () {
        let hogTokens = 0
        let hogTokensWhenOtherEnded = -1
        const hog = Array.from({ length: 8 }, (_, i) => ({ ...greedy(BENCH_PROMPTS[i % 4]!, 24), n: 8, group: 1 }))
        const hogStreams = Effect.forEach(
          hog,
          (r) =>
            Effect.flatMap(Engine, (engine) =>
              Stream.runForEach(engine.generate(r), () => Effect.sync(() => hogTokens++)),
            ),
          { concurrency: "unbounded" },
        )
        const other = Effect.gen(function* () {
          // Submitted once the hog's prompts are in the engine.
          const engine = yield* Engine
          while ((yield* engine.stats).running === 0) yield* Effect.yieldNow()
          const events = yield* collect(greedy(BENCH_PROMPTS[5]!, 8))
          hogTokensWhenOtherEnded = hogTokens
          return events
        })
        const [, events] = yield* Effect.all([hogStreams, other], { concurrency: "unbounded" }).pipe(
          withEngine({ scheduler: { maxRunning: 8 } }),
        )
        expect(events).toHaveLength(8)
        expect(hogTokens).toBe(8 * 8 * 24)
        // The hog has 64 sequences; with at most 2 of them running (a quarter of 8), the other request ran beside
        // them from its first step, and ended before the hog had produced a quarter of its tokens.
        expect(hogTokensWhenOtherEnded).toBeGreaterThanOrEqual(0)
        expect(hogTokensWhenOtherEnded).toBeLessThan((8 * 8 * 24) / 4)
      }),
  )

  it.effect("seeded samples are reproducible under batching", () =>
    Effect.gen(function* () {
      const request: GenerationRequest = {
        prompt: BENCH_PROMPTS[2]!,
        maxTokens: 40,
        sampling: { temperature: 1, topK: 0, topP: 0.95, seed: 11 },
        n: 2,
      }
      const alone = yield* collect(request).pipe(withEngine())
      const batched = yield* Effect.forEach([request, ...REQUESTS.slice(0, 6)], collect, {
        concurrency: "unbounded",
      }).pipe(withEngine())
      const bySample = (events: ReadonlyArray<TokenEvent>, s: number) => ids(events.filter((e) => e.sample === s))
      expect(bySample(batched[0]!, 0)).toEqual(bySample(alone, 0))
      expect(bySample(batched[0]!, 1)).toEqual(bySample(alone, 1))
      expect(bySample(alone, 0)).not.toEqual(bySample(alone, 1))
    }),
  )

  it.effect("the n seeded samples of a request do not share their first token", () =>
    Effect.gen(function* () {
      // Each sample has its own stream of the seed; before, the first draw of every stream of a seed below 2^32 was
      // the same number, so all n samples began with one token.
      const events = yield* collect({
        prompt: BENCH_PROMPTS[0]!,
        maxTokens: 1,
        sampling: { temperature: 1, topK: 0, topP: 1, seed: 3 },
        n: 8,
      }).pipe(withEngine())
      expect(events).toHaveLength(8)
      expect(new Set(ids(events)).size).toBeGreaterThan(1)
    }),
  )

  it.live("interrupting a stream cancels its sequence and frees its blocks", () =>
    Effect.gen(function* () {
      const engine = yield* Engine
      const fibers = yield* Effect.forEach(REQUESTS.slice(0, 4), (r) =>
        Effect.fork(Stream.runDrain(engine.generate({ ...r, maxTokens: 400 }))),
      )
      yield* Effect.sleep("30 millis")
      yield* Effect.forEach(fibers, Fiber.interrupt)
      const kv = yield* idleKv
      expect(kv.usedBlocks).toBe(0)
      const cache = yield* KvCache
      cache.evictCached()
      expect(cache.stats().freeBlocks).toBe(cache.stats().totalBlocks)
    }).pipe(withEngine()),
  )
})

describe("teacher forcing", () => {
  it.effect("forced tokens are emitted in order with the reference's log-probabilities", () =>
    Effect.gen(function* () {
      const forced = REFERENCE_IDS.slice(5, 30)
      const events = yield* collect({ ...greedy("Once upon a time", 100), forcedTokens: [...forced].reverse() })
      expect(ids(events)).toEqual([...forced].reverse())
      expect(events.at(-1)!.finishReason).toBe("length")
      const reference = loadLlama2cReference(STORIES_CHECKPOINT)
      const positions = reference.run([...REFERENCE_IDS.slice(0, 5), ...[...forced].reverse()])
      events.forEach((event, i) => {
        const logits = positions[4 + i]!.logits
        const max = Math.max(...logits)
        const logSum = Math.log(logits.reduce((sum, v) => sum + Math.exp(v - max), 0))
        expect(Math.abs(event.logprob - (logits[event.id]! - max - logSum))).toBeLessThan(1e-4)
      })
    }).pipe(withEngine()),
  )
})

describe("bad input and shutdown", () => {
  it.effect("a prompt that can never fit the pool or the context fails at admission", () =>
    Effect.gen(function* () {
      const long = "Once upon a time there was a cat. ".repeat(12)
      const pool = yield* Effect.either(collect(greedy(long, 5)))
      expect(Either.isLeft(pool) && pool.left._tag).toBe("InvalidRequestError")
      expect(Either.isLeft(pool) && pool.left.message).toMatch(/KV cache holds 64/)
      const context = yield* Effect.either(collect(greedy("Once upon a time ".repeat(200), 5)))
      expect(Either.isLeft(context) && context.left.message).toMatch(/context is 512/)
      // The engine still serves a request that fits.
      expect((yield* collect(greedy("Once upon a time", 5))).length).toBe(5)
    }).pipe(withEngine({ runner: { numBlocks: 4, blockSize: 16 } })),
  )

  it.live("shutting the engine down ends in-flight streams with EngineStoppedError", () =>
    Effect.gen(function* () {
      const scope = yield* Scope.make()
      const context = yield* Layer.buildWithScope(onnxEngineLayer(modelDir), scope)
      const engine = Context.get(context, Engine)
      const fibers = yield* Effect.forEach(REQUESTS.slice(0, 3), (r) =>
        Effect.fork(Stream.runCollect(engine.generate({ ...r, maxTokens: 500 }))),
      )
      yield* Effect.sleep("30 millis")
      yield* Scope.close(scope, Exit.void)
      for (const fiber of fibers) {
        const exit = yield* Fiber.await(fiber)
        expect(Exit.isFailure(exit) && JSON.stringify(exit.cause)).toContain("EngineStoppedError")
      }
      const late = yield* Effect.either(Stream.runCollect(engine.generate(greedy("hi", 3))))
      expect(Either.isLeft(late) && late.left._tag).toBe("EngineStoppedError")
    }),
  )
})
