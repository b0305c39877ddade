/**
 * The engine in a worker thread behind the Engine interface: the same output and typed errors as in-process,
 * cancellation that returns KV blocks, and shutdown that ends in-flight streams with EngineStoppedError. These
 * tests load the worker's TypeScript under vitest; the CLI test at the end does so under the CLI's tsx.
 */

import { describe, expect, it } from "@effect/vitest"
import { Engine } from "@offramp/core/Engine"
import { EngineStoppedError, InvalidRequestError } from "@offramp/core/Errors"
import type { GenerationRequest, TokenEvent } from "@offramp/core/Generation"
import { Tokenizer } from "@offramp/core/Tokenizer"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import * as WorkerEngine from "@offramp/onnx/WorkerEngine"
import { Chunk, Context, Deferred, Effect, Exit, Fiber, Layer, Scope, Stream } from "effect"
import { beforeAll } from "vitest"
import { BENCH_PROMPTS } from "../apps/cli/src/commands/bench.js"
import { abandonedStream, metric, startServer, waitIdle } from "../packages/server/test/support.js"
import { jsonLines, runCli } from "./support/cli.js"
import { convertStories, REFERENCE_CONTINUATION, tempDir } from "./support/stories.js"

let modelDir = ""
beforeAll(async () => {
  modelDir = tempDir("worker-engine")
  await convertStories(modelDir)
})

const greedy = (prompt: string, maxTokens: number): GenerationRequest => ({
  prompt,
  maxTokens,
  sampling: { temperature: 0, topK: 0, topP: 1 },
})

const collect = (request: GenerationRequest) =>
  Effect.flatMap(Engine, (engine) => Stream.runCollect(engine.generate(request))).pipe(Effect.map(Chunk.toArray))

const texts = (runs: ReadonlyArray<ReadonlyArray<TokenEvent>>) =>
  runs.map((events) => events.map((e) => e.text).join(""))

/** Stats until the engine is idle (nothing running or waiting). */
const idleStats = Effect.gen(function* () {
  const engine = yield* Engine
  for (let i = 0; i < 400; i++) {
    const stats = yield* engine.stats
    if (stats.running === 0 && stats.waiting === 0) return stats
    yield* Effect.sleep("25 millis")
  }
  return yield* Effect.die("the engine did not become idle")
})

describe("WorkerEngine", () => {
  it.live("greedy output through the worker equals the in-process engine's, for concurrent requests", () =>
    Effect.gen(function* () {
      const requests = [
        greedy("Once upon a time", 60),
        ...BENCH_PROMPTS.slice(1, 6).map((p, i) => greedy(p, 20 + i * 7)),
        { ...greedy(BENCH_PROMPTS[6]!, 24), n: 2, sampling: { temperature: 0.9, topK: 0, topP: 1, seed: 11 } },
      ]
      const all = Effect.forEach(requests, collect, { concurrency: "unbounded" })
      const worker = yield* Effect.provide(all, WorkerEngine.layer(modelDir))
      const local = yield* Effect.provide(all, onnxEngineLayer(modelDir))
      expect(texts(worker)[0]).toBe(REFERENCE_CONTINUATION)
      expect(worker).toEqual(local)
      // Each sample's summary crosses the thread, on its last event only.
      for (const e of worker.flat()) expect(e.summary !== undefined).toBe(e.finishReason !== null)
      // Sampled with a seed: both samples of n = 2 arrive, each with its own finish.
      expect(
        worker
          .at(-1)!
          .filter((e) => e.finishReason !== null)
          .map((e) => e.sample),
      ).toEqual(expect.arrayContaining([0, 1]))
    }),
  )

  it.live("the Tokenizer and the engine's spec and stats are served on the main thread", () =>
    Effect.gen(function* () {
      const engine = yield* Engine
      const tokenizer = yield* Tokenizer
      expect(engine.spec.name).toBe("stories260K")
      expect(yield* tokenizer.encode("Once upon a time")).toEqual([1, 403, 407, 261, 378])
      yield* collect(greedy("Once upon a time", 5))
      const stats = yield* engine.stats
      expect(stats.decodeTokens).toBe(4)
      expect(stats.exitHistogram[engine.spec.dims.layers]).toBe(5)
    }).pipe(Effect.provide(WorkerEngine.layer(modelDir))),
  )

  it.live("an invalid request fails with the same typed error as in-process", () =>
    Effect.gen(function* () {
      const bad: ReadonlyArray<GenerationRequest> = [
        greedy("Once", 0),
        greedy("x".repeat(3000), 4),
        { ...greedy("Once", 4), earlyExit: { measure: "classifier", threshold: 0.5 } },
      ]
      const failures = Effect.forEach(bad, (r) => Effect.flip(collect(r)))
      const worker = yield* Effect.provide(failures, WorkerEngine.layer(modelDir))
      const local = yield* Effect.provide(failures, onnxEngineLayer(modelDir))
      for (const error of worker) expect(error).toBeInstanceOf(InvalidRequestError)
      expect(worker.map((e) => [e._tag, e.message])).toEqual(local.map((e) => [e._tag, e.message]))
    }),
  )

  it.live("a stream interrupted or abandoned mid-way cancels its sequence in the worker and frees its KV blocks", () =>
    Effect.gen(function* () {
      const engine = yield* Engine
      const long = { prompt: "Once upon a time", maxTokens: 400, sampling: { temperature: 0.8, topK: 0, topP: 1 } }
      // Consumers that stop after a few tokens (take), and fibers interrupted while they stream.
      const taken = yield* Effect.forEach(
        [0, 1, 2],
        (seed) => Stream.runCollect(Stream.take(engine.generate({ ...long, sampling: { ...long.sampling, seed } }), 3)),
        { concurrency: "unbounded" },
      )
      expect(taken.map(Chunk.size)).toEqual([3, 3, 3])
      const started = yield* Deferred.make<void>()
      const fibers = yield* Effect.forEach([3, 4, 5], (seed) =>
        engine.generate({ ...long, sampling: { ...long.sampling, seed } }).pipe(
          Stream.runForEach(() => Deferred.succeed(started, undefined)),
          Effect.fork,
        ),
      )
      yield* Deferred.await(started)
      yield* Effect.forEach(fibers, Fiber.interrupt)
      const stats = yield* idleStats
      expect(stats.kv.usedBlocks).toBe(0)
      // Cancelled, not run to the end.
      expect(stats.decodeTokens).toBeLessThan(6 * 400 * 0.25)
    }).pipe(Effect.provide(WorkerEngine.layer(modelDir))),
  )

  it.live("shutting down the layer ends in-flight streams with EngineStoppedError", () =>
    Effect.gen(function* () {
      const scope = yield* Scope.make()
      const context = yield* Layer.buildWithScope(WorkerEngine.layer(modelDir), scope)
      const engine = Context.get(context, Engine)
      const started = yield* Deferred.make<void>()
      const long = greedy("Once upon a time", 400)
      const fibers = yield* Effect.forEach([0, 1, 2], () =>
        engine.generate({ ...long, sampling: { temperature: 0.8, topK: 0, topP: 1 } }).pipe(
          Stream.runForEach(() => Deferred.succeed(started, undefined)),
          Effect.fork,
        ),
      )
      yield* Deferred.await(started)
      yield* Scope.close(scope, Exit.void)
      for (const fiber of fibers) {
        const exit = yield* Fiber.await(fiber)
        expect(Exit.isFailure(exit) && exit.cause._tag === "Fail" ? exit.cause.error : exit).toBeInstanceOf(
          EngineStoppedError,
        )
      }
      const after = yield* Effect.flip(Stream.runCollect(engine.generate(long)))
      expect(after).toBeInstanceOf(EngineStoppedError)
    }),
  )
})

describe("the server over the worker engine", () => {
  it.live("streams to clients; those that disconnect mid-stream leave zero KV blocks in use", () =>
    Effect.promise(async () => {
      const server = await startServer(WorkerEngine.layer(modelDir))
      try {
        const greedyText = await server.engineText(greedy("Once upon a time", 60))
        expect(greedyText).toBe(REFERENCE_CONTINUATION)
        const outcomes = await Promise.all(
          Array.from({ length: 24 }, (_, i) =>
            abandonedStream(server.url, { prompt: BENCH_PROMPTS[i % 8]!, max_tokens: 400, temperature: 0.8 }),
          ),
        )
        expect(outcomes.filter((o) => o === "aborted").length).toBeGreaterThan(16)
        const m = await waitIdle(server, "stories260K")
        expect(metric(m, "stories260K", "offramp_kv_blocks_used")).toBe(0)
        const stats = await server.runtime.runPromise(Effect.flatMap(Engine, (e) => e.stats))
        expect(stats.decodeTokens).toBeLessThan(24 * 400 * 0.25)
      } finally {
        await server.close()
      }
    }),
  )
})

describe("the worker under the CLI's tsx", () => {
  it.each(["http", "fetch"])(
    "`offramp bench-http --client %s` serves through the worker engine and reports both engines",
    async (client) => {
      const result = await runCli([
        "bench-http",
        "--model",
        modelDir,
        "--clients",
        "2",
        "--max-tokens",
        "8",
        "--repeats",
        "1",
        "--client",
        client,
        "--json",
      ])
      expect(result.stderr).toBe("")
      expect(result.code).toBe(0)
      const [report] = jsonLines(result.stdout)
      expect(report.clients).toBe(2)
      expect(report.client).toBe(client)
      expect(report.worker.http.tokens).toBe(report.inProcess.engine.tokens)
      expect(report.worker.http.tokens).toBeGreaterThan(2)
    },
  )
})
