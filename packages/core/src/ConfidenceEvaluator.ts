/**
 * The ConfidenceEvaluator service: how sure an exit head is about each row's next token, as a number in [0, 1]
 * compared against the exit's threshold. Softmax response, margin and entropy come from statistics the head
 * graph computes in-graph; saturation compares the hidden state with the previous exit's; a learned classifier
 * is a graph of the model directory. Replace the layer to plug in another measure.
 */
import { Context, Layer } from "effect"
import { type ConfidenceMeasure, isHeadFree } from "./EarlyExit.js"
import type { HeadOutput } from "./ModelRunner.js"

export interface ConfidenceInput {
  readonly measure: ConfidenceMeasure
  /** Position of the exit in spec.exits. */
  readonly exitIndex: number
  /**
   * Row `row` of the head's outputs belongs to this row. Undefined when the measure is one the evaluator decides
   * without a head (`headFree`): the engine then runs the head only for the rows that exit.
   */
  readonly head: HeadOutput | undefined
  readonly row: number
  /** The row's hidden state at this exit and at the previous exit (the embedding for the first), [hidden]. */
  readonly hidden: Float32Array
  readonly previousHidden: Float32Array
  readonly vocab: number
  /** The exit classifier's probability for this row, when the model has one and the measure asks for it. */
  readonly classifier?: number
}

export interface ConfidenceEvaluatorShape {
  readonly confidence: (input: ConfidenceInput) => number
  /**
   * True when `confidence` reads `head.logits`: the engine then fetches the logits of every head it scores, a
   * rows × vocab copy per call that greedy decoding otherwise skips.
   */
  readonly needsLogits?: boolean
  /**
   * The measures `confidence` answers without `head` (default: none, so a custom evaluator always gets a head). The
   * default evaluator decides classifier and saturation from hidden states alone.
   */
  readonly headFree?: (measure: ConfidenceMeasure) => boolean
}

const cosine = (a: Float32Array, b: Float32Array) => {
  let dot = 0
  let na = 0
  let nb = 0
  for (let i = 0; i < a.length; i++) {
    dot += a[i]! * b[i]!
    na += a[i]! * a[i]!
    nb += b[i]! * b[i]!
  }
  return na === 0 || nb === 0 ? 0 : dot / Math.sqrt(na * nb)
}

const needHead = (input: ConfidenceInput): HeadOutput => {
  if (input.head === undefined) throw new Error(`the ${input.measure} measure needs the exit head's output`)
  return input.head
}

export const defaultConfidence = (input: ConfidenceInput): number => {
  const { row } = input
  switch (input.measure) {
    case "softmax":
      return needHead(input).maxProb[row]!
    case "margin":
      return needHead(input).margin[row]!
    case "entropy":
      // 1 at a one-hot distribution, 0 at the uniform one.
      return Math.max(0, 1 - needHead(input).entropy[row]! / Math.log(input.vocab))
    case "saturation":
      // CALM's state saturation; negative similarity counts as no confidence.
      return Math.max(0, cosine(input.hidden, input.previousHidden))
    case "classifier":
      return input.classifier ?? 0
  }
}

export class ConfidenceEvaluator extends Context.Tag("@offramp/core/ConfidenceEvaluator")<
  ConfidenceEvaluator,
  ConfidenceEvaluatorShape
>() {
  static readonly layer: Layer.Layer<ConfidenceEvaluator> = Layer.succeed(ConfidenceEvaluator, {
    confidence: defaultConfidence,
    headFree: isHeadFree,
  })
}
