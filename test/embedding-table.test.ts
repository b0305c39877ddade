/**
 * The runner's embedding lookup in JavaScript (onnx internal/EmbeddingTable.ts) against onnxruntime running the
 * same embed graph: equal rows for the default model's, a float16 table, a float32 one (stories260K), and block-quantized ones
 * (GatherBlockQuantized, 4 and 8 bits, with and without zero points), and a clear error for an id outside the table.
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "@effect/vitest"
import { buildEmbedGraph } from "@offramp/convert/LlamaGraphs"
import type { LlamaWeights } from "@offramp/convert/LlamaWeights"
import { ModelRunner } from "@offramp/core/ModelRunner"
import { OnnxModelRunner } from "@offramp/onnx/OnnxModelRunner"
import { Effect, Either } from "effect"
import * as ort from "onnxruntime-node"
import { readEmbeddingTable } from "../packages/onnx/src/internal/EmbeddingTable.js"
import { convertStories, REPO_ROOT, tempDir } from "./support/stories.js"

const viaSession = async (file: string | Uint8Array, ids: BigInt64Array) => {
  const session = await ort.InferenceSession.create(file as string)
  try {
    const out = await session.run({ ids: new ort.Tensor("int64", ids, [1, ids.length]) })
    return out.hidden!.data as Float32Array
  } finally {
    await session.release()
  }
}

describe("embedding table", () => {
  for (const [name, dir] of [
    ["the default model (int8 blocks)", async () => join(REPO_ROOT, "models/default")],
    [
      "float32 (stories260K)",
      async () => {
        const out = join(tempDir("embed-table"), "stories")
        await convertStories(out)
        return out
      },
    ],
  ] as const) {
    it(`${name}: the rows onnxruntime's Gather gives`, async () => {
      const modelDir = await dir()
      const spec = JSON.parse(readFileSync(join(modelDir, "model.json"), "utf8"))
      const { vocab, hidden } = spec.dims
      const ids = BigInt64Array.from([0, 1, 7, vocab - 1, 3, 3].map(BigInt))
      const file = join(modelDir, spec.files.embed)
      const table = readEmbeddingTable(readFileSync(file), vocab, hidden)
      expect(table).toBeDefined()
      expect(Array.from(table!.lookup(ids))).toEqual(Array.from(await viaSession(file, ids)))
    })
  }

  it("float16: the rows onnxruntime's Gather and Cast give", async () => {
    const vocab = 37
    const hidden = 96
    const embedding = Float32Array.from({ length: vocab * hidden }, (_, i) => Math.sin(i * 0.61) * (1 + (i % 11)))
    const graph = buildEmbedGraph({ config: { vocab, dim: hidden }, embedding } as unknown as LlamaWeights, {
      float: "float16",
    })
    const ids = BigInt64Array.from([0, 1, 7, vocab - 1, 3, 3].map(BigInt))
    const table = readEmbeddingTable(graph, vocab, hidden)
    expect(table).toBeDefined()
    expect(Array.from(table!.lookup(ids))).toEqual(Array.from(await viaSession(graph, ids)))
  })

  for (const bits of [4, 8] as const) {
    for (const symmetric of [false, true]) {
      it(`int${bits}${symmetric ? ", symmetric" : ""}: the rows onnxruntime's GatherBlockQuantized gives`, async () => {
        const vocab = 37
        const hidden = 96
        // Rows of different ranges and signs, so blocks get different scales and zero points.
        const embedding = Float32Array.from({ length: vocab * hidden }, (_, i) => Math.sin(i * 0.61) * (1 + (i % 11)))
        const weights = { config: { vocab, dim: hidden }, embedding } as unknown as LlamaWeights
        const graph = buildEmbedGraph(weights, {
          float: "float16",
          quantization: { bits, blockSize: 32, symmetric },
          embedding: "quantized",
        })
        const ids = BigInt64Array.from([0, 1, 7, vocab - 1, 3, 3].map(BigInt))
        const table = readEmbeddingTable(graph, vocab, hidden)
        expect(table).toBeDefined()
        const rows = table!.lookup(ids)
        expect(Array.from(rows)).toEqual(Array.from(await viaSession(graph, ids)))
        // And they are the table, to within the quantization step.
        const step = Math.max(...embedding.map(Math.abs)) / (bits === 8 ? 100 : 5)
        ids.forEach((id, i) => {
          for (let j = 0; j < hidden; j++) {
            expect(Math.abs(rows[i * hidden + j]! - embedding[Number(id) * hidden + j]!)).toBeLessThan(step)
          }
        })
      })
    }
  }

  it.effect("the runner uses it, and an id outside the table is a RunnerError naming it", () =>
    Effect.gen(function* () {
      const runner = yield* ModelRunner
      const ok = yield* runner.embed(BigInt64Array.of(5n, 6n), 1, 2)
      expect(ok.length).toBe(2 * runner.spec.dims.hidden)
      const bad = yield* Effect.either(runner.embed(BigInt64Array.of(5n, 99999n), 1, 2))
      expect(Either.isLeft(bad) && bad.left._tag === "RunnerError" && bad.left.message).toMatch(/token id 99999/)
    }).pipe(Effect.provide(OnnxModelRunner.layer(join(REPO_ROOT, "models/default"), { numBlocks: 4 }))),
  )
})
