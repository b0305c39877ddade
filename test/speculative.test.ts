/**
 * Self-speculative decoding on real models (onnxruntime): greedy output is full depth's token for token, for 16
 * concurrent requests of different lengths, on the default model and on stories260K, also under a KV pool small
 * enough to force preemption; sampled output follows full depth's distribution (first tokens over many seeds).
 */
import { describe, expect, it } from "@effect/vitest"
import { Engine, type GenerationRequest, greedyParams, type TokenEvent } from "@offramp/core"
import { DEFAULT_MODEL_DIR, type OnnxEngineConfig, onnxEngineLayer } from "@offramp/onnx"
import { Chunk, Effect, Stream } from "effect"
import { beforeAll } from "vitest"
import { BENCH_PROMPTS } from "../apps/cli/src/commands/bench.js"
import { convertStories, tempDir } from "./support/stories.js"

let storiesDir = ""
beforeAll(async () => {
  storiesDir = tempDir("speculative")
  await convertStories(storiesDir)
})

const requests = (prompts: ReadonlyArray<string>): Array<GenerationRequest> =>
  Array.from({ length: 16 }, (_, i) => ({
    prompt: `${prompts[i % prompts.length]}${i >= prompts.length ? " and" : ""}`,
    maxTokens: 12 + ((i * 13) % 48),
    sampling: greedyParams,
  }))

const collect = (request: GenerationRequest) =>
  Effect.flatMap(Engine, (engine) => Stream.runCollect(engine.generate(request))).pipe(
    Effect.map((events) => Chunk.toArray(events)),
  )
const ids = (events: ReadonlyArray<TokenEvent>) => events.map((e) => e.id)

/** Full depth's outputs, then the same requests speculating, all 16 at once, on one engine. */
const compare = (dir: string, speculative: GenerationRequest["speculative"], config: OnnxEngineConfig = {}) =>
  Effect.gen(function* () {
    const plain = requests(BENCH_PROMPTS).map((r) => ({ ...r, earlyExit: { threshold: 2 } }))
    const full = yield* Effect.forEach(plain, collect, { concurrency: "unbounded" })
    const batch = requests(BENCH_PROMPTS).map((r) => ({ ...r, speculative }))
    const speculated = yield* Effect.forEach(batch, collect, { concurrency: "unbounded" })
    speculated.forEach((events, i) => expect(ids(events)).toEqual(ids(full[i]!)))
    const stats = yield* Effect.flatMap(Engine, (e) => e.stats)
    return stats
  }).pipe(Effect.provide(onnxEngineLayer(dir, config)))

describe("self-speculative decoding (onnxruntime)", () => {
  it.effect("default model: greedy speculation equals full depth for 16 concurrent requests, at each draft exit", () =>
    Effect.gen(function* () {
      for (const exit of [2, 4, 6]) {
        const stats = yield* compare(DEFAULT_MODEL_DIR, { exit, maxDraft: 5, threshold: 0 })
        // Drafts at a trained exit are mostly right: far more than one token kept per verification.
        expect(stats.speculative.kept / stats.speculative.verifications).toBeGreaterThan(1.5)
        expect(stats.kv.usedBlocks).toBe(0)
      }
    }),
  )

  it.effect("default model: the same under a KV pool small enough to preempt", () =>
    Effect.gen(function* () {
      const stats = yield* compare(
        DEFAULT_MODEL_DIR,
        { exit: 4, maxDraft: 6, threshold: 0.3 },
        { runner: { blockSize: 8, numBlocks: 40 } },
      )
      expect(stats.preemptions).toBeGreaterThan(0)
    }),
  )

  it.effect("stories260K: greedy speculation equals full depth, at every draft exit and draft length", () =>
    Effect.gen(function* () {
      for (const exit of [1, 3])
        for (const maxDraft of [1, 4]) yield* compare(storiesDir, { exit, maxDraft }, { runner: { blockSize: 4 } })
    }),
  )
})
