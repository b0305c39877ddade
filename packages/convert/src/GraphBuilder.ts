/**
 * A small builder for ONNX graphs over the generated protobuf classes of `onnx-proto`.
 * Node outputs get unique names; weights are stored as raw little-endian initializers.
 */
import onnxProto from "onnx-proto"

const { onnx } = onnxProto

export const OPSET = 17
/** onnxruntime's contrib operators (RotaryEmbedding); the runner is onnxruntime, so the graphs may use them. */
export const MS_DOMAIN = "com.microsoft"
const IR_VERSION = 8

export type ElemType = "float32" | "int64" | "int32"
/** Element types of initializers: float16 for halved weight files, uint8 for quantized blocks. */
export type TensorType = ElemType | "float16" | "uint8" | "int8"
/** A dimension: a number, or a symbolic name shared by inputs and outputs ("R", "T", ...). */
export type Dim = number | string

/** Attribute values: ints by default; wrap floats with `float()` so 1.0 is not mistaken for an int. */
export type AttrValue = number | ReadonlyArray<number> | string | { readonly float: number }
export const float = (value: number): { readonly float: number } => ({ float: value })

const tensorTypeCodes: Record<TensorType, number> = {
  float32: onnx.TensorProto.DataType.FLOAT,
  int64: onnx.TensorProto.DataType.INT64,
  int32: onnx.TensorProto.DataType.INT32,
  float16: onnx.TensorProto.DataType.FLOAT16,
  uint8: onnx.TensorProto.DataType.UINT8,
  int8: onnx.TensorProto.DataType.INT8,
}
const elemTypeCode = (t: TensorType) => tensorTypeCodes[t]

const bytesOf = (data: ArrayBufferView) => new Uint8Array(data.buffer, data.byteOffset, data.byteLength)

const valueInfo = (name: string, type: ElemType, dims: ReadonlyArray<Dim>) =>
  onnx.ValueInfoProto.create({
    name,
    type: {
      tensorType: {
        elemType: elemTypeCode(type),
        shape: { dim: dims.map((d) => (typeof d === "number" ? { dimValue: d } : { dimParam: d })) },
      },
    },
  })

const attribute = (name: string, value: AttrValue) => {
  const A = onnx.AttributeProto.AttributeType
  if (typeof value === "string") return { name, type: A.STRING, s: new TextEncoder().encode(value) }
  if (typeof value === "number") return { name, type: A.INT, i: value }
  if (Array.isArray(value)) return { name, type: A.INTS, ints: [...(value as ReadonlyArray<number>)] }
  return { name, type: A.FLOAT, f: (value as { float: number }).float }
}

export class GraphBuilder {
  private readonly nodes: Array<ReturnType<typeof onnx.NodeProto.create>> = []
  private readonly inputs: Array<ReturnType<typeof onnx.ValueInfoProto.create>> = []
  private readonly outputs: Array<ReturnType<typeof onnx.ValueInfoProto.create>> = []
  private readonly initializers: Array<ReturnType<typeof onnx.TensorProto.create>> = []
  private readonly names = new Set<string>()
  /** Node outputs by name, and the names given to node outputs exported as graph outputs. */
  private readonly producers = new Map<string, ReturnType<typeof onnx.NodeProto.create>>()
  private readonly renamed = new Map<string, string>()
  private readonly constants = new Map<string, string>()
  private counter = 0

  constructor(readonly graphName: string) {}

  private fresh(hint: string): string {
    let name = hint
    while (this.names.has(name)) name = `${hint}_${++this.counter}`
    this.names.add(name)
    return name
  }

  input(name: string, type: ElemType, dims: ReadonlyArray<Dim>): string {
    this.names.add(name)
    this.inputs.push(valueInfo(name, type, dims))
    return name
  }

  /**
   * Declares `value` as a graph output named `name`. A node's output is renamed in place (nodes that read it, before
   * or after, read `name`): an Identity would be a node of its own, which onnxruntime keeps and runs on every call.
   * Anything else (a graph input, an initializer, a value already exported) goes through an Identity.
   */
  output(name: string, value: string, type: ElemType, dims: ReadonlyArray<Dim>): string {
    this.names.add(name)
    const current = this.renamed.get(value) ?? value
    const producer = this.producers.get(current)
    if (producer && current === value) {
      producer.output = producer.output.map((o) => (o === value ? name : o))
      for (const node of this.nodes) node.input = node.input.map((i) => (i === value ? name : i))
      this.producers.delete(value)
      this.renamed.set(value, name)
    } else {
      this.nodes.push(
        onnx.NodeProto.create({ opType: "Identity", input: [current], output: [name], name: `out_${name}` }),
      )
    }
    this.outputs.push(valueInfo(name, type, dims))
    return name
  }

  weight(name: string, data: Float32Array, dims: ReadonlyArray<number>): string {
    return this.initializer(name, "float32", data, dims)
  }

  /** An initializer of any element type; `data` holds exactly the tensor's values (raw little-endian bytes). */
  initializer(name: string, type: TensorType, data: ArrayBufferView, dims: ReadonlyArray<number>): string {
    const size = dims.reduce((a, b) => a * b, 1)
    const width = type === "int64" ? 8 : type === "float32" || type === "int32" ? 4 : type === "float16" ? 2 : 1
    if (size * width !== data.byteLength) {
      throw new Error(`initializer ${name}: ${data.byteLength} bytes for ${type} [${dims}]`)
    }
    const unique = this.fresh(name)
    this.initializers.push(
      onnx.TensorProto.create({ name: unique, dims: [...dims], dataType: elemTypeCode(type), rawData: bytesOf(data) }),
    )
    return unique
  }

  /** An int64 constant (shapes, axes, indices); identical constants are shared. */
  ints(values: ReadonlyArray<number>, dims: ReadonlyArray<number> = [values.length]): string {
    const key = `i:${dims}:${values}`
    const known = this.constants.get(key)
    if (known) return known
    const name = this.initializer("const_i64", "int64", new BigInt64Array(values.map((v) => BigInt(v))), dims)
    this.constants.set(key, name)
    return name
  }

  /** A float32 scalar constant; identical constants are shared. */
  scalar(value: number): string {
    const key = `f:${value}`
    const known = this.constants.get(key)
    if (known) return known
    const name = this.weight("const_f32", new Float32Array([value]), [])
    this.constants.set(key, name)
    return name
  }

  /** Adds a node with several outputs. */
  nodeN(
    op: string,
    inputs: ReadonlyArray<string>,
    outputCount: number,
    attrs: Readonly<Record<string, AttrValue>> = {},
    hint = op,
    domain = "",
  ): Array<string> {
    const outputs = Array.from({ length: outputCount }, (_, i) => this.fresh(`${hint}_out${i}`))
    const node = onnx.NodeProto.create({
      opType: op,
      domain,
      name: this.fresh(`${hint}_node`),
      input: inputs.map((i) => this.renamed.get(i) ?? i),
      output: outputs,
      attribute: Object.entries(attrs).map(([k, v]) => attribute(k, v)),
    })
    this.nodes.push(node)
    for (const o of outputs) this.producers.set(o, node)
    return outputs
  }

  /** Adds a node with one output and returns its name. */
  node(op: string, inputs: ReadonlyArray<string>, attrs: Readonly<Record<string, AttrValue>> = {}, hint = op): string {
    return this.nodeN(op, inputs, 1, attrs, hint)[0]!
  }

  /**
   * Adds a node of onnxruntime's contrib domain with several outputs, of which only the `wanted` ones are computed
   * (an optional output left unnamed is skipped by the kernel); the others are returned as "".
   */
  contribN(
    op: string,
    inputs: ReadonlyArray<string>,
    wanted: ReadonlyArray<boolean>,
    attrs: Readonly<Record<string, AttrValue>> = {},
  ): Array<string> {
    const outputs = this.nodeN(op, inputs, wanted.length, attrs, op, MS_DOMAIN)
    const node = this.nodes[this.nodes.length - 1]!
    node.output = outputs.map((o, i) => (wanted[i] ? o : ""))
    return node.output
  }

  /** Adds a one-output node of onnxruntime's contrib domain. */
  contrib(op: string, inputs: ReadonlyArray<string>, attrs: Readonly<Record<string, AttrValue>> = {}): string {
    return this.nodeN(op, inputs, 1, attrs, op, MS_DOMAIN)[0]!
  }

  /** Serializes the model; `metadata` becomes the model's metadata_props (key → string value). */
  encode(metadata: Readonly<Record<string, string>> = {}): Uint8Array {
    const model = onnx.ModelProto.create({
      irVersion: IR_VERSION,
      producerName: "offramp",
      producerVersion: "0.1.0",
      metadataProps: Object.entries(metadata).map(([key, value]) => ({ key, value })),
      opsetImport: [
        { domain: "", version: OPSET },
        { domain: MS_DOMAIN, version: 1 },
      ],
      graph: {
        name: this.graphName,
        node: this.nodes,
        input: this.inputs,
        output: this.outputs,
        initializer: this.initializers,
      },
    })
    return onnx.ModelProto.encode(model).finish()
  }
}
