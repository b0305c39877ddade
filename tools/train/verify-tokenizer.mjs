// Verifies build/train/model/tokenizer.json with the project's tokenizer library
// (@huggingface/tokenizers): loads it, round-trips text, checks BOS, and compares
// ids with the Python encoder (ids file written by `tokenizer.py`-based check).
// Usage: node tools/train/verify-tokenizer.mjs [modelDir] [textFile] [pythonIdsJson]
import { readFileSync } from "node:fs"
import { Tokenizer } from "@huggingface/tokenizers"

const dir = process.argv[2] ?? "build/train/model"
const textFile = process.argv[3] ?? "build/train/heldout.txt"
const idsFile = process.argv[4]
const tj = JSON.parse(readFileSync(`${dir}/tokenizer.json`, "utf8"))
const tc = JSON.parse(readFileSync(`${dir}/tokenizer_config.json`, "utf8"))
const tok = new Tokenizer(tj, tc)
let fail = 0
const samples = [
  "Hello, world! It's 1790.",
  "In the beginning God created the heaven and the earth.\n\nAnd the earth was without form.",
  "  leading spaces,\ttabs and ünïcödé — “quotes” 😀",
  "",
]
for (const s of samples) {
  const enc = tok.encode(s)
  const ids = enc.ids
  const dec = tok.decode(ids, { skip_special_tokens: true })
  const ok = ids[0] === 0 && dec === s
  if (!ok) fail++
  console.log(
    ok ? "ok  " : "FAIL",
    JSON.stringify(s),
    ids.length,
    "ids",
    JSON.stringify(ids.slice(0, 12)),
    JSON.stringify(enc.tokens.slice(0, 8)),
  )
}
const text = readFileSync(textFile, "utf8")
const doc = text.split("\n\n").slice(0, 4).join("\n\n")
const ids = tok.encode(doc).ids
const back = tok.decode(ids, { skip_special_tokens: true })
console.log(back === doc ? "ok  " : "FAIL", `round trip of ${doc.length} chars of ${textFile}: ${ids.length} ids`)
if (back !== doc) fail++
if (idsFile) {
  const py = JSON.parse(readFileSync(idsFile, "utf8"))
  const same = py.length === ids.length && py.every((v, i) => v === ids[i])
  console.log(same ? "ok  " : "FAIL", `ids identical to Python encoder (${py.length} vs ${ids.length})`)
  if (!same) fail++
}
console.log(`vocab: bos=${tok.token_to_id("<|bos|>")} eos=${tok.token_to_id("<|eos|>")}`)
process.exit(fail ? 1 : 0)
