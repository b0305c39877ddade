// Peer benchmark: Offramp, llama.cpp (node-llama-cpp) and transformers.js on the same weights, 1 thread each,
// greedy, full depth. Interleaved rounds (A, B, C, A, B, C, ...) per measurement; medians and every run, as JSON.
//   node run.mjs --offramp-model DIR[,DIR2] --gguf FILE[,FILE2] --tjs DIR [--rounds 5] [--max-tokens 128]
//                [--streams 1,16] [--prefill 256] [--offramp-root ../..] [--out results/x.json]
// Measurements (the definitions of `offramp bench`):
//   decode tok/s  = Σ(tokens − 1) over the streams ÷ seconds from the first token of any stream to the end of the last
//                   (the first token of each stream comes from prefill)
//   prefill tok/s = prompt tokens ÷ seconds from submission to the first token (max tokens 1)
// Every run uses prompts no earlier run used (Offramp caches prompt prefixes; llama.cpp gets fresh sequences).
import { mkdirSync, readFileSync, writeFileSync } from "node:fs"
import { dirname, resolve } from "node:path"
import { argv } from "./lib/checkpoint.mjs"
import { llamacpp, offramp, transformersjs } from "./lib/engines.mjs"

const args = argv(process.argv.slice(2))
const rounds = Number(args.rounds ?? 5)
const maxTokens = Number(args["max-tokens"] ?? 128)
const streamCounts = String(args.streams ?? "1,16")
  .split(",")
  .map(Number)
const root = resolve(args["offramp-root"] ?? process.env.OFFRAMP_ROOT ?? "../..")
const only = args.engines ? String(args.engines).split(",") : null
const log = (...m) => console.error(new Date().toISOString().slice(11, 19), ...m)

// Several Offramp model directories (the same weights in other formats or segmentations) are engines of their own.
const offrampModels = String(args["offramp-model"]).split(",")
const modelJson = JSON.parse(readFileSync(resolve(offrampModels[0], "model.json"), "utf8"))
const context = modelJson.dims.contextLength
const prefillLen = Math.min(Number(args.prefill ?? 256), context - 1)
const promptLen = 12

const engines = []
const want = (n) => !only || only.some((o) => n.startsWith(o))
for (const model of offrampModels) {
  if (!want("offramp")) break
  const e = await offramp({ model, root })
  if (offrampModels.length > 1) e.name = `offramp ${model.replace(/\/+$/, "").split("/").pop()}`
  engines.push(e)
}
for (const gguf of args.gguf ? String(args.gguf).split(",") : []) {
  const e = await llamacpp({ model: gguf, contextSize: Math.min(context, 512) })
  e.name = `llama.cpp ${gguf
    .split("/")
    .pop()
    .replace(/\.gguf$/, "")}`
  if (want(e.name)) engines.push(e)
  else await e.close()
}
const tjs = await transformersjs({ model: args.tjs })
if (want("transformers.js")) engines.push(tjs)

// Token-id prompts: distinct texts, fixed length (transformers.js batches need one length), BOS as the tokenizer adds.
const STARTS = [
  "Once upon a time",
  "One day, a little girl named Lily",
  "Tom and his dog went to the park",
  "The sun was shining and the birds were singing",
  "There was a big red ball in the garden",
  "Sam wanted to bake a cake for his mom",
  "A small cat lived in a tall tree",
  "Anna found a shiny key under her bed",
]
const FILL = " and they played together all day long until the stars came out over the quiet little town by the sea"
const LEADS = [
  "",
  "Later,",
  "Then",
  "So",
  "But",
  "After lunch,",
  "In the morning,",
  "At night,",
  "Soon",
  "Yesterday,",
  "Every day,",
  "Once more,",
  "Long ago,",
  "Far away,",
  "In spring,",
  "At school,",
]
let used = 0
const nextPrompt = async (len) => {
  const k = used++
  const text = `${LEADS[Math.floor(k / STARTS.length) % LEADS.length]} ${STARTS[k % STARTS.length]}${FILL}`.trim()
  let ids = Array.from(await tjs.tokenize(text), Number)
  while (ids.length < len) ids = ids.concat(Array.from(await tjs.tokenize(` ${text}`), Number).slice(1))
  ids = ids.slice(0, len)
  // Past the LEADS × STARTS combinations, make the prompt unique by its last token.
  if (k >= LEADS.length * STARTS.length) ids[len - 1] = 3 + (k % 1000)
  return ids
}

const decodeRun = async (engine, prompts) => {
  const r = await engine.streams(prompts, maxTokens)
  const tokens = r.perStream.reduce((n, s) => n + s.length, 0)
  const decoded = r.perStream.reduce((n, s) => n + Math.max(0, s.length - 1), 0)
  const first = Math.min(...r.firstTokenMs)
  return {
    decodeTokensPerSecond: decoded / ((r.endMs - first) / 1000),
    tokens,
    wallMs: r.endMs - r.startMs,
    timeToFirstTokenMs: first - r.startMs,
  }
}
const prefillRun = async (engine, ids) => {
  const r = await engine.streams([ids], 1)
  const ms = r.firstTokenMs[0] - r.startMs
  return { prefillTokensPerSecond: ids.length / (ms / 1000), ms, tokens: ids.length }
}
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

// Warm-up: every shape the measurements use once (onnxruntime plans memory per shape), with short generations.
log("warm-up")
for (const e of engines) {
  for (const streams of streamCounts) {
    const prompts = []
    for (let i = 0; i < streams; i++) prompts.push(await nextPrompt(promptLen))
    await e.streams(prompts, Math.min(16, maxTokens))
  }
  await prefillRun(e, await nextPrompt(prefillLen))
}

const results = []
const measure = async (kind, settings, once) => {
  const runs = Object.fromEntries(engines.map((e) => [e.name, []]))
  for (let r = 0; r < rounds; r++)
    for (const e of engines) {
      const run = await once(e)
      runs[e.name].push(run)
      log(kind, JSON.stringify(settings), e.name, `round ${r + 1}/${rounds}`, JSON.stringify(run))
    }
  const key = kind === "prefill" ? "prefillTokensPerSecond" : "decodeTokensPerSecond"
  results.push({
    kind,
    ...settings,
    engines: Object.fromEntries(
      Object.entries(runs).map(([name, rs]) => [
        name,
        { median: median(rs.map((x) => x[key])), runs: rs.map((x) => Math.round(x[key] * 10) / 10), detail: rs },
      ]),
    ),
  })
}
for (const streams of streamCounts) {
  await measure("decode", { streams, maxTokens, promptTokens: promptLen }, async (e) => {
    const prompts = []
    for (let i = 0; i < streams; i++) prompts.push(await nextPrompt(promptLen))
    return decodeRun(e, prompts)
  })
}
await measure("prefill", { promptTokens: prefillLen }, async (e) => prefillRun(e, await nextPrompt(prefillLen)))

const versions = (p) => JSON.parse(readFileSync(new URL(`./node_modules/${p}/package.json`, import.meta.url))).version
const doc = {
  date: new Date().toISOString(),
  command: `node ${process.argv.slice(1).join(" ")}`,
  node: process.version,
  versions: {
    "node-llama-cpp": versions("node-llama-cpp"),
    "@huggingface/transformers": versions("@huggingface/transformers"),
    "onnxruntime-node (transformers.js)": versions("onnxruntime-node"),
  },
  model: { offramp: args["offramp-model"], gguf: args.gguf, transformersjs: args.tjs, dims: modelJson.dims },
  threads: 1,
  rounds,
  results,
}
for (const e of engines) await e.close()
const text = JSON.stringify(doc, null, 1)
if (args.out) {
  mkdirSync(dirname(resolve(args.out)), { recursive: true })
  writeFileSync(args.out, text)
}
// A compact table on stderr.
for (const r of results) {
  const what = r.kind === "decode" ? `decode, ${r.streams} stream(s)` : `prefill ${r.promptTokens} tokens`
  for (const [name, x] of Object.entries(r.engines))
    log(`${what.padEnd(22)} ${name.padEnd(22)} median ${x.median.toFixed(1)} tok/s  runs ${x.runs.join(", ")}`)
}
console.log(text)
