// Greedy token identity across the engines on the same weights.
//   node verify.mjs --offramp-model ../../models/default[,models/default/offramp-fp32] --gguf models/default/f32.gguf[,more.gguf]
//                   --tjs models/default/transformersjs [--max-tokens 32] [--offramp-root ../..] [--cli]
// Prompt ids come from transformers.js's tokenizer (tokenizer.json with its BOS template) and are checked against
// llama.cpp's tokenizer of the GGUF; every engine then continues the same ids. With --cli, Offramp's CLI also
// generates from the prompt text (its own tokenizer), as `offramp generate ... --temperature 0 --threshold 2 --json`.
import { execFileSync } from "node:child_process"
import { readFileSync } from "node:fs"
import { join, resolve } from "node:path"
import { argv } from "./lib/checkpoint.mjs"
import { llamacpp, offramp, transformersjs } from "./lib/engines.mjs"

const args = argv(process.argv.slice(2))
const maxTokens = Number(args["max-tokens"] ?? 32)
const root = resolve(args["offramp-root"] ?? process.env.OFFRAMP_ROOT ?? "../..")
const prompts = (
  args.prompts ??
  "Once upon a time|One day, a little girl named Lily|Tom and his dog went to the park|The sun was shining and the birds were singing|Sam wanted to bake a cake for his mom"
).split("|")
const ggufs = String(args.gguf).split(",")

const tjs = await transformersjs({ model: args.tjs })
// The first Offramp model is the reference; more (comma-separated) are compared with it like the peers.
const offrampModels = String(args["offramp-model"]).split(",")
const offs = []
for (const model of offrampModels) offs.push(await offramp({ model, root }))
const offName = (i) => (i === 0 ? "offramp" : `offramp:${offrampModels[i]}`)
const modelJson = JSON.parse(readFileSync(join(offrampModels[0], "model.json"), "utf8"))
const report = { maxTokens, bos: modelJson.tokens.bos, prompts: [] }
let allIdentical = true
for (const text of prompts) {
  const ids = Array.from(await tjs.tokenize(text), Number)
  const row = { text, promptIds: ids, tokens: {}, tokenizers: {}, firstMismatch: {} }
  for (const [i, off] of offs.entries()) row.tokens[offName(i)] = await off.generate(ids, maxTokens)
  row.tokens["transformers.js"] = await tjs.generate(ids, maxTokens)
  if (args.cli) {
    const out = execFileSync(
      "node",
      [
        join(root, "apps/cli/bin/offramp.js"),
        "generate",
        "--model",
        offrampModels[0],
        "--prompt",
        text,
        "--max-tokens",
        String(maxTokens),
        "--temperature",
        "0",
        "--threshold",
        "2",
        "--json",
      ],
      { encoding: "utf8" },
    )
    row.tokens["offramp-cli"] = out
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l))
      .filter((e) => "id" in e)
      .map((e) => e.id)
  }
  report.prompts.push(row)
}
for (const off of offs) await off.close()
await tjs.close()
for (const gguf of ggufs) {
  const lc = await llamacpp({ model: gguf })
  const name = `llama.cpp:${gguf.split("/").pop()}`
  for (const row of report.prompts) {
    row.tokenizers[name] = Array.from(lc.tokenize(row.text), Number)
    row.tokens[name] = Array.from(await lc.generate(row.promptIds, maxTokens), Number)
  }
  await lc.close()
}
// Lossy formats (F16, Q8_0, Q4_0 GGUFs; Offramp int8/int4 conversions, recognized by their paths) may diverge from
// the reference after some tokens; they do not count for `identical`.
const lossy = (engine) => /f16|q8_0|q4_0|int8|int4/.test(engine)
for (const row of report.prompts) {
  const ref = row.tokens.offramp
  for (const [engine, ids] of Object.entries(row.tokens)) {
    if (engine === "offramp") continue
    const n = Math.max(ids.length, ref.length)
    let i = 0
    while (i < n && ids[i] === ref[i]) i++
    row.firstMismatch[engine] = i === n ? null : i
    if (i !== n && !lossy(engine)) allIdentical = false
  }
  // llama.cpp's tokenization of the text should give the same ids (node-llama-cpp's tokenize() adds no BOS: the
  // comparison ignores a leading BOS on either side).
  const bosless = (ids) => (ids[0] === report.bos ? ids.slice(1) : ids)
  row.tokenizerMatch = Object.fromEntries(
    Object.entries(row.tokenizers).map(([k, v]) => [
      k,
      JSON.stringify(bosless(v)) === JSON.stringify(bosless(row.promptIds)),
    ]),
  )
}
report.identical = allIdentical
// Per engine: the tokens that agree with the reference before the first difference, over all prompts.
report.agreement = Object.fromEntries(
  Object.keys(report.prompts[0].firstMismatch).map((engine) => {
    const agree = report.prompts.map((row) => row.firstMismatch[engine] ?? row.tokens.offramp.length)
    const total = report.prompts.reduce((n, row) => n + row.tokens.offramp.length, 0)
    return [
      engine,
      {
        identicalPrompts: agree.filter((a, i) => a === report.prompts[i].tokens.offramp.length).length,
        prefixTokens: agree,
        agreeing: agree.reduce((a, b) => a + b, 0),
        of: total,
      },
    ]
  }),
)
console.log(JSON.stringify(report, null, args.compact ? 0 : 1))
