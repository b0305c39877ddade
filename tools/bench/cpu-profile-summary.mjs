// Self time of a V8 CPU profile (decode-profile.ts) by part of the stack: onnxruntime's native calls, the Effect runtime,
// the engine, the runner's JavaScript, garbage collection, detokenization. Usage: node cpu-profile-summary.mjs FILE.cpuprofile
import { readFileSync } from "node:fs"

const p = JSON.parse(readFileSync(process.argv[2], "utf8"))
const byId = new Map(p.nodes.map((n) => [n.id, n]))
const self = new Map()
const dt = p.timeDeltas
for (let i = 0; i < p.samples.length; i++) self.set(p.samples[i], (self.get(p.samples[i]) ?? 0) + (dt[i] ?? 0))
const cat = (n) => {
  const f = n.callFrame.functionName,
    u = n.callFrame.url
  if (f === "dispatch" || f === "(idle)" || f === "(program)") return "profiler/idle"
  if ((u === "" && f === "(anon)") || (u === "" && f === "")) return "onnxruntime (native call)"
  if (u.includes("NativeSession")) return "onnxruntime (native call)"
  if (f === "(garbage collector)") return "garbage collection"
  if (u.includes("onnxruntime-common")) return "onnxruntime-common Tensor"
  if (u.includes("/effect/")) return "Effect runtime (fibers, streams)"
  if (u.includes("tokenizers") || u.includes("HfTokenizer")) return "detokenization"
  if (u.includes("OnnxModelRunner") || u.includes("EmbeddingTable")) return "runner (feeds, K/V writes, embedding)"
  if (u.includes("RowBatch")) return "row batch layout"
  if (u.includes("/core/src/") || u.includes("/core/dist/")) return "engine (scheduler, forward pass, emission)"
  return "other"
}
const by = new Map()
let total = 0
for (const [id, t] of self) {
  const c = cat(byId.get(id))
  if (c === "profiler/idle") continue
  by.set(c, (by.get(c) ?? 0) + t)
  total += t
}
console.log(process.argv[2].split("/").pop(), "total", (total / 1000).toFixed(0), "ms")
for (const [c, t] of [...by].sort((a, b) => b[1] - a[1]))
  console.log(`  ${((100 * t) / total).toFixed(1).padStart(5)}%  ${c}`)
