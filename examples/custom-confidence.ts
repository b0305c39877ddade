/**
 * Replaces the confidence measure with a custom ConfidenceEvaluator layer: "gated softmax" trusts an exit head's
 * top probability only when the runner-up is far behind (margin ≥ 0.7), so near-ties never exit early. The engine
 * takes the custom evaluator in place of the default one and is compared with the default at the same threshold.
 *
 * Run: npx tsx --conditions=source examples/custom-confidence.ts [MODEL_DIR]
 */
import { ConfidenceEvaluator, type ConfidenceInput, defaultConfidence } from "@offramp/core/ConfidenceEvaluator"
import { Engine } from "@offramp/core/Engine"
import { modelDir as defaultModelDir } from "@offramp/default-model"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { Console, Effect, Layer, Stream } from "effect"

const modelDir = process.argv[2] ?? defaultModelDir

const gatedSoftmax = (input: ConfidenceInput): number => {
  // Other measures keep their default meaning; only "softmax" is redefined.
  // This evaluator declares no head-free measure, so the engine always passes the head.
  if (input.measure !== "softmax" || input.head === undefined) return defaultConfidence(input)
  const margin = input.head.margin[input.row]!
  return margin >= 0.7 ? input.head.maxProb[input.row]! : 0
}

const GatedConfidence = Layer.succeed(ConfidenceEvaluator, { confidence: gatedSoftmax })

/** The engine of the model directory with the given evaluator in place of the default one. */
const engineWith = (evaluator: Layer.Layer<ConfidenceEvaluator>) =>
  onnxEngineLayer(modelDir, { confidenceEvaluator: evaluator })

const run = Effect.gen(function* () {
  const engine = yield* Engine
  const events = yield* Stream.runCollect(
    engine.generate({
      prompt: "Once upon a time",
      maxTokens: 48,
      sampling: { temperature: 0, topK: 0, topP: 1 },
      earlyExit: { measure: "softmax", threshold: 0.5, minExitLayer: 4 },
    }),
  )
  const tokens = [...events]
  const depth = tokens.reduce((sum, e) => sum + e.exitLayer, 0) / tokens.length
  return { text: tokens.map((e) => e.text).join(""), depth, layers: engine.spec.dims.layers }
})

const program = Effect.gen(function* () {
  const plain = yield* run.pipe(Effect.provide(engineWith(ConfidenceEvaluator.layer)))
  const gated = yield* run.pipe(Effect.provide(engineWith(GatedConfidence)))
  yield* Console.log(`default softmax: mean exit depth ${plain.depth.toFixed(2)}/${plain.layers}`)
  yield* Console.log(`  ${JSON.stringify(plain.text)}`)
  yield* Console.log(`gated softmax:   mean exit depth ${gated.depth.toFixed(2)}/${gated.layers}`)
  yield* Console.log(`  ${JSON.stringify(gated.text)}`)
})

Effect.runPromise(program).catch((error) => {
  console.error(`custom-confidence: ${error}`)
  process.exitCode = 1
})
