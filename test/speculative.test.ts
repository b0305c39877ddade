/**
 * Self-speculative decoding on real models (onnxruntime): greedy output is full depth's token for token, for 16
 * concurrent requests of different lengths, on the default model and on stories260K, also under a KV pool small
 * enough to force preemption; sampled output follows full depth's distribution (first tokens over many seeds).
 */
import { describe, expect, it } from "@effect/vitest"
import { Engine } from "@offramp/core/Engine"
import type { GenerationRequest, TokenEvent } from "@offramp/core/Generation"
import { greedyParams } from "@offramp/core/Sampler"
import { modelDir as DEFAULT_MODEL_DIR } from "@offramp/default-model"
import { type OnnxEngineConfig, onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
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
const compare = (
  dir: string,
  speculative: NonNullable<GenerationRequest["speculative"]>,
  config: OnnxEngineConfig = {},
) =>
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

  it.effect("stories260K: greedy speculation equals full depth, at draft exits and lengths, and under preemption", () =>
    Effect.gen(function* () {
      for (const exit of [1, 3])
        for (const maxDraft of [1, 4]) yield* compare(storiesDir, { exit, maxDraft }, { runner: { blockSize: 4 } })
      // And under a pool small enough to preempt.
      const stats = yield* compare(storiesDir, { exit: 2, maxDraft: 4 }, { runner: { blockSize: 4, numBlocks: 40 } })
      expect(stats.preemptions).toBeGreaterThan(0)
    }),
  )

  it.effect(
    "stories260K: sampled speculation follows full depth's distribution (the first speculated token over 640 draws each)",
    () =>
      Effect.gen(function* () {
        // The second token of each sample is the first one speculation produces (the first comes from the prompt's
        // full-depth pass). 640 samples each way: 10 seeds × n = 64, at temperature 1.
        const draw = (speculative: GenerationRequest["speculative"]) =>
          Effect.forEach(
            Array.from({ length: 10 }, (_, seed) => seed),
            (seed) =>
              collect({
                prompt: "Once upon a time",
                maxTokens: 2,
                sampling: { temperature: 1, topK: 0, topP: 1, seed: 1000 + seed },
                n: 64,
                ...(speculative ? { speculative } : { earlyExit: { threshold: 2 } }),
              }),
            { concurrency: "unbounded" },
          ).pipe(
            Effect.map((all) =>
              all
                .flat()
                .filter((e) => e.index === 1)
                .map((e) => e.id),
            ),
          )
        const full = yield* draw(undefined)
        // A shallow draft exit, whose distribution differs much from the full model's.
        const speculated = yield* draw({ exit: 1, maxDraft: 1 })
        expect(full).toHaveLength(640)
        expect(speculated).toHaveLength(640)
        const stats = yield* Effect.flatMap(Engine, (e) => e.stats)
        expect(stats.speculative.accepted).toBeLessThan(stats.speculative.drafted)
        // Chi-square test of homogeneity over the tokens seen at least 10 times in all, the rest pooled.
        const counts = new Map<number, [number, number]>()
        for (const id of full) counts.set(id, [(counts.get(id)?.[0] ?? 0) + 1, counts.get(id)?.[1] ?? 0])
        for (const id of speculated) counts.set(id, [counts.get(id)?.[0] ?? 0, (counts.get(id)?.[1] ?? 0) + 1])
        const cells: Array<[number, number]> = []
        const rest: [number, number] = [0, 0]
        for (const [a, b] of counts.values()) {
          if (a + b >= 10) cells.push([a, b])
          else {
            rest[0] += a
            rest[1] += b
          }
        }
        if (rest[0] + rest[1] > 0) cells.push(rest)
        const n = full.length + speculated.length
        let x = 0
        for (const [a, b] of cells) {
          const expected = (a + b) / 2
          x += (a - expected) ** 2 / expected + (b - expected) ** 2 / expected
        }
        void n
        const df = cells.length - 1
        expect(df).toBeGreaterThanOrEqual(3)
        // The 0.999 quantile of chi-square with df degrees of freedom (Wilson–Hilferty): a false alarm 1 time in 1000.
        const z = 3.09
        const critical = df * (1 - 2 / (9 * df) + z * Math.sqrt(2 / (9 * df))) ** 3
        expect(x).toBeLessThan(critical)
      }).pipe(Effect.provide(onnxEngineLayer(storiesDir, { runner: { blockSize: 4 } }))),
  )
})
