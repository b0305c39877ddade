/**
 * The Engine in a worker thread, supervised. onnxruntime's `run()` is synchronous C++ and blocks the event loop of
 * the thread that calls it, so a server runs the engine (`onnxEngineLayer`) in a `node:worker_threads` worker and
 * keeps its main thread for I/O. `WorkerEngine.layer(modelDir, config)` provides the same `Engine` interface, and a
 * `Tokenizer` loaded on the main thread (it is cheap, and the server tokenizes on every request).
 *
 * The worker (a WorkerConnection: the protocol is in internal/WorkerProtocol.ts) is supervised: when it dies or
 * misses its step deadline, its generations end with EngineStoppedError, the engine's state is `restarting` (new
 * requests are refused with EngineStoppedError) and a new worker is started with the same model and settings; then
 * the state is `ready` again. A stream that is interrupted, or that its consumer stops reading, cancels its sequence
 * in the worker; typed errors cross as the same tagged errors. When the layer closes, the worker's engine shuts down
 * first (for at most STOP_WITHIN), so streams still in flight end with EngineStoppedError; then the thread ends.
 */
import { join } from "node:path"
import * as NodeWorker from "@effect/platform-node/NodeWorker"
import {
  Engine,
  type EngineShape,
  type EngineState,
  type EngineStats,
  type GenerationSink,
  streamOfSubmit,
} from "@offramp/core/Engine"
import {
  describeParseError,
  EngineStoppedError,
  InvalidRequestError,
  type ModelLoadError,
  type TokenizerError,
} from "@offramp/core/Errors"
import { GenerationRequest } from "@offramp/core/Generation"
import { Tokenizer } from "@offramp/core/Tokenizer"
import * as HfTokenizer from "@offramp/tokenizer/HfTokenizer"
import { Context, Deferred, Duration, Effect, Fiber, Layer, Schedule, Schema } from "effect"
import { connect, type WorkerConnection } from "./internal/WorkerConnection.js"
import type { TestFault, WorkerEngineConfig } from "./internal/WorkerProtocol.js"
import { checkTokenizerVocab } from "./ModelDirectory.js"
import type { OnnxEngineConfig } from "./OnnxEngine.js"

export { TestFault, WorkerEngineConfig } from "./internal/WorkerProtocol.js"

/** The OnnxEngineConfig fields the worker cannot carry must be absent (a type error, not silently dropped). */
type NotCrossing = { readonly [K in Exclude<keyof OnnxEngineConfig, keyof WorkerEngineConfig>]?: never }

export interface SupervisorOptions {
  /**
   * How long one engine step may take before the worker counts as hung and is replaced (default 30 seconds). The
   * worker answers the main thread's pings between steps.
   */
  readonly stepDeadline?: Duration.DurationInput
  /** Test-only: a fault the first worker injects into itself (see TestFault). */
  readonly testFault?: TestFault
}

export const DEFAULT_STEP_DEADLINE = "30 seconds"

/** How long the engine's stop may take at shutdown before the thread is terminated. */
const STOP_WITHIN = "500 millis"
/** How long a worker that answered (or died) may take to close before its thread is terminated. */
const CLOSE_WITHIN = "500 millis"
/** How long /metrics waits for the worker's figures before it answers with the last ones. */
const STATS_WITHIN = "1 second"

const make = (modelDir: string, config: WorkerEngineConfig, options: SupervisorOptions) =>
  Effect.gen(function* () {
    const stepDeadline = Duration.decode(options.stepDeadline ?? DEFAULT_STEP_DEADLINE)
    const first = yield* connect({ modelDir, config, stepDeadline, testFault: options.testFault })
    const { spec, defaults } = first
    // Until the finalizer below owns it, the first worker is closed here if the layer fails to build.
    const tokenizer = yield* HfTokenizer.fromFile(join(modelDir, spec.files.tokenizer)).pipe(
      Effect.tap((tokenizer) => checkTokenizerVocab(modelDir, spec, tokenizer.vocabSize)),
      Effect.tapErrorCause(() => first.close(CLOSE_WITHIN)),
    )

    // The worker that serves requests; undefined while it is replaced, and after shutdown.
    let current: WorkerConnection | undefined = first
    let state: EngineState = "ready"
    let restarts = 0
    let nextTicket = 0
    // /metrics keeps answering with the last figures while the worker is gone or slow.
    let lastStats: EngineStats = yield* first.stats.pipe(
      Effect.orDie,
      Effect.tapErrorCause(() => first.close(CLOSE_WITHIN)),
    )

    const supervisor = yield* Effect.gen(function* () {
      let connection = first
      for (;;) {
        const failure = yield* Deferred.await(connection.failed)
        current = undefined
        state = "restarting"
        restarts++
        yield* Effect.logError(`offramp: the engine worker failed (${failure.detail}); starting a new one`)
        connection.endAll(new EngineStoppedError({ message: failure.message }))
        // A hung worker would not close: its thread is terminated at once.
        yield* connection.close(failure.hung ? 0 : CLOSE_WITHIN)
        connection = yield* connect({ modelDir, config, stepDeadline, testFault: undefined }).pipe(
          Effect.tapError((e) => Effect.logError(`offramp: the engine worker did not start (${e.message}); retrying`)),
          Effect.retry(Schedule.spaced("1 second")),
        )
        current = connection
        state = "ready"
      }
    }).pipe(Effect.forkDaemon)

    const submit = (request: GenerationRequest, sink: GenerationSink) =>
      Effect.gen(function* () {
        const connection = current
        if (connection === undefined) {
          return yield* new EngineStoppedError({
            message:
              state === "stopped"
                ? "the engine has shut down"
                : "the engine is restarting after its worker failed; retry in a few seconds",
          })
        }
        // The engine's own validation, here so that a bad request never crosses (same error, same message).
        const req = yield* Schema.decodeUnknown(GenerationRequest)(request).pipe(
          Effect.mapError((e) => new InvalidRequestError({ message: describeParseError(e) })),
        )
        const ticket = nextTicket++
        connection.start(ticket, req, sink)
        // Cancelling a generation that is still open tells the worker to cancel its sequence.
        return Effect.sync(() => connection.cancel(ticket))
      })

    const stats = Effect.suspend(() =>
      current === undefined
        ? Effect.succeed(lastStats)
        : current.stats.pipe(
            Effect.timeout(STATS_WITHIN),
            Effect.tap((s) => {
              lastStats = s
            }),
            Effect.catchAllCause(() => Effect.succeed(lastStats)),
          ),
    )

    // New requests are refused, the worker's engine ends its generations with EngineStoppedError, and those whose end
    // has not arrived when it answers (or after STOP_WITHIN) end so here; then the thread ends.
    yield* Effect.addFinalizer(() =>
      Effect.gen(function* () {
        state = "stopped"
        yield* Fiber.interrupt(supervisor)
        const connection = current
        current = undefined
        if (connection === undefined) return
        const answered = yield* connection.stop(STOP_WITHIN)
        connection.endAll(new EngineStoppedError({ message: "the engine shut down while the request was in flight" }))
        yield* connection.close(answered ? CLOSE_WITHIN : 0)
      }),
    )

    const engine: EngineShape = {
      spec,
      defaults,
      generate: streamOfSubmit(submit),
      submit,
      stats,
      status: Effect.sync(() => ({ state, restarts })),
    }
    return Context.make(Engine, engine).pipe(Context.add(Tokenizer, tokenizer))
  })

/**
 * The Engine (and a Tokenizer) of a staged model directory, with the engine in a supervised worker thread; the
 * worker stops when the layer's scope closes.
 */
export const layer = (
  modelDir: string,
  config: WorkerEngineConfig & NotCrossing = {},
  options: SupervisorOptions = {},
): Layer.Layer<Engine | Tokenizer, ModelLoadError | TokenizerError> =>
  Layer.scopedContext(make(modelDir, config, options)).pipe(Layer.provide(NodeWorker.layerManager))
