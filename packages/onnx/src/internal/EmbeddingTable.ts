/**
 * The embedding lookup without onnxruntime: an Offramp embed graph is one Gather of a [vocab, hidden] table (float32,
 * or float16 with a Cast after), or one GatherBlockQuantized of a block-quantized table (the MatMulNBits layout), so
 * the runner reads the table out of the graph and gathers rows itself. One session call less per step (~9 µs at
 * batch 1 on the default model, where a layer is ~70 µs), and the table stays in its stored format in memory.
 * Any other embed graph runs in its session.
 */
import { float16Table } from "@offramp/convert/Float16"
import onnxProto from "onnx-proto"

const { onnx } = onnxProto
const { DataType } = onnx.TensorProto

export interface EmbeddingTable {
  /** Bytes the table holds. */
  readonly bytes: number
  /** ids [n] → hidden [n × hidden]; throws on an id outside the table. */
  readonly lookup: (ids: BigInt64Array) => Float32Array
}

const view = <T>(tensor: InstanceType<typeof onnx.TensorProto>, make: (b: ArrayBuffer) => T): T | undefined => {
  const raw = tensor.rawData
  if (!raw || raw.byteLength === 0) return undefined
  // A copy: the table must not pin (or alias) the whole decoded file.
  return make(new Uint8Array(raw).buffer)
}

type Graph = NonNullable<InstanceType<typeof onnx.ModelProto>["graph"]>
type Node = NonNullable<Graph["node"]>[number]
type Initializer = InstanceType<typeof onnx.TensorProto>

const initializer = (graph: Graph, name: string | undefined): Initializer | undefined =>
  name ? ((graph.initializer ?? []).find((t) => t.name === name) as Initializer | undefined) : undefined

const intAttribute = (node: Node, name: string, fallback: number) => {
  const a = node.attribute?.find((x) => x.name === name)
  return a ? Number(a.i?.toString()) : fallback
}

/** A token id as a row of a table of `vocab` rows; throws on an id outside it. */
const rowOf = (id: bigint, vocab: number) => {
  const row = Number(id)
  if (!(row >= 0 && row < vocab)) throw new Error(`token id ${id} is outside the embedding table (${vocab} rows)`)
  return row
}

/** The table of an Offramp embed graph of `vocab` rows of `hidden` values; undefined for any other graph. */
export const readEmbeddingTable = (bytes: Uint8Array, vocab: number, hidden: number): EmbeddingTable | undefined => {
  const graph = onnx.ModelProto.decode(bytes).graph
  if (!graph) return undefined
  // The graph builder names outputs with a trailing Identity.
  const nodes = (graph.node ?? []).filter((n) => n.opType !== "Identity")
  const ops = nodes.map((n) => n.opType)
  if (ops.length === 1 && ops[0] === "GatherBlockQuantized") return quantizedTable(graph, nodes[0]!, vocab, hidden)
  const plain = ops.length === 1 && ops[0] === "Gather"
  const halfThenCast = ops.length === 2 && ops[0] === "Gather" && ops[1] === "Cast"
  if (!plain && !halfThenCast) return undefined
  const gather = nodes[0]!
  if (halfThenCast && intAttribute(nodes[1]!, "to", -1) !== DataType.FLOAT) return undefined
  const tensor = initializer(graph, gather.input?.[0])
  const dims = (tensor?.dims ?? []).map((d) => Number(d.toString()))
  if (!tensor || dims.length !== 2 || dims[0] !== vocab || dims[1] !== hidden) return undefined
  if (plain && tensor.dataType === DataType.FLOAT) {
    const table = view(tensor, (b) => new Float32Array(b))
    if (table?.length !== vocab * hidden) return undefined
    return {
      bytes: table.byteLength,
      lookup: (ids) => {
        const out = new Float32Array(ids.length * hidden)
        ids.forEach((id, i) => {
          const row = rowOf(id, vocab)
          out.set(table.subarray(row * hidden, (row + 1) * hidden), i * hidden)
        })
        return out
      },
    }
  }
  if (halfThenCast && tensor.dataType === DataType.FLOAT16) {
    const table = view(tensor, (b) => new Uint16Array(b))
    if (table?.length !== vocab * hidden) return undefined
    // A row is one table read per value (the converter's table of every float16 value).
    const decode = float16Table()
    return {
      bytes: table.byteLength,
      lookup: (ids) => {
        const out = new Float32Array(ids.length * hidden)
        for (let i = 0; i < ids.length; i++) {
          const from = rowOf(ids[i]!, vocab) * hidden
          const to = i * hidden
          for (let j = 0; j < hidden; j++) out[to + j] = decode[table[from + j]!]!
        }
        return out
      },
    }
  }
  return undefined
}

/**
 * A GatherBlockQuantized table as the converter writes it: data [vocab, hidden·bits/8] uint8 (4-bit values two per
 * byte, the even index in the low nibble), scales [vocab, blocks] float32, optional zero points [vocab, ·] uint8
 * (8-bit: one per block; 4-bit: two per byte); row value = (code - zero point) · scale. Any other form: undefined.
 */
const quantizedTable = (graph: Graph, node: Node, vocab: number, hidden: number): EmbeddingTable | undefined => {
  const bits = intAttribute(node, "bits", 4)
  const blockSize = intAttribute(node, "block_size", 128)
  if ((bits !== 4 && bits !== 8) || intAttribute(node, "gather_axis", 0) !== 0) return undefined
  if (![1, -1].includes(intAttribute(node, "quantize_axis", 1)) || hidden % blockSize !== 0) return undefined
  const [dataName, idsName, scalesName, zeroName] = node.input ?? []
  if (idsName !== graph.input?.[0]?.name) return undefined
  const dataT = initializer(graph, dataName)
  const scalesT = initializer(graph, scalesName)
  const zeroT = initializer(graph, zeroName)
  if (dataT?.dataType !== DataType.UINT8 || scalesT?.dataType !== DataType.FLOAT) return undefined
  if (zeroName && zeroT?.dataType !== DataType.UINT8) return undefined
  const blocks = hidden / blockSize
  const rowBytes = (hidden * bits) / 8
  const zeroStride = bits === 8 ? blocks : Math.ceil(blocks / 2)
  const data = view(dataT, (b) => new Uint8Array(b))
  const scales = view(scalesT, (b) => new Float32Array(b))
  const zeros = zeroT ? view(zeroT, (b) => new Uint8Array(b)) : undefined
  if (data?.length !== vocab * rowBytes || scales?.length !== vocab * blocks) return undefined
  if (zeroT && zeros?.length !== vocab * zeroStride) return undefined
  const center = 2 ** (bits - 1)
  return {
    bytes: data.byteLength + scales.byteLength + (zeros?.byteLength ?? 0),
    lookup: (ids) => {
      const out = new Float32Array(ids.length * hidden)
      for (let i = 0; i < ids.length; i++) {
        const id = rowOf(ids[i]!, vocab)
        for (let b = 0; b < blocks; b++) {
          const scale = scales[id * blocks + b]!
          const zeroByte = zeros ? zeros[id * zeroStride + (bits === 8 ? b : b >> 1)]! : center
          const zero = zeros && bits === 4 ? (zeroByte >> ((b & 1) * 4)) & 15 : zeroByte
          const to = i * hidden + b * blockSize
          if (bits === 8) {
            const from = id * rowBytes + b * blockSize
            for (let j = 0; j < blockSize; j++) out[to + j] = (data[from + j]! - zero) * scale
          } else {
            const from = id * rowBytes + (b * blockSize) / 2
            for (let j = 0; j < blockSize; j += 2) {
              const byte = data[from + j / 2]!
              out[to + j] = ((byte & 15) - zero) * scale
              out[to + j + 1] = ((byte >> 4) - zero) * scale
            }
          }
        }
      }
      return out
    },
  }
}
