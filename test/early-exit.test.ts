/**
 * Early exit on stories260K (an exit after every layer, the shared final head): thresholds, both batch policies,
 * and the K/V of skipped layers under fill and recompute, against the plain-TypeScript reference.
 */

import { cpSync, readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "@effect/vitest"
import { buildClassifierGraph } from "@offramp/convert/ClassifierGraph"
import { type EarlyExitRequest, FULL_DEPTH, type KvStrategy } from "@offramp/core/EarlyExit"
import { Engine } from "@offramp/core/Engine"
import { featureCount } from "@offramp/core/ExitClassifier"
import type { GenerationRequest, TokenEvent } from "@offramp/core/Generation"
import { ModelRunner } from "@offramp/core/ModelRunner"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { Chunk, Deferred, Effect, Either, Fiber, Stream } from "effect"
import { beforeAll } from "vitest"
import { BENCH_PROMPTS } from "../apps/cli/src/commands/bench.js"
import { interleavedToHalfRow, loadLlama2cReference } from "./support/reference-llama.js"
import { convertStories, STORIES_CHECKPOINT, tempDir } from "./support/stories.js"

let modelDir = ""
beforeAll(async () => {
  modelDir = tempDir("early-exit")
  await convertStories(modelDir)
})

const BLOCK_SIZE = 16
const withEngine = () => Effect.provide(onnxEngineLayer(modelDir, { runner: { blockSize: BLOCK_SIZE } }))

const request = (prompt: string, maxTokens: number, earlyExit?: EarlyExitRequest): GenerationRequest => ({
  prompt,
  maxTokens,
  sampling: { temperature: 0, topK: 0, topP: 1 },
  ...(earlyExit ? { earlyExit } : {}),
})

const collect = (r: GenerationRequest) =>
  Effect.flatMap(Engine, (engine) => Stream.runCollect(engine.generate(r))).pipe(Effect.map(Chunk.toArray))

const ids = (events: ReadonlyArray<TokenEvent>) => events.map((e) => e.id)

const STRATEGIES = [
  { policy: "per-sequence", kv: "fill" },
  { policy: "per-sequence", kv: "recompute" },
  { policy: "all", kv: "fill" },
  { policy: "all", kv: "recompute" },
] as const

describe("thresholds", () => {
  it.effect("a threshold above 1 never exits: output identical to full depth under every policy and strategy", () =>
    Effect.gen(function* () {
      const full = yield* collect(request(BENCH_PROMPTS[0]!, 40))
      for (const strategy of STRATEGIES) {
        const early = yield* collect(request(BENCH_PROMPTS[0]!, 40, { ...strategy, threshold: 1.5 }))
        expect(ids(early)).toEqual(ids(full))
        expect(early.every((e) => e.exitLayer === 5)).toBe(true)
      }
      const stats = yield* Effect.flatMap(Engine, (e) => e.stats)
      expect(stats.headMs).toBe(0) // no intermediate head ran
    }).pipe(withEngine()),
  )

  it.effect("a threshold of 0 exits every generated token at the first allowed exit", () =>
    Effect.gen(function* () {
      for (const strategy of STRATEGIES) {
        for (const minExitLayer of [1, 3]) {
          const events = yield* collect(request(BENCH_PROMPTS[1]!, 12, { ...strategy, threshold: 0, minExitLayer }))
          // The first token comes from the prompt's prefill, which always runs the whole depth.
          expect(events[0]!.exitLayer).toBe(5)
          expect(events.slice(1).map((e) => e.exitLayer)).toEqual(Array(11).fill(minExitLayer))
        }
      }
      const stats = yield* Effect.flatMap(Engine, (e) => e.stats)
      expect(Object.values(stats.exitHistogram).reduce((a, b) => a + b, 0)).toBe(4 * 2 * 12)
      expect(stats.layersSkipped).toBe(4 * (11 * 4 + 11 * 2))
    }).pipe(withEngine()),
  )

  it.effect("per-exit thresholds and the measures order exits as configured", () =>
    Effect.gen(function* () {
      // Exit 1 and 2 closed, 3 always open: every decode token exits at layer 3.
      const events = yield* collect(
        request(BENCH_PROMPTS[2]!, 10, { threshold: 0, thresholds: { "1": 2, "2": 2 }, measure: "entropy" }),
      )
      expect(events.slice(1).every((e) => e.exitLayer === 3)).toBe(true)
      for (const measure of ["softmax", "margin", "entropy", "saturation"] as const) {
        const out = yield* collect(request(BENCH_PROMPTS[2]!, 10, { threshold: 0.5, measure }))
        for (const e of out) {
          expect(e.confidence).toBeGreaterThanOrEqual(0)
          expect(e.confidence).toBeLessThanOrEqual(1)
          if (e.exitLayer < 5) expect(e.confidence).toBeGreaterThanOrEqual(0.5)
        }
      }
    }).pipe(withEngine()),
  )
})

const reference = loadLlama2cReference(STORIES_CHECKPOINT)

const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let worst = 0
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!))
  return worst
}

/**
 * Runs one request alone on a fresh engine, whose cache hands out blocks 0, 1, 2, … in order, so position p
 * sits in pool slot p; returns the whole token sequence and the runner to read the pools.
 */
const alone = (prompt: string, maxTokens: number, kv: KvStrategy, threshold: number, minExitLayer = 1) =>
  Effect.gen(function* () {
    const runner = yield* ModelRunner
    const events = yield* collect(request(prompt, maxTokens, { threshold, kv, measure: "softmax", minExitLayer }))
    return { events, runner }
  })

describe("samples of one request", () => {
  it.effect("n samples all finish when a cached prompt leaves one token to compute, even at threshold 0", () =>
    Effect.gen(function* () {
      // Blocks of 4: the first request publishes the prompt's first block, so the second computes only the prompt's
      // last token, as a decode row that could exit early; its forks start from the full-depth head.
      const prompt = BENCH_PROMPTS[0]!
      yield* collect(request(prompt, 1))
      const events = yield* collect({ ...request(prompt, 3, { threshold: 0 }), n: 3 })
      for (let sample = 0; sample < 3; sample++) {
        const mine = events.filter((e) => e.sample === sample)
        expect(mine.map((e) => e.index)).toEqual([0, 1, 2])
        expect(mine[0]!.exitLayer).toBe(5)
      }
    }).pipe(Effect.provide(onnxEngineLayer(modelDir, { runner: { blockSize: 4 } }))),
  )
})

describe("K/V of skipped layers", () => {
  it.effect(
    "fill writes the reference projection of the exit hidden state into every skipped layer, once a later token needs it",
    () =>
      Effect.gen(function* () {
        const runner = yield* ModelRunner
        // Only exit 1 decides (stories260K's first exit is overconfident: most tokens leave there, a few go full depth).
        const events = yield* collect(
          request(BENCH_PROMPTS[0]!, 40, { threshold: 2, thresholds: { "1": 0.995 }, kv: "fill", measure: "softmax" }),
        )
        const { headDim } = runner.spec.dims
        const prompt = [1, 403, 407, 261, 378] // "Once upon a time"
        const tokens = [...prompt, ...ids(events)]
        const positions = reference.run(tokens.slice(0, -1))
        // Event i ran position prompt + i - 1. Positions that exited after layer 1 before the last one that went full
        // depth were filled before it ran layer 1; layer 0 is exact, so their exit state (hidden[0]) is the reference's.
        const exits = events.map((e) => e.exitLayer)
        const lastDeep = prompt.length + exits.lastIndexOf(5) - 1
        const filled = exits.flatMap((layer, i) =>
          i > 0 && layer === 1 && prompt.length + i - 1 < lastDeep ? [prompt.length + i - 1] : [],
        )
        expect(filled.length).toBeGreaterThanOrEqual(2)
        let worst = 0
        for (const p of filled) {
          const exitHidden = positions[p]!.hidden[0]!
          worst = Math.max(worst, maxDiff(runner.readKv(0, p).k, interleavedToHalfRow(positions[p]!.k[0]!, headDim)))
          for (let l = 1; l < 5; l++) {
            const want = reference.projectKv(l, exitHidden, p)
            worst = Math.max(worst, maxDiff(runner.readKv(l, p).k, interleavedToHalfRow(want.k, headDim)))
            worst = Math.max(worst, maxDiff(runner.readKv(l, p).v, want.v))
          }
        }
        expect(worst).toBeLessThan(1e-4)
      }).pipe(withEngine()),
  )

  it.effect(
    "one kvfill call takes more positions than the context length, and writes what one call per position does",
    () =>
      Effect.gen(function* () {
        // A fill waits for a later token that needs it, so one call can carry every pending position of many rows.
        const runner = yield* ModelRunner
        const { hidden: D, contextLength } = runner.spec.dims
        const n = contextLength + 8
        const hidden = Float32Array.from({ length: n * D }, (_, i) => Math.sin(i * 0.37))
        const positions = BigInt64Array.from({ length: n }, (_, i) => BigInt(i % contextLength))
        yield* runner.kvFill(
          0,
          hidden,
          positions,
          Int32Array.from({ length: n }, (_, i) => i),
        )
        const last = runner.spec.dims.layers - 1
        let worst = 0
        for (const i of [0, 1, contextLength - 1, contextLength, n - 1]) {
          const together = runner.readKv(last, i)
          const slot = n + i
          yield* runner.kvFill(0, hidden.slice(i * D, (i + 1) * D), positions.slice(i, i + 1), Int32Array.of(slot))
          worst = Math.max(
            worst,
            maxDiff(together.k, runner.readKv(last, slot).k),
            maxDiff(together.v, runner.readKv(last, slot).v),
          )
        }
        expect(worst).toBeLessThan(1e-5)
      }).pipe(withEngine()),
  )

  it.effect("recompute: once a pending token is processed, its K/V in every layer equal the full-depth K/V", () =>
    Effect.gen(function* () {
      // stories260K was not trained for early exit: its shallow exits are overconfident, so exits start at 3 here,
      // which mixes tokens pending from layer 3 and from layer 4.
      const { events, runner } = yield* alone(BENCH_PROMPTS[0]!, 60, "recompute", 0.9, 3)
      const { headDim } = runner.spec.dims
      const prompt = [1, 403, 407, 261, 378]
      const tokens = [...prompt, ...ids(events)]
      const exits = events.map((e) => e.exitLayer)
      expect(exits.includes(3) && exits.includes(4)).toBe(true)
      // The last token that went full depth was fed at position prompt + j - 1: everything up to it is resolved.
      const j = exits.lastIndexOf(5)
      expect(j).toBeGreaterThan(5)
      const resolved = prompt.length + j - 1
      const positions = reference.run(tokens.slice(0, resolved + 1))
      let worst = 0
      for (let p = 0; p <= resolved; p++) {
        for (let l = 0; l < 5; l++) {
          worst = Math.max(worst, maxDiff(runner.readKv(l, p).k, interleavedToHalfRow(positions[p]!.k[l]!, headDim)))
          worst = Math.max(worst, maxDiff(runner.readKv(l, p).v, positions[p]!.v[l]!))
        }
      }
      expect(worst).toBeLessThan(1e-4)
    }).pipe(withEngine()),
  )
})

describe("batch exit policies", () => {
  it.effect("per-sequence: a sequence's output is the same alone and inside a batch of 16 mixed requests", () =>
    Effect.gen(function* () {
      for (const kv of ["fill", "recompute"] as const) {
        const target = request(BENCH_PROMPTS[3]!, 40, { threshold: 0.7, kv, minExitLayer: 3 })
        const soloRun = yield* collect(target).pipe(withEngine())
        const others = Array.from({ length: 15 }, (_, i) =>
          request(BENCH_PROMPTS[i % BENCH_PROMPTS.length]!, 10 + i * 3, {
            threshold: [0.3, 0.8, 2][i % 3]!,
            kv: i % 2 ? "fill" : "recompute",
            minExitLayer: 1 + (i % 4),
          }),
        )
        const batched = yield* Effect.forEach([target, ...others], collect, { concurrency: "unbounded" }).pipe(
          withEngine(),
        )
        expect(ids(batched[0]!)).toEqual(ids(soloRun))
        expect(batched[0]!.map((e) => e.exitLayer)).toEqual(soloRun.map((e) => e.exitLayer))
        expect(soloRun.some((e) => e.exitLayer < 5) && soloRun.some((e) => e.exitLayer === 5)).toBe(true)
      }
    }),
  )

  it.effect("all: rows exit together only when the least confident row is confident", () =>
    Effect.gen(function* () {
      const engine = yield* Engine
      /** Runs `eager` while a never-confident request is decoding beside it. */
      const beside = (policy: "all" | "per-sequence") =>
        Effect.gen(function* () {
          const started = yield* Deferred.make<void>()
          const never = request(BENCH_PROMPTS[1]!, 60, { threshold: 2, policy })
          const other = yield* Effect.fork(
            engine.generate(never).pipe(
              Stream.tap(() => Deferred.succeed(started, undefined)),
              Stream.runCollect,
            ),
          )
          yield* Deferred.await(started)
          const eager = yield* collect(request(BENCH_PROMPTS[0]!, 30, { threshold: 0, policy }))
          const rest = yield* Fiber.join(other)
          return { eager: eager.map((e) => e.exitLayer), never: Chunk.toArray(rest).map((e) => e.exitLayer) }
        })
      // Under `all`, the minimum over rows decides: the eager request never exits early beside the other one.
      const together = yield* beside("all")
      expect(together.never.every((l) => l === 5)).toBe(true)
      expect(together.eager).toEqual(Array(30).fill(5))
      // Under `per-sequence`, the same pair exits independently.
      const independent = yield* beside("per-sequence")
      expect(independent.never.every((l) => l === 5)).toBe(true)
      expect(independent.eager.slice(1)).toEqual(Array(29).fill(1))
      // Alone, the eager request exits every decode token at the first exit under either policy.
      const soloRun = yield* collect(request(BENCH_PROMPTS[0]!, 30, { threshold: 0, policy: "all" }))
      expect(soloRun.slice(1).every((e) => e.exitLayer === 1)).toBe(true)
    }).pipe(withEngine()),
  )
})

describe("engine defaults", () => {
  it.effect("calibrated per-exit defaults apply until a request sets its own threshold", () =>
    Effect.gen(function* () {
      const calibrated = yield* collect(request(BENCH_PROMPTS[0]!, 8))
      expect(calibrated.slice(1).map((e) => e.exitLayer)).toEqual(Array(7).fill(3))
      const own = yield* collect(request(BENCH_PROMPTS[0]!, 8, { threshold: 2 }))
      expect(own.every((e) => e.exitLayer === 5)).toBe(true)
      const perExit = yield* collect(request(BENCH_PROMPTS[0]!, 8, { threshold: 2, thresholds: { "4": 0 } }))
      expect(perExit.slice(1).map((e) => e.exitLayer)).toEqual(Array(7).fill(4))
    }).pipe(
      Effect.provide(
        onnxEngineLayer(modelDir, {
          earlyExit: { ...FULL_DEPTH, threshold: 2, thresholds: { "3": 0 } },
        }),
      ),
    ),
  )
})

describe("learned exit classifiers", () => {
  it.effect("the classifier measure uses the model's exit classifier graphs", () =>
    Effect.gen(function* () {
      // Exit 1: a classifier that never says "exit" (bias −20); exit 2: one that always does (bias +20).
      const dir = tempDir("classifier")
      cpSync(modelDir, dir, { recursive: true })
      const dim = 64
      const constant = (bias: number) =>
        buildClassifierGraph(
          {
            kind: "logistic",
            inputs: featureCount(dim),
            hidden: 0,
            w1: new Float32Array(featureCount(dim)),
            b1: Float32Array.of(bias),
            w2: new Float32Array(0),
            b2: 0,
          },
          dim,
        )
      writeFileSync(join(dir, "classifier_2.onnx"), constant(20))
      writeFileSync(join(dir, "classifier_1.onnx"), constant(-20))
      const spec = JSON.parse(readFileSync(join(dir, "model.json"), "utf8"))
      spec.exits[0].classifier = "classifier_1.onnx"
      spec.exits[1].classifier = "classifier_2.onnx"
      writeFileSync(join(dir, "model.json"), JSON.stringify(spec))
      const events = yield* collect(request(BENCH_PROMPTS[0]!, 8, { measure: "classifier", threshold: 0.5 })).pipe(
        Effect.provide(onnxEngineLayer(dir)),
      )
      expect(events.slice(1).map((e) => e.exitLayer)).toEqual(Array(7).fill(2))
      expect(events[1]!.confidence).toBeCloseTo(1, 6)
      // A model without classifiers refuses the measure with a typed error.
      const refused = yield* Effect.either(collect(request(BENCH_PROMPTS[0]!, 8, { measure: "classifier" })))
      expect(Either.isLeft(refused) && refused.left.message).toMatch(/needs exit classifiers/)
    }).pipe(withEngine()),
  )
})
