/**
 * The ONNX graph of an exit classifier (see @offramp/core ExitClassifier): hidden [N,D] and previous_hidden [N,D]
 * → exit_prob [N]. The graph computes the same features as `writeFeatures` and the same layers as `predictExit`,
 * so any onnxruntime can run it; the model's metadata names the format, so Offramp's runner can also read the
 * weights back and evaluate them without a session call (a call costs more than the classifier itself).
 */
import {
  EXIT_CLASSIFIER_METADATA,
  type ExitClassifierWeights,
  EXIT_CLASSIFIER_TENSORS as T,
} from "@offramp/core/ExitClassifier"
import { GraphNames as N } from "@offramp/core/GraphNames"
import { GraphBuilder } from "./GraphBuilder.js"

export const buildClassifierGraph = (weights: ExitClassifierWeights, hiddenSize: number): Uint8Array => {
  const g = new GraphBuilder("exit_classifier")
  const D = hiddenSize
  const { inputs, hidden: units } = weights
  if (inputs !== D + 2) throw new Error(`a classifier over hidden size ${D} has ${D + 2} inputs, got ${inputs}`)
  g.input(N.hidden, "float32", ["N", D])
  g.input(N.previousHidden, "float32", ["N", D])
  const sumSquares = (x: string) => g.node("ReduceSumSquare", [x], { axes: [-1], keepdims: 1 })
  const ss = sumSquares(N.hidden)
  const rms = g.node("Sqrt", [g.node("Add", [g.node("Div", [ss, g.scalar(D)]), g.scalar(1e-6)])])
  const normalized = g.node("Div", [N.hidden, rms])
  const dot = g.node("ReduceSum", [g.node("Mul", [N.hidden, N.previousHidden]), g.ints([-1])], { keepdims: 1 })
  const norms = g.node("Sqrt", [g.node("Mul", [ss, sumSquares(N.previousHidden)])])
  // A zero vector has no direction: the cosine is 0, as in writeFeatures (dot is 0 there too).
  const cosine = g.node("Div", [dot, g.node("Max", [norms, g.scalar(1e-30)])])
  const features = g.node("Concat", [normalized, cosine, g.node("Log", [rms])], { axis: -1 })
  const w1 = g.weight(T.w1, weights.w1, [Math.max(1, units), inputs])
  const b1 = g.weight(T.b1, weights.b1, [Math.max(1, units)])
  let logit = g.node("Gemm", [features, w1, b1], { transB: 1 })
  if (units > 0) {
    const w2 = g.weight(T.w2, weights.w2, [1, units])
    const b2 = g.weight(T.b2, new Float32Array([weights.b2]), [1])
    logit = g.node("Gemm", [g.node("Relu", [logit]), w2, b2], { transB: 1 })
  }
  const probability = g.node("Reshape", [g.node("Sigmoid", [logit]), g.ints([-1])])
  g.output(N.exitProb, probability, "float32", ["N"])
  return g.encode({
    [EXIT_CLASSIFIER_METADATA]: JSON.stringify({ version: 1, kind: weights.kind, inputs, hidden: units }),
  })
}
