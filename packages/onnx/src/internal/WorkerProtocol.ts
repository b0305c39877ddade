/**
 * The engine worker's protocol: the messages the main thread (WorkerEngine.ts) sends the worker (engineWorker.ts),
 * as a union of schema-typed `Schema.TaggedRequest`s over @effect/platform's serialized worker protocol.
 */
import { EarlyExitParams } from "@offramp/core/EarlyExit"
import { ModelLoadError, TokenizerError } from "@offramp/core/Errors"
import { GenerationRequest } from "@offramp/core/Generation"
import { ModelSpec } from "@offramp/core/ModelSpec"
import { Schema } from "effect"
import { StepEvents } from "./StepEvents.js"

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

/**
 * Test-only: a fault the worker injects into itself after it has sent `afterBatches` Events elements, so that tests
 * can check how the main thread supervises it. `exit` calls process.exit in the worker, `throw` throws an uncaught
 * exception, `hang` spins forever (a step that never ends). Never set outside tests.
 */
export const TestFault = Schema.Struct({
  kind: Schema.Literal("exit", "throw", "hang"),
  afterBatches: Schema.NonNegativeInt,
})
export type TestFault = typeof TestFault.Type

/** Loads the model in the worker; answers what the Engine interface exposes synchronously. */
export class StartEngine extends Schema.TaggedRequest<StartEngine>()("StartEngine", {
  failure: Schema.Union(ModelLoadError, TokenizerError),
  success: Schema.Struct({ spec: ModelSpec, defaults: EarlyExitParams }),
  payload: { modelDir: Schema.String, config: WorkerEngineConfig, testFault: optional(TestFault) },
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
  decodeSegmentMs: Count,
  decodeLayerRows: Count,
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
  weights: Schema.Struct({ storedBytes: Count, residentBytes: Count }),
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

/**
 * Answered between engine steps: the main thread's probe of a worker that may be stuck in one (see the step
 * deadline in WorkerEngine).
 */
export class Ping extends Schema.TaggedRequest<Ping>()("Ping", {
  failure: Schema.Never,
  success: Schema.Void,
  payload: {},
}) {}

export const EngineRequest = Schema.Union(StartEngine, Events, Dispatch, GetStats, StopEngine, Ping)
export type EngineRequest = typeof EngineRequest.Type
