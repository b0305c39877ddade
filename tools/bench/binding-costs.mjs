// What onnxruntime-node's native binding costs per call, on the default model's head graph (BENCHMARKS.md, "Fixed
// cost per token"): a typed-array allocation, an ort.Tensor around an existing array, a call with 4 outputs against
// one, and what a pre-allocated output gives back.
//   node tools/bench/binding-costs.mjs [MODEL_DIR]   (default: models/default)
import { readFileSync } from "node:fs"
import { join } from "node:path"
import * as ort from "onnxruntime-node"
import { binding, initOrt } from "onnxruntime-node/dist/binding.js"

const dir = process.argv[2] ?? "models/default"
initOrt()
const session = new binding.InferenceSession()
session.loadModel(join(dir, "head.onnx"), { intraOpNumThreads: 1, graphOptimizationLevel: "all" })
const D = JSON.parse(readFileSync(join(dir, "model.json"), "utf8")).dims.hidden
const data = new Float32Array(D).fill(0.1)
const hidden = new ort.Tensor("float32", data, [1, D])
const time = (n, f) => {
  const started = performance.now()
  for (let i = 0; i < n; i++) f()
  return ((performance.now() - started) * 1000) / n
}
const four = { max_prob: null, margin: null, entropy: null, top_token: null }
const one = { top_token: null }
for (let round = 0; round < 4; round++) {
  const alloc = time(200000, () => new Float32Array(D))
  const wrap = time(200000, () => new ort.Tensor("float32", data, [1, D]))
  const withFour = time(20000, () => session.run({ hidden }, four, {}))
  const withOne = time(20000, () => session.run({ hidden }, one, {}))
  console.log(
    `new Float32Array(${D}) ${alloc.toFixed(2)} µs · ort.Tensor around it ${wrap.toFixed(3)} µs · head call, 4 outputs ${withFour.toFixed(1)} µs, 1 output ${withOne.toFixed(1)} µs`,
  )
}
const preallocated = new ort.Tensor("float32", new Float32Array(1), [1])
const out = session.run({ hidden }, { max_prob: preallocated }, {})
console.log(
  `pre-allocated output: filled ${preallocated.data[0] !== 0}, returned the same tensor ${out.max_prob === preallocated}, the same buffer ${out.max_prob.data.buffer === preallocated.data.buffer}`,
)
