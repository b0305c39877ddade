/**
 * GraphBuilder.output: a node's output becomes the graph output by renaming (no Identity node, which onnxruntime would
 * keep and run on every call), and every node that reads the value, before or after, reads the new name; a graph
 * input exported as an output goes through an Identity. Checked on the encoded model and by running it.
 */
import { describe, expect, it } from "@effect/vitest"
import onnxProto from "onnx-proto"
import * as ort from "onnxruntime-node"
import { GraphBuilder } from "../src/GraphBuilder.js"

const { onnx } = onnxProto

describe("GraphBuilder.output", () => {
  it("renames a node's output in place, for the nodes that read it before and after", async () => {
    const g = new GraphBuilder("t")
    g.input("x", "float32", ["N"])
    const doubled = g.node("Add", ["x", "x"])
    const before = g.node("Mul", [doubled, doubled]) // reads the value before it is exported
    g.output("doubled_out", doubled, "float32", ["N"])
    const after = g.node("Add", [doubled, before]) // reads it after: the builder maps the old name
    g.output("result", after, "float32", ["N"])
    g.output("x_again", "x", "float32", ["N"]) // a graph input needs an Identity
    const bytes = g.encode()

    const model = onnx.ModelProto.decode(bytes)
    const nodes = model.graph!.node!
    expect(nodes.map((n) => n.opType)).toEqual(["Add", "Mul", "Add", "Identity"])
    expect(nodes[0]!.output).toEqual(["doubled_out"])
    expect(nodes[1]!.input).toEqual(["doubled_out", "doubled_out"])
    expect(nodes[2]!.input).toEqual(["doubled_out", nodes[1]!.output![0]])
    expect(nodes[2]!.output).toEqual(["result"])

    const session = await ort.InferenceSession.create(bytes)
    const out = await session.run({ x: new ort.Tensor("float32", Float32Array.of(1, 2, 3), [3]) })
    expect(Array.from(out.doubled_out!.data as Float32Array)).toEqual([2, 4, 6])
    expect(Array.from(out.result!.data as Float32Array)).toEqual([6, 20, 42])
    expect(Array.from(out.x_again!.data as Float32Array)).toEqual([1, 2, 3])
    await session.release()
  })

  it("a value exported twice goes through an Identity the second time", async () => {
    const g = new GraphBuilder("t")
    g.input("x", "float32", ["N"])
    const y = g.node("Neg", ["x"])
    g.output("a", y, "float32", ["N"])
    g.output("b", y, "float32", ["N"])
    const session = await ort.InferenceSession.create(g.encode())
    const out = await session.run({ x: new ort.Tensor("float32", Float32Array.of(1, -2), [2]) })
    expect(Array.from(out.a!.data as Float32Array)).toEqual([-1, 2])
    expect(Array.from(out.b!.data as Float32Array)).toEqual([-1, 2])
    await session.release()
  })
})
