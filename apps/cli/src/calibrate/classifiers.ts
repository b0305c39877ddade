/**
 * `offramp calibrate --classifiers`: fits an exit classifier per early exit on a text run teacher-forced, writes each
 * as an ONNX graph (classifier_<layer>.onnx) with a summary (classifiers.json), and points model.json's exits at them.
 *
 * The text's positions are split in order: the first part trains, the rest (held out) scores the classifiers and is
 * where the classifier measure's thresholds are calibrated, so neither the figures nor the thresholds come from
 * positions a classifier was fitted on.
 */
import { readFile, rename, writeFile } from "node:fs/promises"
import { join } from "node:path"
import { buildClassifierGraph } from "@offramp/convert/ClassifierGraph"
import type { ExitStatistics } from "@offramp/core/Calibration"
import { ModelLoadError } from "@offramp/core/Errors"
import {
  type ClassifierMetrics,
  type ClassifierSamples,
  classifierMetrics,
  type ExitClassifierWeights,
  featureCount,
  fitExitClassifier,
  predictSamples,
} from "@offramp/core/ExitClassifier"
import { Effect } from "effect"

export type ClassifierKind = "auto" | "logistic" | "mlp"

/** The MLP is kept only when its held-out log loss is this much (relative) below logistic regression's. */
export const MLP_MIN_GAIN = 0.02

export const CLASSIFIERS_FILE = "classifiers.json"

export interface FittedExit {
  readonly layer: number
  readonly file: string
  readonly kind: "logistic" | "mlp"
  readonly trainSamples: number
  /** Held-out figures of the kept classifier, of both kinds, and of softmax's ranking for comparison. */
  readonly heldout: ClassifierMetrics
  readonly logistic: ClassifierMetrics
  readonly mlp: ClassifierMetrics | undefined
  /** AUC of the head's max probability for the same labels: what the classifier replaces without the head. */
  readonly softmaxAuc: number
  /** Held-out log loss of the majority-class baseline: always the training positions' agreement rate. */
  readonly baselineLogLoss: number
}

const slice = (stats: ExitStatistics, inputs: number, from: number, to: number): ClassifierSamples => ({
  inputs,
  features: stats.features!.subarray(from * inputs, to * inputs),
  labels: Uint8Array.from(stats.samples.slice(from, to), (s) => (s.agrees ? 1 : 0)),
})

/** Fits, scores and chooses the classifier of every early exit. Pure computation on collected statistics. */
export const fitClassifiers = (
  statistics: ReadonlyArray<ExitStatistics>,
  hidden: number,
  options: { readonly kind: ClassifierKind; readonly split: number; readonly seed: number },
): ReadonlyArray<FittedExit & { readonly weights: ExitClassifierWeights }> => {
  const inputs = featureCount(hidden)
  return statistics.map((stats) => {
    const n = stats.samples.length
    const train = slice(stats, inputs, 0, options.split)
    const test = slice(stats, inputs, options.split, n)
    const fit = (kind: "logistic" | "mlp") => {
      const weights = fitExitClassifier(train, { kind, seed: options.seed })
      return { weights, metrics: classifierMetrics(predictSamples(weights, test), test.labels) }
    }
    const logistic = fit("logistic")
    const mlp = options.kind === "logistic" ? undefined : fit("mlp")
    const useMlp =
      mlp !== undefined &&
      (options.kind === "mlp" || mlp.metrics.logLoss < logistic.metrics.logLoss * (1 - MLP_MIN_GAIN))
    const kept = useMlp ? mlp : logistic
    const softmax = Float64Array.from(stats.samples.slice(options.split), (s) => s.confidence)
    const trainRate = train.labels.reduce((a, b) => a + b, 0) / Math.max(1, train.labels.length)
    return {
      layer: stats.layer,
      file: `classifier_${stats.layer}.onnx`,
      kind: kept.weights.kind,
      trainSamples: options.split,
      heldout: kept.metrics,
      logistic: logistic.metrics,
      mlp: mlp?.metrics,
      softmaxAuc: classifierMetrics(softmax, test.labels).auc,
      baselineLogLoss: classifierMetrics(new Float64Array(test.labels.length).fill(trainRate), test.labels).logLoss,
      weights: kept.weights,
    }
  })
}

/** Writes the classifier graphs and classifiers.json, then points model.json's early exits at the graphs. */
export const writeClassifiers = (
  modelDir: string,
  hidden: number,
  fitted: ReadonlyArray<FittedExit & { readonly weights: ExitClassifierWeights }>,
  provenance: { readonly text: string; readonly tokens: number },
) =>
  Effect.tryPromise({
    try: async () => {
      for (const exit of fitted) {
        await writeFile(join(modelDir, exit.file), buildClassifierGraph(exit.weights, hidden))
      }
      const summary = {
        ...provenance,
        features: "hidden / rms(hidden), cosine with the previous exit's hidden state, log rms(hidden)",
        split: "positions in text order; the first part trains, the rest is held out",
        exits: fitted.map(({ weights: _, ...exit }) => exit),
      }
      await writeFile(join(modelDir, CLASSIFIERS_FILE), `${JSON.stringify(summary, null, 2)}\n`)
      // model.json is rewritten whole through a temporary file, so an interrupted write leaves the old one.
      const specPath = join(modelDir, "model.json")
      const spec = JSON.parse(await readFile(specPath, "utf8")) as {
        exits: Array<{ layer: number; classifier?: string }>
      }
      for (const exit of spec.exits) {
        const match = fitted.find((f) => f.layer === exit.layer)
        if (match) exit.classifier = match.file
      }
      await writeFile(`${specPath}.tmp`, `${JSON.stringify(spec, null, 2)}\n`)
      await rename(`${specPath}.tmp`, specPath)
    },
    catch: (e) =>
      new ModelLoadError({ path: modelDir, message: `cannot write the exit classifiers: ${(e as Error).message}` }),
  })

const pct = (x: number) => `${(100 * x).toFixed(1)}%`

export const classifierTable = (fitted: ReadonlyArray<FittedExit>) =>
  [
    "layer  kind      accuracy  majority  precision  recall     AUC  softmax AUC  log loss  baseline  (held out)",
    ...fitted.map((f) =>
      [
        String(f.layer).padStart(5),
        f.kind.padEnd(8),
        pct(f.heldout.accuracy).padStart(8),
        pct(f.heldout.majorityAccuracy).padStart(8),
        pct(f.heldout.precision).padStart(9),
        pct(f.heldout.recall).padStart(7),
        f.heldout.auc.toFixed(3).padStart(7),
        f.softmaxAuc.toFixed(3).padStart(12),
        f.heldout.logLoss.toFixed(3).padStart(8),
        f.baselineLogLoss.toFixed(3).padStart(8),
      ].join("  "),
    ),
  ].join("\n")
