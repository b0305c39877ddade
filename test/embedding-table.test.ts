/**
 * The runner's embedding lookup in JavaScript (onnx internal/EmbeddingTable.ts) against onnxruntime running the
 * same embed graph: equal rows for a float16 table (the default model) and a float32 one (stories260K), and a clear
 * error for an id outside the table.
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "@effect/vitest"
import { ModelRunner } from "@offramp/core/ModelRunner"
import { OnnxModelRunner } from "@offramp/onnx/OnnxModelRunner"
import { Effect, Either } from "effect"
import * as ort from "onnxruntime-node"
import { readEmbeddingTable } from "../packages/onnx/src/internal/EmbeddingTable.js"
import { convertStories, REPO_ROOT, tempDir } from "./support/stories.js"

const viaSession = async (file: string, ids: BigInt64Array) => {
  const session = await ort.InferenceSession.create(file)
  try {
    const out = await session.run({ ids: new ort.Tensor("int64", ids, [1, ids.length]) })
    return out.hidden!.data as Float32Array
  } finally {
    await session.release()
  }
}

describe("embedding table", () => {
  for (const [name, dir] of [
    ["float16 (the default model)", async () => join(REPO_ROOT, "models/default")],
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
