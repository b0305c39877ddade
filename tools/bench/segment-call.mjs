// One segment graph called directly through onnxruntime-node's native session (as the runner calls it), for model
// directories side by side: µs per call at batch 1 or 16 with a cache of `cached` positions, 7 interleaved rounds.
// Reads model format 1 (pools [blocks, bs, kvHeads, headDim], int64 block table, k_new/v_new per layer) and 2
// (head-major pools, int32 block table, one kv_new), so a model from before the format change can be compared.
//   node tools/bench/segment-call.mjs ROWS CACHED SEGMENT_INDEX MODEL_DIR [MODEL_DIR...]
import { readFileSync } from "node:fs"
import { join } from "node:path"
import * as ort from "onnxruntime-node"
import { binding, initOrt } from "onnxruntime-node/dist/binding.js"

const [rowsArg, cachedArg, segmentArg, ...dirs] = process.argv.slice(2)
if (dirs.length === 0) throw new Error("usage: segment-call.mjs ROWS CACHED SEGMENT_INDEX MODEL_DIR [MODEL_DIR...]")
const R = Number(rowsArg)
const cached = Number(cachedArg)
initOrt()
const blockSize = 16
const numBlocks = 256
const MB = Math.ceil(cached / blockSize)
const keys = MB * blockSize + 1

const variants = dirs.map((dir) => {
  const spec = JSON.parse(readFileSync(join(dir, "model.json"), "utf8"))
  const { hidden, kvHeads, headDim } = spec.dims
  const segment = spec.segments[Number(segmentArg)]
  const session = new binding.InferenceSession()
  session.loadModel(join(dir, segment.file), {
    intraOpNumThreads: 1,
    interOpNumThreads: 1,
    executionMode: "sequential",
    graphOptimizationLevel: "all",
  })
  const v2 = spec.formatVersion >= 2
  const floats = numBlocks * blockSize * kvHeads * headDim
  const pool = new ort.Tensor(
    "float32",
    new Float32Array(floats).fill(0.01),
    v2 ? [kvHeads, numBlocks, blockSize, headDim] : [numBlocks, blockSize, kvHeads, headDim],
  )
  const table = Array.from({ length: R * MB }, (_, i) => i % numBlocks)
  const feeds = {
    hidden: new ort.Tensor("float32", new Float32Array(R * hidden).fill(0.1), [R, 1, hidden]),
    positions: new ort.Tensor("int64", new BigInt64Array(R).fill(BigInt(cached)), [R, 1]),
    block_table: v2
      ? new ort.Tensor("int32", Int32Array.from(table), [R, MB])
      : new ort.Tensor("int64", BigInt64Array.from(table, BigInt), [R, MB]),
    attn_mask: new ort.Tensor("float32", new Float32Array(R * keys), [R, 1, keys]),
  }
  for (let l = segment.firstLayer; l < segment.endLayer; l++) {
    feeds[`k_pool_${l}`] = pool
    feeds[`v_pool_${l}`] = pool
  }
  const fetches = Object.fromEntries(session.outputMetadata.map((m) => [m.name, null]))
  return { dir, session, feeds, fetches, runs: [] }
})

const iterations = Math.max(50, Math.round(20000 / R))
for (let round = 0; round < 7; round++) {
  for (const v of variants) {
    for (let i = 0; i < 20; i++) v.session.run(v.feeds, v.fetches, {})
    const started = performance.now()
    for (let i = 0; i < iterations; i++) v.session.run(v.feeds, v.fetches, {})
    v.runs.push(((performance.now() - started) * 1000) / iterations)
  }
}
for (const v of variants) {
  const median = [...v.runs].sort((a, b) => a - b)[3]
  console.log(
    `rows ${R}, cached ${cached}: ${v.dir}: median ${median.toFixed(1)} µs/call (runs ${v.runs.map((x) => x.toFixed(0)).join(", ")})`,
  )
}
