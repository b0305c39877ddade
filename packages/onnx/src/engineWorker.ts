/**
 * The engine worker thread: serves the WorkerEngine protocol (see WorkerEngine.ts) over `onnxEngineLayer`.
 *
 * Every generation is submitted to the engine under the main thread's ticket with a sink (no fiber or stream per
 * generation); what the sinks get goes to an outbox that is flushed as one Events element after the current engine
 * step (setImmediate runs before onnxruntime's next `run()`, which is itself scheduled with setImmediate). The
 * engine lives in a scope of its own, so StopEngine can shut it down, ending its generations with EngineStoppedError,
 * while the connection still carries those ends. A `Ping` is answered between engine steps (the main thread's step
 * deadline).
 */
import * as WorkerRunner from "@effect/platform/WorkerRunner"
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import * as NodeWorkerRunner from "@effect/platform-node/NodeWorkerRunner"
import { Engine, type EngineShape, type GenerationSink } from "@offramp/core/Engine"
import { EngineStoppedError, type GenerationError } from "@offramp/core/Errors"
import type { GenerationRequest } from "@offramp/core/Generation"
import { Cause, Context, Effect, Exit, Layer, Mailbox, Option, Scope } from "effect"
import { type StepEvents, StepEventsBuilder } from "./internal/StepEvents.js"
import { EngineRequest, type TestFault } from "./internal/WorkerProtocol.js"
import { onnxEngineLayer } from "./OnnxEngine.js"

const Runner = Layer.unwrapScoped(
  Effect.gen(function* () {
    const engineScope = yield* Scope.make()
    yield* Effect.addFinalizer((exit) => Scope.close(engineScope, exit))
    let engine: EngineShape | undefined
    const started = Effect.suspend(() =>
      engine === undefined
        ? Effect.fail(
            new EngineStoppedError({ message: "the engine worker has no engine (not started, or restarted)" }),
          )
        : Effect.succeed(engine),
    )

    const outbox = yield* Mailbox.make<StepEvents>()
    const pending = new StepEventsBuilder()
    // Test-only (see TestFault): the fault to inject, and the batches sent so far.
    let fault: TestFault | undefined
    let sent = 0
    const flush = () => {
      if (pending.isEmpty) return
      outbox.unsafeOffer(pending.take())
      if (fault !== undefined && ++sent >= fault.afterBatches) injure(fault)
    }
    const schedule = () => {
      if (pending.isEmpty) setImmediate(flush)
    }
    // Every open generation by ticket, with its cancel once submit has answered; its end removes it.
    const open = new Map<number, Effect.Effect<void> | undefined>()
    // Tickets cancelled while their submit was still running (Dispatch messages are handled concurrently).
    const cancelledEarly = new Set<number>()
    const end = (ticket: number, error?: GenerationError) => {
      open.delete(ticket)
      cancelledEarly.delete(ticket)
      schedule()
      pending.end(error ? { ticket, error } : { ticket })
    }
    const sink = (ticket: number): GenerationSink => ({
      onEvent: (event) => {
        schedule()
        pending.add(ticket, event)
      },
      onEnd: (exit) => end(ticket, Exit.isSuccess(exit) ? undefined : errorOf(exit.cause)),
    })
    const start = (ticket: number, request: GenerationRequest) => {
      open.set(ticket, undefined)
      return Effect.flatMap(started, (engine) => engine.submit(request, sink(ticket))).pipe(
        Effect.matchEffect({
          onFailure: (error) => Effect.sync(() => end(ticket, error)),
          onSuccess: (cancel) => {
            if (cancelledEarly.delete(ticket)) return cancel
            if (open.has(ticket)) open.set(ticket, cancel)
            return Effect.void
          },
        }),
      )
    }
    const cancel = (ticket: number) => {
      if (!open.has(ticket)) return Effect.void
      const cancelSubmitted = open.get(ticket)
      open.delete(ticket)
      if (cancelSubmitted === undefined) cancelledEarly.add(ticket)
      return cancelSubmitted ?? Effect.void
    }

    return WorkerRunner.layerSerialized(EngineRequest, {
      StartEngine: ({ modelDir, config, testFault }) =>
        Effect.gen(function* () {
          fault = testFault
          const context = yield* Layer.buildWithScope(onnxEngineLayer(modelDir, config), engineScope)
          engine = Context.get(context, Engine)
          return { spec: engine.spec, defaults: engine.defaults }
        }),
      Events: () => Mailbox.toStream(outbox),
      Dispatch: ({ start: starts, cancel: cancels }) =>
        Effect.gen(function* () {
          for (const { ticket, request } of starts) yield* start(ticket, request)
          for (const ticket of cancels) yield* cancel(ticket)
        }),
      GetStats: () => Effect.flatMap(Effect.orDie(started), (e) => e.stats),
      // The engine's finalizer ends every generation with EngineStoppedError; their ends are flushed at once.
      StopEngine: () => Scope.close(engineScope, Exit.void).pipe(Effect.andThen(Effect.sync(flush))),
      Ping: () => Effect.void,
    })
  }),
)

/** Test-only: the worker exits, throws an uncaught exception, or spins forever (a step that never ends). */
const injure = (fault: TestFault) => {
  switch (fault.kind) {
    case "exit":
      return process.exit(1)
    case "throw":
      // Thrown from a timer callback, outside any fiber: an uncaught exception that ends the worker.
      return setImmediate(() => {
        throw new Error("injected fault: an uncaught exception in the engine worker")
      })
    case "hang":
      for (;;) {
        // A busy loop: the worker's event loop never turns again.
      }
  }
}

/** A failed generation's error; a defect (a bug) ends it as a stopped engine, with the defect's first line. */
const errorOf = (cause: Cause.Cause<GenerationError>): GenerationError =>
  Option.getOrElse(
    Cause.failureOption(cause),
    () => new EngineStoppedError({ message: `the engine failed: ${Cause.pretty(cause).split("\n")[0]}` }),
  )

NodeRuntime.runMain(NodeWorkerRunner.launch(Runner.pipe(Layer.provide(NodeWorkerRunner.layer))))
