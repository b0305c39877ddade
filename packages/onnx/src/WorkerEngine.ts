/**
 * The Engine in a worker thread. onnxruntime's `run()` is synchronous C++ and blocks the event loop of the thread
 * that calls it, so a server runs the engine (`onnxEngineLayer`) in a `node:worker_threads` worker and keeps its
 * main thread for I/O. `WorkerEngine.layer(modelDir, config)` provides the same `Engine` interface, and a
 * `Tokenizer` loaded on the main thread (it is cheap, and the server tokenizes on every request).
 *
 * Messages are schema-typed `Schema.TaggedRequest`s over @effect/platform's serialized worker protocol. A token
 * stream crosses as batches: every chunk the engine's stream has ready (one step's tokens of a request) is one
 * message, so structured cloning is paid per batch rather than per token. Interrupting a stream interrupts the
 * request in the worker, which cancels the sequence; typed errors cross as the same tagged errors. When the layer
 * closes, the worker's engine shuts down first, so streams still in flight end with EngineStoppedError.
 */
import { join } from "node:path"
import { Worker as NodeThread } from "node:worker_threads"
import { Worker, type WorkerError } from "@effect/platform"
import { NodeWorker } from "@effect/platform-node"
import {
  describeParseError,
  EarlyExitParams,
  Engine,
  type EngineShape,
  type EngineStats,
  EngineStoppedError,
  type GenerationError,
  GenerationRequest,
  InvalidRequestError,
  ModelLoadError,
  ModelSpec,
  RunnerError,
  TokenEvent,
  Tokenizer,
  TokenizerError,
} from "@offramp/core"
import { HfTokenizer } from "@offramp/tokenizer"
import { Context, Effect, Layer, type ParseResult, Schema, Stream } from "effect"
import type { OnnxEngineConfig } from "./OnnxEngine.js"

const Positive = Schema.Number.pipe(Schema.positive())
const optional = <S extends Schema.Schema.Any>(schema: S) => Schema.optionalWith(schema, { exact: true })

/** OnnxEngineConfig as a schema (plain numbers and early-exit settings: all of it can cross a thread). */
export const WorkerEngineConfig = Schema.Struct({
  runner: optional(
    Schema.Struct({
      blockSize: optional(Positive),
      numBlocks: optional(Positive),
      kvCacheBytes: optional(Positive),
      threads: optional(Positive),
    }),
  ),
  scheduler: optional(Schema.Struct({ tokenBudget: optional(Positive), maxRunning: optional(Positive) })),
  earlyExit: optional(EarlyExitParams),
})

export const GenerationErrorSchema = Schema.Union(InvalidRequestError, TokenizerError, RunnerError, EngineStoppedError)

/** Loads the model in the worker; answers what the Engine interface exposes synchronously. */
export class StartEngine extends Schema.TaggedRequest<StartEngine>()("StartEngine", {
  failure: Schema.Union(ModelLoadError, TokenizerError),
  success: Schema.Struct({ spec: ModelSpec, defaults: EarlyExitParams }),
  payload: { modelDir: Schema.String, config: WorkerEngineConfig },
}) {}

/** One generation; its stream's elements are the batches of token events that were ready together. */
export class Generate extends Schema.TaggedRequest<Generate>()("Generate", {
  failure: GenerationErrorSchema,
  success: Schema.Array(TokenEvent),
  payload: { request: GenerationRequest },
}) {}

const Count = Schema.Number
export const EngineStatsSchema = Schema.Struct({
  steps: Count,
  prefillTokens: Count,
  decodeTokens: Count,
  running: Count,
  waiting: Count,
  preemptions: Count,
  exitHistogram: Schema.Record({ key: Schema.String, value: Count }),
  meanExitDepth: Count,
  layersSkipped: Count,
  headMs: Count,
  kvFillMs: Count,
  kv: Schema.Struct({
    blockSize: Count,
    totalBlocks: Count,
    usedBlocks: Count,
    freeBlocks: Count,
    cachedBlocks: Count,
    bytesPerBlock: Count,
    usedBytes: Count,
    prefixQueries: Count,
    prefixHits: Count,
    prefixHitRate: Count,
  }),
})

export class GetStats extends Schema.TaggedRequest<GetStats>()("GetStats", {
  failure: Schema.Never,
  success: EngineStatsSchema,
  payload: {},
}) {}

/** Closes the worker's engine: what is in flight ends with EngineStoppedError, later requests are refused. */
export class StopEngine extends Schema.TaggedRequest<StopEngine>()("StopEngine", {
  failure: Schema.Never,
  success: Schema.Void,
  payload: {},
}) {}

export const EngineRequest = Schema.Union(StartEngine, Generate, GetStats, StopEngine)
export type EngineRequest = typeof EngineRequest.Type

/**
 * The worker's entry. Node 20 workers do not inherit the parent's module hooks, so this small .mjs registers tsx
 * and then imports the TypeScript runner (engineWorker.ts); it works the same under the CLI's tsx and vitest.
 */
export const WORKER_ENTRY = new URL("./engineWorker.mjs", import.meta.url)

/** A failure of the worker itself (it died, or a message did not decode) as the engine's error. */
const workerFailure = (error: WorkerError.WorkerError | ParseResult.ParseError) =>
  new EngineStoppedError({
    message: `the engine worker failed (${error._tag === "WorkerError" ? error.reason : "protocol"}): ${error.message}`,
  })

const isWorkerSide = (
  error: GenerationError | WorkerError.WorkerError | ParseResult.ParseError,
): error is WorkerError.WorkerError | ParseResult.ParseError =>
  error._tag === "WorkerError" || error._tag === "ParseError"

const make = (modelDir: string, config: OnnxEngineConfig) =>
  Effect.gen(function* () {
    const cannotStart = (e: WorkerError.WorkerError) =>
      new ModelLoadError({ path: modelDir, message: `the engine worker failed to start: ${e.message}` })
    const worker = yield* Worker.makeSerialized<EngineRequest>({}).pipe(Effect.mapError(cannotStart))
    const { spec, defaults } = yield* worker.executeEffect(new StartEngine({ modelDir, config })).pipe(
      Effect.catchTags({
        WorkerError: cannotStart,
        ParseError: (e) => new ModelLoadError({ path: modelDir, message: describeParseError(e) }),
      }),
    )
    const tokenizer = yield* HfTokenizer.fromFile(join(modelDir, spec.files.tokenizer))
    let stopped = false
    // /metrics keeps answering with the last figures if the worker is gone.
    let lastStats: EngineStats = yield* worker.executeEffect(new GetStats()).pipe(Effect.orDie)
    const stats = worker.executeEffect(new GetStats()).pipe(
      Effect.tap((s) => {
        lastStats = s
      }),
      Effect.orElse(() => Effect.sync(() => lastStats)),
    )

    const generate = (request: GenerationRequest): Stream.Stream<TokenEvent, GenerationError> =>
      Stream.unwrap(
        Effect.gen(function* () {
          if (stopped) return yield* new EngineStoppedError({ message: "the engine has shut down" })
          // The engine's own validation, here so that a bad request never crosses (same error, same message).
          const req = yield* Schema.decodeUnknown(GenerationRequest)(request).pipe(
            Effect.mapError((e) => new InvalidRequestError({ message: describeParseError(e) })),
          )
          const samples = req.n ?? 1
          let finished = 0
          const events = worker.execute(new Generate({ request: req })).pipe(
            Stream.mapError((e) => (isWorkerSide(e) ? workerFailure(e) : e)),
            // The protocol cancels a request in the worker only when its stream is interrupted, not when a consumer
            // stops pulling early (take, takeUntil). Run it in a fiber of this stream's scope: an early end of the
            // consumer closes the scope, which interrupts the fiber and so cancels the sequence.
            Stream.buffer({ capacity: "unbounded" }),
            Stream.mapConcat((batch) => {
              for (const event of batch) if (event.finishReason !== null) finished++
              return batch
            }),
          )
          // A stream the worker protocol ended early (the worker closed under it) is a stopped engine, not a success.
          const check = Stream.suspend(() =>
            finished < samples
              ? Stream.fail(new EngineStoppedError({ message: "the engine shut down while the request was in flight" }))
              : Stream.empty,
          )
          return Stream.concat(events, check)
        }),
      )

    // Runs before the worker closes (finalizers run in reverse): the worker's engine ends its streams with
    // EngineStoppedError, and those errors reach the streams before the worker goes.
    yield* Effect.addFinalizer(() =>
      Effect.suspend(() => {
        stopped = true
        return worker.executeEffect(new StopEngine()).pipe(Effect.timeout("10 seconds"), Effect.ignore)
      }),
    )

    const engine: EngineShape = { spec, defaults, generate, stats }
    return Context.make(Engine, engine).pipe(Context.add(Tokenizer, tokenizer))
  })

/** Spawns the engine worker thread (one per layer). */
const spawn = () =>
  new NodeThread(WORKER_ENTRY, {
    // The worker's stdout/stderr go through the parent's; a name helps in inspectors and crash reports.
    name: "offramp-engine",
  })

/**
 * The Engine (and a Tokenizer) of a staged model directory, with the engine in a worker thread; the worker stops
 * when the layer's scope closes.
 */
export const layer = (
  modelDir: string,
  config: OnnxEngineConfig = {},
): Layer.Layer<Engine | Tokenizer, ModelLoadError | TokenizerError> =>
  Layer.scopedContext(make(modelDir, config)).pipe(Layer.provide(NodeWorker.layer(spawn)))
