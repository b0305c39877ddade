/**
 * The engine worker thread: serves the WorkerEngine protocol (see WorkerEngine.ts) over `onnxEngineLayer`.
 * The engine lives in a scope of its own, so StopEngine can shut it down (ending its streams with
 * EngineStoppedError) while the connection to the main thread still carries those errors.
 */
import { WorkerRunner } from "@effect/platform"
import { NodeRuntime, NodeWorkerRunner } from "@effect/platform-node"
import { Engine, type EngineShape, EngineStoppedError } from "@offramp/core"
import { Chunk, Context, Effect, Exit, Layer, Scope, Stream } from "effect"
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
    return WorkerRunner.layerSerialized(EngineRequest, {
      StartEngine: ({ modelDir, config }) =>
        Effect.gen(function* () {
          const context = yield* Layer.buildWithScope(onnxEngineLayer(modelDir, config), engineScope)
          engine = Context.get(context, Engine)
          return { spec: engine.spec, defaults: engine.defaults }
        }),
      // One element per chunk the engine's stream has ready: a batch of events is one message.
      Generate: ({ request }) =>
        Stream.unwrap(Effect.map(started, (e) => e.generate(request))).pipe(
          Stream.mapChunks((chunk) => Chunk.of(Chunk.toReadonlyArray(chunk))),
        ),
      GetStats: () => Effect.flatMap(Effect.orDie(started), (e) => e.stats),
      StopEngine: () => Scope.close(engineScope, Exit.void),
    })
  }),
)

NodeRuntime.runMain(NodeWorkerRunner.launch(Runner.pipe(Layer.provide(NodeWorkerRunner.layer))))
