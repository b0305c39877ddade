/**
 * One engine worker thread with its engine: spawned, started with the model, and carrying the generations the main
 * thread gives it, until it fails or is closed. WorkerEngine supervises a sequence of these (a new one replaces one
 * that failed).
 *
 * Token events of all generations share one stream from the worker (`Events`): each element is a batch of what every
 * generation produced in one engine step, demultiplexed here by ticket into each generation's sink, so a step costs
 * one message however many streams run. Starts and cancels of a tick go together in one `Dispatch` message.
 *
 * A connection fails when its worker dies (the Events stream fails: process.exit or an uncaught exception in the
 * worker) or hangs: a `Ping` is sent every quarter of the step deadline (at most every second) and must be answered
 * within the deadline. The worker answers between engine steps, so a step that runs past the deadline (a busy loop,
 * a stuck native call) counts as a hang.
 */
import { Worker as NodeThread } from "node:worker_threads"
import * as Worker from "@effect/platform/Worker"
import type * as WorkerError from "@effect/platform/WorkerError"
import type { EarlyExitParams } from "@offramp/core/EarlyExit"
import type { EngineStats, GenerationSink } from "@offramp/core/Engine"
import { describeParseError, type EngineStoppedError, ModelLoadError, type TokenizerError } from "@offramp/core/Errors"
import type { GenerationRequest } from "@offramp/core/Generation"
import type { ModelSpec } from "@offramp/core/ModelSpec"
import { Cause, Deferred, Duration, Effect, Exit, Fiber, Option, ParseResult, Queue, Scope, Stream } from "effect"
import { readStepEvents, type StepEvents } from "./StepEvents.js"
import {
  Dispatch,
  type EngineRequest,
  Events,
  GetStats,
  Ping,
  StartEngine,
  StopEngine,
  type TestFault,
  type WorkerEngineConfig,
} from "./WorkerProtocol.js"

/**
 * Why a connection failed: `detail` for the server's log, `message` for the clients whose requests it ended; `hung`
 * when the worker missed its step deadline (it is still running, and will not close by itself).
 */
export interface WorkerFailure {
  readonly detail: string
  readonly message: string
  readonly hung: boolean
}

export interface WorkerConnection {
  readonly spec: ModelSpec
  readonly defaults: EarlyExitParams
  /** Starts a generation under the main thread's ticket; its events and end go to `sink`. */
  readonly start: (ticket: number, request: GenerationRequest, sink: GenerationSink) => void
  /** Cancels a generation that is still open (its sink hears nothing more). */
  readonly cancel: (ticket: number) => void
  readonly stats: Effect.Effect<EngineStats, WorkerError.WorkerError | ParseResult.ParseError>
  /** Ends every open generation with `error` (their sinks hear nothing more). */
  readonly endAll: (error: EngineStoppedError) => void
  /** Completes when the worker died or hung. */
  readonly failed: Deferred.Deferred<WorkerFailure>
  /**
   * Closes the worker's engine (its generations end with EngineStoppedError); false if the worker did not answer
   * within `within`.
   */
  readonly stop: (within: Duration.DurationInput) => Effect.Effect<boolean>
  /** Ends the worker (terminates its thread if it has not closed after `patience`) and releases the connection. */
  readonly close: (patience: Duration.DurationInput) => Effect.Effect<void>
}

/**
 * The worker's entry. Compiled, it is the package's dist/engineWorker.js, found by package resolution so that a
 * bundle of this code (the `offramp` command) finds it too. Run from the TypeScript sources (the repository's tests
 * and tools), it is a small .mjs that registers tsx, since Node 20 workers do not inherit the parent's module hooks,
 * and then imports engineWorker.ts; that worker resolves the workspace packages to their sources too.
 */
const FROM_SOURCES = import.meta.url.endsWith(".ts")
const WORKER_ENTRY = FROM_SOURCES
  ? new URL("../engineWorker.mjs", import.meta.url)
  : new URL(import.meta.resolve("@offramp/onnx/engineWorker"))
const WORKER_ARGV = FROM_SOURCES
  ? [...process.execArgv.filter((a) => !a.startsWith("--conditions")), "--conditions=source"]
  : undefined

export interface ConnectOptions {
  readonly modelDir: string
  readonly config: WorkerEngineConfig
  readonly stepDeadline: Duration.Duration
  readonly testFault: TestFault | undefined
}

/**
 * A worker's failure for the log. The platform's WorkerError (the thread exited, or threw) reaches a request whose
 * failure schema is Never as the `actual` of a ParseError: that error is what is worth reading.
 */
const describeCause = (cause: Cause.Cause<unknown>): string => {
  const error = Cause.squash(cause)
  const actual = ParseResult.isParseError(error) && error.issue._tag === "Type" ? error.issue.actual : error
  if (!(actual instanceof Error)) return String(actual)
  return actual.cause instanceof Error ? `${actual.message}: ${actual.cause.message}` : actual.message
}

/** Spawns a worker thread, starts its engine, and serves generations through it. */
export const connect = (
  options: ConnectOptions,
): Effect.Effect<WorkerConnection, ModelLoadError | TokenizerError, Worker.WorkerManager> =>
  Effect.gen(function* () {
    const { modelDir, config, stepDeadline, testFault } = options
    const scope = yield* Scope.make()
    let thread: NodeThread | undefined
    // The platform's release asks the worker to close and waits for it to exit; a hung worker never does, so after
    // `patience` its thread is terminated.
    const close = (patience: Duration.DurationInput) =>
      Effect.gen(function* () {
        const closing = yield* Effect.forkDaemon(Scope.close(scope, Exit.void))
        const closed = yield* Fiber.await(closing).pipe(Effect.interruptible, Effect.timeoutOption(patience))
        if (Option.isSome(closed)) return
        yield* Effect.promise(async () => {
          await thread?.terminate()
        })
        yield* Fiber.await(closing)
      }).pipe(Effect.uninterruptible)
    const cannotStart = (e: WorkerError.WorkerError) =>
      new ModelLoadError({ path: modelDir, message: `the engine worker failed to start: ${e.message}` })

    return yield* Effect.gen(function* () {
      const worker = yield* Worker.makeSerialized<EngineRequest>({}).pipe(
        Effect.provideService(Worker.Spawner, () => {
          // One thread per connection; the platform spawns again after a thread exits, which `close` ends.
          thread = new NodeThread(WORKER_ENTRY, {
            name: "offramp-engine",
            ...(WORKER_ARGV ? { execArgv: WORKER_ARGV } : {}),
          })
          return thread
        }),
        Effect.mapError(cannotStart),
      )
      const failed = yield* Deferred.make<WorkerFailure>()
      const fail = (detail: string) =>
        Deferred.succeed(failed, {
          detail,
          message: "the engine worker failed and is being restarted; retry the request",
          hung: false,
        })

      // The open generations by ticket. The Events reader delivers their batches; whatever ends them removes them.
      const open = new Map<number, GenerationSink>()
      const endAll = (error: EngineStoppedError) => {
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
        Effect.exit,
        Effect.flatMap((exit) => fail(Exit.isFailure(exit) ? describeCause(exit.cause) : "its event stream ended")),
        Effect.forkIn(scope),
      )

      const started = yield* worker
        .executeEffect(new StartEngine({ modelDir, config, ...(testFault ? { testFault } : {}) }))
        .pipe(
          Effect.catchTags({
            WorkerError: cannotStart,
            ParseError: (e) => new ModelLoadError({ path: modelDir, message: describeParseError(e) }),
          }),
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
          Effect.catchAll((e) => fail(`a dispatch failed: ${e.message}`)),
          Effect.forkIn(scope),
        )
      }).pipe(Effect.forever, Effect.forkIn(scope))

      // The step deadline, from the end of the start on (loading the model is not a step).
      const interval = Duration.min(Duration.unsafeDivide(stepDeadline, 4), Duration.seconds(1))
      yield* Effect.sleep(interval).pipe(
        Effect.andThen(worker.executeEffect(new Ping()).pipe(Effect.timeout(stepDeadline))),
        Effect.forever,
        Effect.catchAll((e) =>
          e._tag === "TimeoutException"
            ? Deferred.succeed(failed, {
                detail: `no engine step finished within the step deadline of ${Duration.format(stepDeadline)}`,
                message: `the engine stopped responding (no step finished within ${Duration.format(stepDeadline)}) and is being restarted; retry the request`,
                hung: true,
              })
            : fail(`a ping failed: ${e.message}`),
        ),
        Effect.forkIn(scope),
      )

      return {
        ...started,
        start: (ticket, request, sink) => {
          open.set(ticket, sink)
          control.unsafeOffer({ start: { ticket, request } })
        },
        cancel: (ticket) => {
          if (open.delete(ticket)) control.unsafeOffer({ cancel: ticket })
        },
        stats: worker.executeEffect(new GetStats()),
        endAll,
        failed,
        stop: (within) =>
          worker.executeEffect(new StopEngine()).pipe(
            // Interruptible, so that the bound holds in a finalizer (which is not).
            Effect.interruptible,
            Effect.timeout(within),
            Effect.match({ onFailure: () => false, onSuccess: () => true }),
          ),
        close,
      } satisfies WorkerConnection
    }).pipe(
      Scope.extend(scope),
      Effect.onError(() => close(0)),
    )
  })
