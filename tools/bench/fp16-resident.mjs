// fp16 weights kept fp16 at run time (fed as graph inputs, so onnxruntime cannot fold their Casts and casts them on
// every call) against the converter's graph (Casts of initializers, folded to fp32 at load): speed and resident
// memory of a model's first segment at batch 1 (BENCHMARKS.md, "Weight formats").
//   node --expose-gc tools/bench/fp16-resident.mjs MODEL_DIR (converted with --dtype fp16) folded|kept

import { readFileSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import onnxProto from "onnx-proto"
import * as ort from "onnxruntime-node"
import { binding, initOrt } from "onnxruntime-node/dist/binding.js"

const { onnx } = onnxProto
initOrt()
const [, , dir, mode] = process.argv
if (!dir || !["folded", "kept"].includes(mode)) throw new Error("usage: fp16-resident.mjs MODEL_DIR folded|kept")
const spec = JSON.parse(readFileSync(`${dir}/model.json`, "utf8"))
const file = `${dir}/segment_0.onnx`
let path = file
const weightFeeds = {}
if (mode === "kept") {
  const m = onnx.ModelProto.decode(readFileSync(file))
  const keep = []
  for (const t of m.graph.initializer) {
    if (t.dataType === onnx.TensorProto.DataType.FLOAT16) {
      const raw = new Uint8Array(t.rawData)
      weightFeeds[t.name] = new ort.Tensor(
        "float16",
        new Uint16Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength)),
        t.dims.map(Number),
      )
      m.graph.input.push(
        onnx.ValueInfoProto.create({
          name: t.name,
          type: { tensorType: { elemType: t.dataType, shape: { dim: t.dims.map((d) => ({ dimValue: Number(d) })) } } },
        }),
      )
    } else keep.push(t)
  }
  m.graph.initializer = keep
  path = join(tmpdir(), "offramp-fp16-inputs.onnx")
  writeFileSync(path, onnx.ModelProto.encode(m).finish())
}
globalThis.gc?.()
const rss0 = process.memoryUsage.rss()
const s = new binding.InferenceSession()
s.loadModel(path, {
  intraOpNumThreads: 1,
  interOpNumThreads: 1,
  executionMode: "sequential",
  graphOptimizationLevel: "all",
})
globalThis.gc?.()
const rss1 = process.memoryUsage.rss()
const { hidden: D, kvHeads: kvH, headDim: hd, layers } = spec.dims
const bs = 16,
  nb = 16,
  R = 1,
  cached = 100,
  MB = Math.ceil(cached / bs)
const pool = new ort.Tensor("float32", new Float32Array(kvH * nb * bs * hd), [kvH, nb, bs, hd])
const feeds = {
  ...weightFeeds,
  hidden: new ort.Tensor("float32", new Float32Array(R * D).fill(0.1), [R, 1, D]),
  positions: new ort.Tensor("int64", BigInt64Array.from([BigInt(cached)]), [R, 1]),
  block_table: new ort.Tensor(
    "int32",
    Int32Array.from({ length: MB }, (_, i) => i),
    [R, MB],
  ),
  attn_mask: new ort.Tensor("float32", new Float32Array(MB * bs + 1), [R, 1, MB * bs + 1]),
}
for (let l = 0; l < layers; l++) {
  feeds[`k_pool_${l}`] = pool
  feeds[`v_pool_${l}`] = pool
}
const outs = Object.fromEntries(s.outputMetadata.map((m) => [m.name, null]))
for (let i = 0; i < 3; i++) s.run(feeds, outs, {})
const n = Number(process.env.N ?? 20)
const t = performance.now()
for (let i = 0; i < n; i++) s.run(feeds, outs, {})
console.log(
  `${mode}: session RSS +${((rss1 - rss0) / 2 ** 20).toFixed(0)} MiB (weights fed as inputs are held by JS: ${(Object.values(weightFeeds).reduce((a, w) => a + w.data.byteLength, 0) / 2 ** 20).toFixed(0)} MiB), ${((performance.now() - t) / n).toFixed(2)} ms/call (all layers, batch 1)`,
)
