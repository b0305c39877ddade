/**
 * The one layer a host app provides: `Offramp.layer({ model })` gives the `Engine` (and the model's `Tokenizer`)
 * for a staged model directory, with every service the engine needs built inside it and kept out of the host's
 * context.
 *
 * ```ts
 * import { Engine } from "@offramp/core"
 * import { Offramp } from "@offramp/onnx"
 * import { modelDir } from "@offramp/default-model"
 *
 * Engine.generate({ prompt: "Once upon a time", maxTokens: 40 }).pipe(
 *   Stream.runForEach((event) => Console.log(event.text)),
 *   Effect.provide(Offramp.layer({ model: modelDir })),
 * )
 * ```
 *
 * A server passes `worker: true`: onnxruntime's calls are synchronous and block the thread that makes them, so the
 * engine then runs in a supervised worker thread and the host's event loop stays free for I/O.
 */
import { Engine } from "@offramp/core/Engine"
import type { ModelLoadError, TokenizerError } from "@offramp/core/Errors"
import { Tokenizer } from "@offramp/core/Tokenizer"
import { Context, Effect, Layer } from "effect"
import { type OnnxEngineConfig, onnxEngineLayer } from "./OnnxEngine.js"
import * as WorkerEngine from "./WorkerEngine.js"

interface BaseOptions extends Omit<OnnxEngineConfig, "confidenceEvaluator"> {
  /** A staged model directory (`offramp convert` writes one; `modelDir` of @offramp/default-model is the default model). */
  readonly model: string
}

/**
 * Where the engine runs. `worker`: in a supervised worker thread (restarted when it dies or hangs) so that
 * onnxruntime's calls do not block this thread's event loop, what a server wants. Without it, on the calling thread:
 * the fastest for a script or a batch job, and the only place a custom confidence measure (a layer, which cannot
 * cross into a worker thread) can run.
 */
export type OfframpOptions = BaseOptions &
  (
    | { readonly worker?: false; readonly confidenceEvaluator?: OnnxEngineConfig["confidenceEvaluator"] }
    | { readonly worker: true | WorkerEngine.SupervisorOptions; readonly confidenceEvaluator?: never }
  )

/** The Engine and the model's Tokenizer; nothing else of the engine's parts reaches the host's context. */
export const layer = (options: OfframpOptions): Layer.Layer<Engine | Tokenizer, ModelLoadError | TokenizerError> => {
  if (options.worker !== undefined && options.worker !== false) {
    const { model, worker, confidenceEvaluator: _, ...config } = options
    return WorkerEngine.layer(model, config, worker === true ? {} : worker)
  }
  const { model, worker: _, confidenceEvaluator, ...rest } = options
  const config: OnnxEngineConfig = confidenceEvaluator ? { ...rest, confidenceEvaluator } : rest
  // onnxEngineLayer exposes every service (tests and tools use them); a host sees the Engine and the Tokenizer.
  return Layer.scopedContext(
    Layer.build(onnxEngineLayer(model, config)).pipe(Effect.map(Context.pick(Engine, Tokenizer))),
  )
}
