/**
 * `offramp calibrate`: finds per-exit thresholds that keep early-exit tokens in agreement with full depth at a
 * target rate on a text, and writes them to the model directory's calibration.json, which the engine reads as its
 * early-exit defaults (so `generate` and `serve` pick them up). Implemented here; commands/calibrate.ts defines
 * the flags and imports this when the command runs; `offramp evaluate` shares textExitStatistics.
 */
import { readFile, writeFile } from "node:fs/promises"
import { basename, join } from "node:path"
import {
  CALIBRATION_WINDOW,
  calibratedEarlyExit,
  calibrationWindow,
  collectExitStatistics,
  type ExitCalibration,
  thresholdsForPerplexity,
  thresholdsForTarget,
} from "@offramp/core/Calibration"
import { ConfidenceEvaluator } from "@offramp/core/ConfidenceEvaluator"
import type { ConfidenceMeasure } from "@offramp/core/EarlyExit"
import { InvalidRequestError, ModelLoadError } from "@offramp/core/Errors"
import { featureCount, predictSamples } from "@offramp/core/ExitClassifier"
import { ModelRunner } from "@offramp/core/ModelRunner"
import { Tokenizer } from "@offramp/core/Tokenizer"
import { openModelDirectory } from "@offramp/onnx/ModelDirectory"
import { CALIBRATION_FILE, type CalibrationFile } from "@offramp/onnx/OnnxEngine"
import { DEFAULT_BLOCK_SIZE, OnnxModelRunner } from "@offramp/onnx/OnnxModelRunner"
import * as HfTokenizer from "@offramp/tokenizer/HfTokenizer"
import { Console, Effect, Layer, Option } from "effect"
import {
  CLASSIFIERS_FILE,
  type ClassifierKind,
  classifierTable,
  fitClassifiers,
  writeClassifiers,
} from "../calibrate/classifiers.js"
import type { CalibrateFlags } from "../commands/calibrate.js"

/** Fewer positions than this cannot resolve an agreement rate worth writing down. */
export const MIN_CALIBRATION_TOKENS = 100

export const readText = (path: string) =>
  Effect.gen(function* () {
    const content = yield* Effect.tryPromise({
      try: () => readFile(path, "utf8"),
      catch: (e) => {
        const code = (e as NodeJS.ErrnoException).code ?? "error"
        return new InvalidRequestError({
          message: `cannot read the calibration text ${path} (${code}); check the path`,
        })
      },
    })
    if (content.trim() === "") {
      return yield* new InvalidRequestError({ message: `the calibration text ${path} is empty` })
    }
    return content
  })

/**
 * Runs a text teacher-forced through a model on a runner of its own and scores every position at every exit
 * (with `includeFinal`, the full-depth exit too).
 */
export const textExitStatistics = (
  modelDir: string,
  textPath: string,
  maxTokens: number,
  measure: ConfidenceMeasure,
  includeFinal = false,
  features = false,
) =>
  Effect.gen(function* () {
    if (maxTokens < 1) {
      return yield* new InvalidRequestError({ message: `--max-tokens must be positive, got ${maxTokens}` })
    }
    const { spec } = yield* openModelDirectory(modelDir)
    const content = yield* readText(textPath)
    const window = calibrationWindow(spec.dims.contextLength, CALIBRATION_WINDOW)
    const services = Layer.mergeAll(
      OnnxModelRunner.layer(modelDir, {
        blockSize: DEFAULT_BLOCK_SIZE,
        numBlocks: Math.ceil(window / DEFAULT_BLOCK_SIZE),
      }),
      HfTokenizer.layer(join(modelDir, spec.files.tokenizer)),
      ConfidenceEvaluator.layer,
    )
    return yield* Effect.gen(function* () {
      const runner = yield* ModelRunner
      const tokenizer = yield* Tokenizer
      const evaluator = yield* ConfidenceEvaluator
      const all = yield* tokenizer.encode(content, { addSpecialTokens: false })
      const tokens = all.slice(0, maxTokens)
      if (tokens.length < MIN_CALIBRATION_TOKENS) {
        return yield* new InvalidRequestError({
          message:
            `the text is too short: ${tokens.length} tokens, at least ${MIN_CALIBRATION_TOKENS} ` +
            "are needed (give a longer text, or raise --max-tokens)",
        })
      }
      const statistics = yield* collectExitStatistics(runner, evaluator, tokens, {
        measure,
        window,
        includeFinal,
        features,
      })
      return { statistics, tokens: tokens.length }
    }).pipe(Effect.provide(services))
  })

const percent = (x: number) => `${(100 * x).toFixed(1)} %`

const row = (layer: string, threshold: string, coverage: string, agreement: string) =>
  `${layer.padStart(5)}  ${threshold.padStart(9)}  ${coverage.padStart(8)}  ${agreement.padStart(9)}`

const table = (exits: ReadonlyArray<ExitCalibration>) =>
  [
    "layer  threshold  coverage  agreement",
    ...exits.map((e) =>
      e.threshold <= 1
        ? row(String(e.layer), e.threshold.toFixed(4), percent(e.coverage), percent(e.agreement))
        : row(String(e.layer), "closed", percent(0), "-"),
    ),
  ].join("\n")

/**
 * Fits and writes exit classifiers. Returns the text's statistics under the classifier measure (each early exit's
 * confidences are its fitted classifier's, computed from the features the same pass collected, so the text runs once;
 * with `includeFinal`, full depth's statistics last) and the first held-out position, where thresholds are calibrated.
 */
const trainClassifiers = (
  args: {
    readonly model: string
    readonly text: string
    readonly maxTokens: number
    readonly classifierKind: ClassifierKind
    readonly heldoutFraction: number
  },
  hidden: number,
  includeFinal: boolean,
) =>
  Effect.gen(function* () {
    if (!(args.heldoutFraction > 0 && args.heldoutFraction < 1)) {
      return yield* new InvalidRequestError({
        message: `--heldout-fraction is a fraction in (0, 1), got ${args.heldoutFraction}`,
      })
    }
    const { statistics, tokens } = yield* textExitStatistics(
      args.model,
      args.text,
      args.maxTokens,
      "softmax",
      includeFinal,
      true,
    )
    const early = statistics.filter((s) => s.features !== undefined)
    const positions = early[0]?.samples.length ?? 0
    if (positions === 0) {
      return yield* new InvalidRequestError({ message: "the model has no early exit to fit a classifier for" })
    }
    const split = Math.floor(positions * (1 - args.heldoutFraction))
    const fitted = fitClassifiers(early, hidden, { kind: args.classifierKind, split, seed: 1 })
    yield* writeClassifiers(args.model, hidden, fitted, { text: basename(args.text), tokens })
    yield* Console.log(classifierTable(fitted))
    yield* Console.error(
      `[exit classifiers: ${split} positions fitted, ${positions - split} held out; wrote ` +
        `${fitted.map((f) => f.file).join(", ")} and ${CLASSIFIERS_FILE} into ${args.model}]`,
    )
    // float32, as the runner's classifier outputs are, so that thresholds compare with them exactly.
    const inputs = featureCount(hidden)
    const classified = early.map((stats, e) => {
      const confidence = predictSamples(fitted[e]!.weights, {
        inputs,
        features: stats.features!,
        labels: new Uint8Array(stats.samples.length),
      })
      return {
        layer: stats.layer,
        samples: stats.samples.map((s, p) => ({ ...s, confidence: Math.fround(confidence[p]!) })),
      }
    })
    return { statistics: [...classified, ...statistics.slice(early.length)], tokens, split }
  })

export const handle = (args: CalibrateFlags) =>
  Effect.gen(function* () {
    if (!(args.target > 0 && args.target <= 1)) {
      return yield* new InvalidRequestError({
        message: `--target is an agreement rate in (0, 1], got ${args.target}`,
      })
    }
    const budget = Option.getOrUndefined(args.maxPerplexityIncrease)
    if (budget !== undefined && !(budget >= 0)) {
      return yield* new InvalidRequestError({ message: `--max-perplexity-increase is a fraction ≥ 0, got ${budget}` })
    }
    const { spec } = yield* openModelDirectory(args.model)
    const measure = args.classifiers ? "classifier" : args.measure
    const collected = args.classifiers
      ? yield* trainClassifiers(args, spec.dims.hidden, budget !== undefined)
      : {
          ...(yield* textExitStatistics(args.model, args.text, args.maxTokens, measure, budget !== undefined)),
          split: 0,
        }
    const from = collected.split
    const all = collected.statistics.map((s) => ({ layer: s.layer, samples: s.samples.slice(from) }))
    const { tokens } = collected
    const statistics = budget === undefined ? all : all.slice(0, -1)
    const exits =
      budget === undefined
        ? thresholdsForTarget(statistics, args.target)
        : thresholdsForPerplexity(statistics, all.at(-1)!, budget, spec.dims.layers)

    const file: typeof CalibrationFile.Type = {
      earlyExit: calibratedEarlyExit(exits, { measure, policy: args.policy, kv: args.kv }),
      calibration: {
        ...(budget === undefined ? { target: args.target } : { maxPerplexityIncrease: budget }),
        text: basename(args.text),
        tokens,
        ...(from > 0 ? { fromPosition: from } : {}),
        measure,
        exits,
      },
    }
    const path = join(args.model, CALIBRATION_FILE)
    yield* Effect.tryPromise({
      try: () => writeFile(path, `${JSON.stringify(file, null, 2)}\n`),
      catch: (e) => new ModelLoadError({ path, message: `cannot write calibration: ${(e as Error).message}` }),
    })
    yield* Console.log(table(exits))
    yield* Console.error(
      `[${tokens} tokens of ${basename(args.text)}${from > 0 ? ` (thresholds from position ${from} on)` : ""}, ` +
        `${budget === undefined ? `target ${percent(args.target)}` : `perplexity within +${percent(budget)}`}, ` +
        `measure ${measure}; ` +
        `wrote ${path}]`,
    )
  })
