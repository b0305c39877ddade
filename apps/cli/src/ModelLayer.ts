/**
 * The engine of one staged model directory: runner, tokenizer and sampler composed under the Engine.
 */
import { join } from "node:path"
import { Engine, type EngineOptions, Sampler } from "@offramp/core"
import { OnnxModelRunner, openModelDirectory, type RunnerOptions } from "@offramp/onnx"
import { HfTokenizer } from "@offramp/tokenizer"
import { Effect, Layer } from "effect"

export const engineLayer = (modelDir: string, runner: RunnerOptions = {}, engine: EngineOptions = {}) =>
  Layer.unwrapEffect(
    Effect.map(openModelDirectory(modelDir), ({ spec }) =>
      Engine.layer(engine).pipe(
        Layer.provide(
          Layer.mergeAll(
            OnnxModelRunner.layer(modelDir, runner),
            HfTokenizer.layer(join(modelDir, spec.files.tokenizer)),
            Sampler.layer,
          ),
        ),
      ),
    ),
  )
