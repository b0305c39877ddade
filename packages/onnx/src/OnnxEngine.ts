/**
 * The engine of one staged model directory: runner, tokenizer, sampler, confidence evaluator, KV cache and
 * scheduler composed under the Engine. Early-exit defaults come from the config, else from the directory's
 * calibration.json (written by `offramp calibrate`), else full depth.
 */
import { readFile } from "node:fs/promises"
import { join } from "node:path"
import { ConfidenceEvaluator } from "@offramp/core/ConfidenceEvaluator"
import { EarlyExitParams } from "@offramp/core/EarlyExit"
import { Engine } from "@offramp/core/Engine"
import { describeParseError, ModelLoadError } from "@offramp/core/Errors"
import { KvCache } from "@offramp/core/KvCache"
import { Sampler } from "@offramp/core/Sampler"
import { Scheduler, type SchedulerOptions } from "@offramp/core/Scheduler"
import { Tokenizer } from "@offramp/core/Tokenizer"
import * as HfTokenizer from "@offramp/tokenizer/HfTokenizer"
import { Effect, Layer, Schema } from "effect"
import { checkTokenizerVocab, openModelDirectory } from "./ModelDirectory.js"
import { OnnxModelRunner, type RunnerOptions } from "./OnnxModelRunner.js"

export interface OnnxEngineConfig {
  readonly runner?: RunnerOptions
  readonly scheduler?: SchedulerOptions
  /** Engine-default early-exit settings; overrides calibration.json. */
  readonly earlyExit?: EarlyExitParams
  /** Another confidence measure in place of the default one (see ConfidenceEvaluator). */
  readonly confidenceEvaluator?: Layer.Layer<ConfidenceEvaluator>
}

export const CALIBRATION_FILE = "calibration.json"

/** calibration.json: the early-exit defaults `offramp calibrate` found, and how it found them. */
export const CalibrationFile = Schema.Struct({
  earlyExit: EarlyExitParams,
  calibration: Schema.Unknown,
})

/** The early-exit defaults stored in a model directory, if any. */
export const readCalibration = (modelDir: string) =>
  Effect.gen(function* () {
    const path = join(modelDir, CALIBRATION_FILE)
    const text = yield* Effect.promise(() => readFile(path, "utf8").catch(() => undefined))
    if (text === undefined) return undefined
    const fail = (message: string) => new ModelLoadError({ path, message })
    const json = yield* Effect.try({ try: () => JSON.parse(text) as unknown, catch: () => fail("not valid JSON") })
    const file = yield* Schema.decodeUnknown(CalibrationFile)(json).pipe(
      Effect.mapError((e) => fail(`does not match the calibration format: ${describeParseError(e)}`)),
    )
    return file.earlyExit
  })

/** The Engine with every service it needs, for a staged model directory (all services stay visible). */
export const onnxEngineLayer = (modelDir: string, config: OnnxEngineConfig = {}) =>
  Layer.unwrapEffect(
    Effect.gen(function* () {
      const { spec } = yield* openModelDirectory(modelDir)
      const earlyExit = config.earlyExit ?? (yield* readCalibration(modelDir))
      const services = Scheduler.layer(config.scheduler).pipe(
        Layer.provideMerge(KvCache.layer),
        Layer.provideMerge(OnnxModelRunner.layer(modelDir, config.runner)),
        Layer.merge(
          Layer.effect(
            Tokenizer,
            HfTokenizer.fromFile(join(modelDir, spec.files.tokenizer)).pipe(
              Effect.tap((tokenizer) => checkTokenizerVocab(modelDir, spec, tokenizer.vocabSize)),
            ),
          ),
        ),
        Layer.merge(Sampler.layer),
        Layer.merge(config.confidenceEvaluator ?? ConfidenceEvaluator.layer),
      )
      return Engine.layer(earlyExit ? { earlyExit } : {}).pipe(Layer.provideMerge(services))
    }),
  )
