/**
 * The engine worker thread: serves the WorkerEngine protocol (see WorkerEngine.ts) over `onnxEngineLayer`.
 *
 * Every generation runs in a fiber keyed by the main thread's ticket; what it produces goes to an outbox that is
 * flushed as one Events element after the current engine step (setImmediate runs before onnxruntime's next
 * `run()`, which is itself scheduled with setImmediate). The engine lives in a scope of its own, so StopEngine can
 * shut it down, ending its generations with EngineStoppedError, while the connection still carries those ends.
 */
import { WorkerRunner } from "@effect/platform"
import { NodeRuntime, NodeWorkerRunner } from "@effect/platform-node"
import { Engine, type EngineShape, EngineStoppedError, type GenerationError, type TokenEvent } from "@offramp/core"
import { Cause, Context, Effect, Exit, FiberMap, Layer, Mailbox, Option, Scope, Stream } from "effect"
import { type StepEvents, StepEventsBuilder } from "./internal/StepEvents.js"
import { onnxEngineLayer } from "./OnnxEngine.js"
import { EngineRequest } from "./WorkerEngine.js"

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
    const flush = () => {
      if (!pending.isEmpty) outbox.unsafeOffer(pending.take())
    }
    const schedule = () => {
      if (pending.isEmpty) setImmediate(flush)
    }
    const push = (ticket: number, events: Iterable<TokenEvent>) => {
      schedule()
      pending.add(ticket, events)
    }
    const end = (ticket: number, error?: GenerationError) => {
      schedule()
      pending.end(error ? { ticket, error } : { ticket })
    }

    const generations = yield* FiberMap.make<number, void, never>()
    const run = (ticket: number, engine: EngineShape, request: Parameters<EngineShape["generate"]>[0]) =>
      engine.generate(request).pipe(
        Stream.runForEachChunk((chunk) => Effect.sync(() => push(ticket, chunk))),
        Effect.onExit((exit) =>
          Effect.sync(() => {
            if (Exit.isSuccess(exit)) return end(ticket)
            const failure = Cause.failureOption(exit.cause)
            if (Option.isSome(failure)) end(ticket, failure.value)
            // Interrupted only: cancelled by the main thread, which no longer listens. A defect ends the stream too.
            else if (!Cause.isInterruptedOnly(exit.cause)) {
              const error: GenerationError = new EngineStoppedError({
                message: `the engine failed: ${Cause.pretty(exit.cause).split("\n")[0]}`,
              })
              end(ticket, error)
            }
          }),
        ),
        Effect.ignore,
      )

    return WorkerRunner.layerSerialized(EngineRequest, {
      StartEngine: ({ modelDir, config }) =>
        Effect.gen(function* () {
          const context = yield* Layer.buildWithScope(onnxEngineLayer(modelDir, config), engineScope)
          engine = Context.get(context, Engine)
          return { spec: engine.spec, defaults: engine.defaults }
        }),
      Events: () => Mailbox.toStream(outbox),
      Dispatch: ({ start, cancel }) =>
        Effect.gen(function* () {
          for (const { ticket, request } of start) {
            yield* FiberMap.run(
              generations,
              ticket,
              Effect.matchEffect(started, {
                onFailure: (error) => Effect.sync(() => end(ticket, error)),
                onSuccess: (e) => run(ticket, e, request),
              }),
            )
          }
          for (const ticket of cancel) yield* FiberMap.remove(generations, ticket)
        }),
      GetStats: () => Effect.flatMap(Effect.orDie(started), (e) => e.stats),
      // The engine's finalizer ends every generation with EngineStoppedError; their ends are flushed at once.
      StopEngine: () =>
        Scope.close(engineScope, Exit.void).pipe(
          Effect.andThen(FiberMap.awaitEmpty(generations)),
          Effect.andThen(Effect.sync(flush)),
        ),
    })
  }),
)

NodeRuntime.runMain(NodeWorkerRunner.launch(Runner.pipe(Layer.provide(NodeWorkerRunner.layer))))
