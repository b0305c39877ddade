/**
 * The embedding lookup without onnxruntime: an Offramp embed graph is one Gather of a [vocab, hidden] table (float32,
 * or float16 with a Cast after), so the runner reads the table out of the graph and gathers rows itself. One session
 * call less per step (~9 µs at batch 1 on the default model, where a layer is ~70 µs), and a float16 table stays
 * float16 in memory. Any other embed graph runs in its session.
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

/** The table of an Offramp embed graph of `vocab` rows of `hidden` values; undefined for any other graph. */
export const readEmbeddingTable = (bytes: Uint8Array, vocab: number, hidden: number): EmbeddingTable | undefined => {
  const graph = onnx.ModelProto.decode(bytes).graph
  if (!graph) return undefined
  // The graph builder names outputs with a trailing Identity.
  const nodes = (graph.node ?? []).filter((n) => n.opType !== "Identity")
  const ops = nodes.map((n) => n.opType)
  const plain = ops.length === 1 && ops[0] === "Gather"
  const halfThenCast = ops.length === 2 && ops[0] === "Gather" && ops[1] === "Cast"
  if (!plain && !halfThenCast) return undefined
  const gather = nodes[0]!
  if (halfThenCast && Number(nodes[1]!.attribute?.find((a) => a.name === "to")?.i?.toString()) !== DataType.FLOAT)
    return undefined
  const tensor = (graph.initializer ?? []).find((t) => t.name === gather.input?.[0]) as
    | InstanceType<typeof onnx.TensorProto>
    | undefined
  const dims = (tensor?.dims ?? []).map((d) => Number(d.toString()))
  if (!tensor || dims.length !== 2 || dims[0] !== vocab || dims[1] !== hidden) return undefined
  const rowOf = (id: bigint) => {
    const row = Number(id)
    if (!(row >= 0 && row < vocab)) throw new Error(`token id ${id} is outside the embedding table (${vocab} rows)`)
    return row
  }
  if (plain && tensor.dataType === DataType.FLOAT) {
    const table = view(tensor, (b) => new Float32Array(b))
    if (table?.length !== vocab * hidden) return undefined
    return {
      bytes: table.byteLength,
      lookup: (ids) => {
        const out = new Float32Array(ids.length * hidden)
        ids.forEach((id, i) => {
          const row = rowOf(id)
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
          const from = rowOf(ids[i]!) * hidden
          const to = i * hidden
          for (let j = 0; j < hidden; j++) out[to + j] = decode[table[from + j]!]!
        }
        return out
      },
    }
  }
  return undefined
}
