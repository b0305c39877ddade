/**
 * The Engine in a worker thread. onnxruntime's `run()` is synchronous C++ and blocks the event loop of the thread
 * that calls it, so a server runs the engine (`onnxEngineLayer`) in a `node:worker_threads` worker and keeps its
 * main thread for I/O. `WorkerEngine.layer(modelDir, config)` provides the same `Engine` interface, and a
 * `Tokenizer` loaded on the main thread (it is cheap, and the server tokenizes on every request).
 *
 * Messages are schema-typed `Schema.TaggedRequest`s over @effect/platform's serialized worker protocol. Token
 * events of all generations share one stream from the worker (`Events`): each element is a batch of what every
 * generation produced in one engine step, demultiplexed here by ticket into each generation's stream, so a step
 * costs one message however many streams run. A stream that is interrupted, or that its consumer stops reading,
 * cancels its sequence in the worker; typed errors cross as the same tagged errors. When the layer closes, the
 * worker's engine shuts down first, so streams still in flight end with EngineStoppedError.
 */
import { join } from "node:path"
import { Worker as NodeThread } from "node:worker_threads"
import * as Worker from "@effect/platform/Worker"
import type * as WorkerError from "@effect/platform/WorkerError"
import * as NodeWorker from "@effect/platform-node/NodeWorker"
import {
  describeParseError,
  EarlyExitParams,
  Engine,
  type EngineShape,
  type EngineStats,
  EngineStoppedError,
  GenerationRequest,
  type GenerationSink,
  InvalidRequestError,
  ModelLoadError,
  ModelSpec,
  streamOfSubmit,
  Tokenizer,
  TokenizerError,
} from "@offramp/core"
import { HfTokenizer } from "@offramp/tokenizer"
import { Cause, Context, Effect, Exit, Layer, type ParseResult, Queue, Schema, Stream } from "effect"
import { readStepEvents, StepEvents } from "./internal/StepEvents.js"
import type { OnnxEngineConfig } from "./OnnxEngine.js"

const Positive = Schema.Number.pipe(Schema.positive())
const optional = <S extends Schema.Schema.Any>(schema: S) => Schema.optionalWith(schema, { exact: true })

/**
 * What of OnnxEngineConfig can cross to the worker: plain numbers and early-exit settings. A custom
 * ConfidenceEvaluator layer cannot (it is code); run such an engine in-process with `onnxEngineLayer`.
 */
export const WorkerEngineConfig = Schema.Struct({
  runner: optional(
    Schema.Struct({
      blockSize: optional(Positive),
      numBlocks: optional(Positive),
      kvCacheBytes: optional(Positive),
      threads: optional(Positive),
    }),
  ),
  scheduler: optional(
    Schema.Struct({
      tokenBudget: optional(Positive),
      maxRunning: optional(Positive),
      maxRunningPerGroup: optional(Positive),
    }),
  ),
  earlyExit: optional(EarlyExitParams),
})

export type WorkerEngineConfig = typeof WorkerEngineConfig.Type

/** The OnnxEngineConfig fields the worker cannot carry must be absent (a type error, not silently dropped). */
type NotCrossing = { readonly [K in Exclude<keyof OnnxEngineConfig, keyof WorkerEngineConfig>]?: never }

/** Loads the model in the worker; answers what the Engine interface exposes synchronously. */
export class StartEngine extends Schema.TaggedRequest<StartEngine>()("StartEngine", {
  failure: Schema.Union(ModelLoadError, TokenizerError),
  success: Schema.Struct({ spec: ModelSpec, defaults: EarlyExitParams }),
  payload: { modelDir: Schema.String, config: WorkerEngineConfig },
}) {}

/**
 * Starts generations in the worker under the main thread's tickets, and cancels generations whose streams the main
 * thread no longer reads (interrupted, or ended early), in that order. Their events and ends arrive on the Events
 * stream. The main thread sends what a tick submitted in one message, so a burst of requests reaches the engine
 * together and shares its first step.
 */
export class Dispatch extends Schema.TaggedRequest<Dispatch>()("Dispatch", {
  failure: Schema.Never,
  success: Schema.Void,
  payload: {
    start: Schema.Array(Schema.Struct({ ticket: Schema.Int, request: GenerationRequest })),
    cancel: Schema.Array(Schema.Int),
  },
}) {}

/**
 * The worker's output, for every generation at once: one element (one message) per batch of events that were ready
 * together, which is every token of an engine step, in the columnar StepEvents form. Batching across generations is
 * what keeps the per-token cost low: with 16 streams a step has one token per stream, so per-generation messages
 * would carry one each.
 */
export class Events extends Schema.TaggedRequest<Events>()("Events", {
  failure: Schema.Never,
  success: StepEvents,
  payload: {},
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
  exits: Schema.Array(
    Schema.Struct({ layer: Count, scored: Count, headRows: Count, exited: Count, headMs: Count, decisionMs: Count }),
  ),
  speculative: Schema.Struct({ drafted: Count, accepted: Count, kept: Count, verifications: Count }),
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

export const EngineRequest = Schema.Union(StartEngine, Events, Dispatch, GetStats, StopEngine)
export type EngineRequest = typeof EngineRequest.Type

/**
 * The worker's entry. Node 20 workers do not inherit the parent's module hooks, so this small .mjs registers tsx
 * and then imports the TypeScript runner (engineWorker.ts); it works the same under the CLI's tsx and vitest.
 */
export const WORKER_ENTRY = new URL("./engineWorker.mjs", import.meta.url)

const make = (modelDir: string, config: WorkerEngineConfig) =>
  Effect.gen(function* () {
    const scope = yield* Effect.scope
    const cannotStart = (e: WorkerError.WorkerError) =>
      new ModelLoadError({ path: modelDir, message: `the engine worker failed to start: ${e.message}` })
    const worker = yield* Worker.makeSerialized<EngineRequest>({}).pipe(Effect.mapError(cannotStart))

    // The open generations by ticket. The Events reader delivers their batches; whatever ends them removes them.
    const open = new Map<number, GenerationSink>()
    let nextTicket = 0
    // Set once the engine is gone (shut down, or the worker failed): what new requests get.
    let refusal: EngineStoppedError | undefined
    const endAll = (error: EngineStoppedError) => {
      refusal ??= error
      const sinks = [...open.values()]
      open.clear()
      for (const sink of sinks) sink.onEnd(Exit.fail(error))
    }
    const deliver = (step: StepEvents) =>
      readStepEvents(
        step,
        (ticket, event) => open.get(ticket)?.onEvent(event),
        ({ ticket, error }) => {
          const sink = open.get(ticket)
          if (sink === undefined) return
          open.delete(ticket)
          sink.onEnd(error ? Exit.fail(error) : Exit.void)
        },
      )
    yield* worker.execute(new Events()).pipe(
      Stream.runForEach((batch) => Effect.sync(() => deliver(batch))),
      Effect.catchAllCause((cause) =>
        Effect.sync(() =>
          endAll(new EngineStoppedError({ message: `the engine worker failed: ${Cause.squash(cause)}` })),
        ),
      ),
      Effect.forkIn(scope),
    )

    const { spec, defaults } = yield* worker.executeEffect(new StartEngine({ modelDir, config })).pipe(
      Effect.catchTags({
        WorkerError: cannotStart,
        ParseError: (e) => new ModelLoadError({ path: modelDir, message: describeParseError(e) }),
      }),
    )
    const tokenizer = yield* HfTokenizer.fromFile(join(modelDir, spec.files.tokenizer))
    // /metrics keeps answering with the last figures if the worker is gone.
    let lastStats: EngineStats = yield* worker.executeEffect(new GetStats()).pipe(Effect.orDie)
    const stats = worker.executeEffect(new GetStats()).pipe(
      Effect.tap((s) => {
        lastStats = s
      }),
      Effect.orElse(() => Effect.sync(() => lastStats)),
    )

    // Starts and cancels wait for the end of the tick (setImmediate) and then go together, in order, in one message.
    const control = yield* Queue.unbounded<
      { readonly start: Dispatch["start"][number] } | { readonly cancel: number }
    >()
    yield* Effect.gen(function* () {
      const first = yield* Queue.take(control)
      yield* Effect.async<void>((resume) => {
        setImmediate(() => resume(Effect.void))
      })
      const batch = [first, ...(yield* Queue.takeAll(control))]
      const start = batch.flatMap((c) => ("start" in c ? [c.start] : []))
      const cancel = batch.flatMap((c) => ("cancel" in c ? [c.cancel] : []))
      // Sent without waiting for the worker's answer to the previous one (the port keeps messages in order): waiting
      // put the worker's step time into the first-token time of every request behind it (measured at 16 clients:
      // 10 ms median, 47 ms p90).
      yield* worker.executeEffect(new Dispatch({ start, cancel })).pipe(
        Effect.catchAll((e) => Effect.sync(() => endAll(workerFailure(e)))),
        Effect.forkIn(scope),
      )
    }).pipe(Effect.forever, Effect.forkIn(scope))

    const submit = (request: GenerationRequest, sink: GenerationSink) =>
      Effect.gen(function* () {
        if (refusal) return yield* refusal
        // The engine's own validation, here so that a bad request never crosses (same error, same message).
        const req = yield* Schema.decodeUnknown(GenerationRequest)(request).pipe(
          Effect.mapError((e) => new InvalidRequestError({ message: describeParseError(e) })),
        )
        const ticket = nextTicket++
        open.set(ticket, sink)
        control.unsafeOffer({ start: { ticket, request: req } })
        // Cancelling a generation that is still open tells the worker to cancel its sequence.
        return Effect.sync(() => {
          if (open.delete(ticket) && refusal === undefined) control.unsafeOffer({ cancel: ticket })
        })
      })

    // Runs before the worker closes (finalizers run in reverse): new requests are refused, the worker's engine ends
    // its generations with EngineStoppedError, and those whose end has not arrived when it answers end so here.
    yield* Effect.addFinalizer(() =>
      Effect.suspend(() => {
        refusal ??= new EngineStoppedError({ message: "the engine has shut down" })
        return worker.executeEffect(new StopEngine())
      }).pipe(
        Effect.timeout("10 seconds"),
        Effect.ignore,
        Effect.andThen(
          Effect.sync(() =>
            endAll(new EngineStoppedError({ message: "the engine shut down while the request was in flight" })),
          ),
        ),
      ),
    )

    const engine: EngineShape = { spec, defaults, generate: streamOfSubmit(submit), submit, stats }
    return Context.make(Engine, engine).pipe(Context.add(Tokenizer, tokenizer))
  })

/** A failure of the worker itself (it died, or a message did not decode) as the engine's error. */
const workerFailure = (error: WorkerError.WorkerError | ParseResult.ParseError) =>
  new EngineStoppedError({
    message: `the engine worker failed (${error._tag === "WorkerError" ? error.reason : "protocol"}): ${error.message}`,
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
  config: WorkerEngineConfig & NotCrossing = {},
): Layer.Layer<Engine | Tokenizer, ModelLoadError | TokenizerError> =>
  Layer.scopedContext(make(modelDir, config)).pipe(Layer.provide(NodeWorker.layer(spawn)))
