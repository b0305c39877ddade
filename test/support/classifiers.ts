/**
 * Exit classifiers for test models: fitted on a text by the calibrate command's own code path, or random weights
 * (any decision pattern, for engine properties).
 */
import { readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { buildClassifierGraph } from "@offramp/convert/ClassifierGraph"
import { type ExitClassifierWeights, featureCount } from "@offramp/core/ExitClassifier"
import type { ModelSpec } from "@offramp/core/ModelSpec"

/** A seeded generator of numbers in [-0.5, 0.5) (a linear congruential one: enough for test weights). */
export const seededRandom = (seed: number) => {
  let state = seed
  return () => {
    state = (state * 1103515245 + 12345) % 2 ** 31
    return state / 2 ** 31 - 0.5
  }
}

/** Random classifier weights over hidden size `D`: logistic regression (`hidden` 0) or an MLP of `hidden` units. */
export const randomClassifierWeights = (D: number, hidden: number, random: () => number): ExitClassifierWeights => {
  const inputs = featureCount(D)
  const units = Math.max(1, hidden)
  return {
    kind: hidden === 0 ? "logistic" : "mlp",
    inputs,
    hidden,
    w1: Float32Array.from({ length: units * inputs }, random),
    b1: Float32Array.from({ length: units }, random),
    w2: Float32Array.from({ length: hidden }, () => random() * 2),
    b2: random(),
  }
}

/** Writes a random logistic or MLP classifier for every early exit of the model in `dir`, and lists them in model.json. */
export const writeRandomClassifiers = (dir: string, seed = 1): void => {
  const specPath = join(dir, "model.json")
  const spec = JSON.parse(readFileSync(specPath, "utf8")) as {
    dims: ModelSpec["dims"]
    exits: Array<{ layer: number; classifier?: string }>
  }
  const random = seededRandom(seed)
  const D = spec.dims.hidden
  spec.exits.slice(0, -1).forEach((exit, i) => {
    exit.classifier = `classifier_${exit.layer}.onnx`
    writeFileSync(
      join(dir, exit.classifier),
      buildClassifierGraph(randomClassifierWeights(D, i % 2 === 0 ? 0 : 4, random), D),
    )
  })
  writeFileSync(specPath, `${JSON.stringify(spec, null, 2)}\n`)
}
