/**
 * The engine of one staged model directory: runner, tokenizer, sampler, KV cache and scheduler composed
 * under the Engine.
 */
import { join } from "node:path"
import { Engine, KvCacheLive, Sampler, Scheduler, type SchedulerOptions } from "@offramp/core"
import { HfTokenizer } from "@offramp/tokenizer"
import { Effect, Layer } from "effect"
import { openModelDirectory } from "./ModelDirectory.js"
import { OnnxModelRunner, type RunnerOptions } from "./OnnxModelRunner.js"

export interface OnnxEngineConfig {
  readonly runner?: RunnerOptions
  readonly scheduler?: SchedulerOptions
}

/** The Engine with every service it needs, for a staged model directory (all services stay visible). */
export const onnxEngineLayer = (modelDir: string, config: OnnxEngineConfig = {}) =>
  Layer.unwrapEffect(
    Effect.map(openModelDirectory(modelDir), ({ spec }) => {
      const services = Scheduler.layer(config.scheduler).pipe(
        Layer.provideMerge(KvCacheLive),
        Layer.provideMerge(OnnxModelRunner.layer(modelDir, config.runner)),
        Layer.merge(HfTokenizer.layer(join(modelDir, spec.files.tokenizer))),
        Layer.merge(Sampler.layer),
      )
      return Engine.layer.pipe(Layer.provideMerge(services))
    }),
  )
