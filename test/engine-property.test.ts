/**
 * A property test of the engine over random arrivals, lengths, samples, cancellations, early-exit settings
 * (every policy, KV strategy and measure, gated decisions, random exit classifiers), self-speculative decoding
 * (every draft exit, draft lengths, rollback) and small pools:
 * every request completes or fails with a typed error, and once the engine is idle no block is held
 * (cached blocks evict to zero).
 */
import { Engine } from "@offramp/core/Engine"
import type { GenerationRequest } from "@offramp/core/Generation"
import { KvCache } from "@offramp/core/KvCache"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { Effect, Fiber, Stream } from "effect"
import fc from "fast-check"
import { beforeAll, describe, expect, it } from "vitest"
import { BENCH_PROMPTS } from "../apps/cli/src/commands/bench.js"
import { writeRandomClassifiers } from "./support/classifiers.js"
import { convertStories, tempDir } from "./support/stories.js"

let modelDir = ""
beforeAll(async () => {
  modelDir = tempDir("property")
  await convertStories(modelDir)
  // Random classifiers: the classifier measure's decisions are arbitrary, which is what the property wants.
  writeRandomClassifiers(modelDir, 11)
})

const TYPED_ERRORS = new Set(["InvalidRequestError", "RunnerError", "TokenizerError"])

const arrival = fc.record({
  delayMs: fc.integer({ min: 0, max: 15 }),
  prompt: fc.integer({ min: 0, max: BENCH_PROMPTS.length - 1 }),
  repeat: fc.integer({ min: 1, max: 4 }),
  maxTokens: fc.integer({ min: 1, max: 40 }),
  n: fc.integer({ min: 1, max: 3 }),
  temperature: fc.constantFrom(0, 0.8),
  earlyExit: fc.record({
    threshold: fc.constantFrom(0, 0.5, 0.9, 2),
    minExitLayer: fc.integer({ min: 1, max: 5 }),
    policy: fc.constantFrom("per-sequence" as const, "all" as const),
    kv: fc.constantFrom("fill" as const, "recompute" as const),
    measure: fc.constantFrom(
      "softmax" as const,
      "margin" as const,
      "entropy" as const,
      "saturation" as const,
      "classifier" as const,
    ),
    // A gated decision (a head-free measure, then the head confirms); ignored by the head measures.
    confirm: fc.option(fc.constantFrom(0.05, 0.3), { nil: undefined }),
  }),
  /** Self-speculative decoding instead of early exit (stories260K's early exits are after layers 1 to 4). */
  speculative: fc.option(
    fc.record({
      exit: fc.integer({ min: 1, max: 4 }),
      maxDraft: fc.integer({ min: 1, max: 6 }),
      threshold: fc.constantFrom(0, 0.5),
    }),
    { nil: undefined },
  ),
  /** Interrupt the stream after this many events (none: let it finish). */
  cancelAfter: fc.option(fc.integer({ min: 0, max: 20 }), { nil: undefined }),
})

type Outcome = "completed" | "cancelled" | "typed-error"

const run = (arrivals: ReadonlyArray<typeof arrival extends fc.Arbitrary<infer A> ? A : never>) =>
  Effect.gen(function* () {
    const engine = yield* Engine
    const fibers = []
    for (const a of arrivals) {
      yield* Effect.sleep(`${a.delayMs} millis`)
      const request: GenerationRequest = {
        prompt: Array.from({ length: a.repeat }, () => BENCH_PROMPTS[a.prompt]).join(" and "),
        maxTokens: a.maxTokens,
        sampling: { temperature: a.temperature, topK: 0, topP: 1, seed: a.delayMs },
        n: a.n,
        ...(a.speculative
          ? { speculative: a.speculative }
          : {
              earlyExit: (({ confirm, ...rest }) => (confirm === undefined ? rest : { ...rest, confirm }))(a.earlyExit),
            }),
      }
      const stream =
        a.cancelAfter === undefined
          ? engine.generate(request)
          : engine.generate(request).pipe(Stream.take(a.cancelAfter))
      fibers.push(
        yield* Effect.fork(
          Stream.runCollect(stream).pipe(
            Effect.map((events): Outcome => {
              if (a.cancelAfter !== undefined) return "cancelled"
              // Every sample ends with a finish reason within its token limit.
              for (let s = 0; s < a.n; s++) {
                const mine = [...events].filter((e) => e.sample === s)
                if (mine.length === 0 || mine.length > a.maxTokens || mine.at(-1)!.finishReason === null) {
                  throw new Error(`sample ${s} ended badly: ${JSON.stringify(mine.at(-1))}`)
                }
              }
              return "completed"
            }),
            Effect.catchAll((e) => (TYPED_ERRORS.has(e._tag) ? Effect.succeed<Outcome>("typed-error") : Effect.die(e))),
          ),
        ),
      )
    }
    const outcomes = yield* Effect.forEach(fibers, Fiber.join)
    // Wait for the loop to drop cancelled sequences.
    for (let i = 0; i < 400; i++) {
      const stats = yield* engine.stats
      if (stats.running === 0 && stats.waiting === 0) break
      yield* Effect.sleep("5 millis")
    }
    const kv = yield* KvCache
    const idle = kv.stats()
    const evicted = kv.evictCached()
    return { outcomes, idle, evicted, after: kv.stats() }
  })

describe("engine under random load (stories260K, small pools)", () => {
  it("every request completes or fails typed, and no block leaks", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(arrival, { minLength: 1, maxLength: 8 }),
        fc.integer({ min: 5, max: 12 }),
        fc.constantFrom(2, 4, 8),
        async (arrivals, numBlocks, blockSize) => {
          const result = await Effect.runPromise(
            run(arrivals).pipe(Effect.provide(onnxEngineLayer(modelDir, { runner: { numBlocks, blockSize } }))),
          )
          expect(result.outcomes.length).toBe(arrivals.length)
          expect(result.idle.usedBlocks).toBe(0)
          expect(result.idle.freeBlocks + result.idle.cachedBlocks).toBe(numBlocks)
          expect(result.evicted).toBe(result.idle.cachedBlocks)
          expect(result.after.freeBlocks).toBe(numBlocks)
        },
      ),
      { numRuns: 40 },
    )
  })
})
