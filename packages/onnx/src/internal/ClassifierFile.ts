/**
 * Reads an exit classifier graph's weights back, when the graph says (in its metadata) that it is one of Offramp's
 * classifiers (@offramp/convert ClassifierGraph). The runner then evaluates it in JavaScript: a few thousand
 * multiply-adds per row cost less than one onnxruntime call. Any other classifier graph runs in a session.
 */
import {
  EXIT_CLASSIFIER_METADATA,
  type ExitClassifierWeights,
  featureCount,
  EXIT_CLASSIFIER_TENSORS as T,
} from "@offramp/core/ExitClassifier"
import onnxProto from "onnx-proto"

const { onnx } = onnxProto

const floats = (tensor: InstanceType<typeof onnx.TensorProto>): Float32Array => {
  if (tensor.dataType !== onnx.TensorProto.DataType.FLOAT) throw new Error(`${tensor.name} is not float32`)
  if (tensor.rawData && tensor.rawData.byteLength > 0) {
    const bytes = tensor.rawData
    return new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength))
  }
  return Float32Array.from(tensor.floatData)
}

/** The weights of an Offramp classifier graph over hidden size `hidden`; undefined for any other graph. */
export const readClassifierWeights = (bytes: Uint8Array, hidden: number): ExitClassifierWeights | undefined => {
  const model = onnx.ModelProto.decode(bytes)
  const entry = model.metadataProps.find((p) => p.key === EXIT_CLASSIFIER_METADATA)
  if (!entry?.value) return undefined
  const meta = JSON.parse(entry.value) as { version: number; kind: "logistic" | "mlp"; inputs: number; hidden: number }
  if (meta.version !== 1 || meta.inputs !== featureCount(hidden)) return undefined
  const tensors = new Map(
    (model.graph?.initializer ?? []).map((t) => [t.name, t as InstanceType<typeof onnx.TensorProto>]),
  )
  const get = (name: string) => {
    const t = tensors.get(name)
    if (!t) throw new Error(`the classifier graph has no ${name}`)
    return floats(t)
  }
  const units = Math.max(1, meta.hidden)
  const w1 = get(T.w1)
  const b1 = get(T.b1)
  if (w1.length !== units * meta.inputs || b1.length !== units) throw new Error("classifier weights of the wrong size")
  const w2 = meta.hidden > 0 ? get(T.w2) : new Float32Array(0)
  const b2 = meta.hidden > 0 ? get(T.b2)[0]! : 0
  return { kind: meta.kind, inputs: meta.inputs, hidden: meta.hidden, w1, b1, w2, b2 }
}
