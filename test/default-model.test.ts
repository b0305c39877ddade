/**
 * The embedded default model (models/default): it loads and writes English-looking text, its files match the
 * sums and size budget of models/README.md, the README's quality figures come back from the project's own
 * `offramp evaluate`, and its tokenizer round-trips any text.
 */
import { createHash } from "node:crypto"
import { readdirSync, readFileSync, statSync } from "node:fs"
import { join } from "node:path"
import { Engine } from "@offramp/core/Engine"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import * as HfTokenizer from "@offramp/tokenizer/HfTokenizer"
import { Chunk, Effect, Stream } from "effect"
import fc from "fast-check"
import { describe, expect, it } from "vitest"
import { runCli } from "./support/cli.js"
import { REPO_ROOT } from "./support/stories.js"

const MODEL = join(REPO_ROOT, "models/default")
const SAMPLE = join(REPO_ROOT, "models/heldout-sample.txt")
const README = readFileSync(join(REPO_ROOT, "models/README.md"), "utf8")

/** Rows `| layer | perplexity | agreement % |` of the README table that follows `heading`. */
const readmeTable = (heading: string) => {
  const section = README.slice(README.indexOf(heading))
  const rows = section.split("\n").filter((line) => /^\|\s*\d+\s*\|/.test(line))
  const table = []
  for (const row of rows) {
    const [layer, perplexity, agreement] = row
      .split("|")
      .slice(1, 4)
      .map((c) => Number.parseFloat(c))
    table.push({ layer: layer!, perplexity: perplexity!, agreement: agreement! / 100 })
    if (table.length > 0 && table.at(-1)!.agreement === 1) break
  }
  return table
}

describe("the default model", () => {
  it("greedy and sampled generations are English-looking text", async () => {
    const program = Effect.gen(function* () {
      const engine = yield* Engine
      const run = (prompt: string, temperature: number) =>
        Stream.runCollect(
          engine.generate({ prompt, maxTokens: 80, sampling: { temperature, topK: 40, topP: 0.95, seed: 5 } }),
        ).pipe(
          Effect.map((events) =>
            Chunk.toArray(events)
              .map((e) => e.text)
              .join(""),
          ),
        )
      return [yield* run("The people of the United States", 0), yield* run("And the king said", 0.8)]
    })
    const texts = await Effect.runPromise(program.pipe(Effect.provide(onnxEngineLayer(MODEL))))
    for (const text of texts) {
      const words = text.split(/\s+/).filter((w) => w !== "")
      expect(words.length).toBeGreaterThan(30)
      const wordLike = words.filter((w) => /^[A-Za-z][A-Za-z']*[.,;:!?]?$/.test(w))
      expect(wordLike.length / words.length).toBeGreaterThan(0.8)
      const common = ["the", "and", "of", "to", "in", "that", "is", "be"].filter((w) => words.includes(w))
      expect(common.length).toBeGreaterThanOrEqual(3)
    }
  })

  it("its files fit the 16 MB budget and match the sha256 sums in models/README.md", () => {
    const files = readdirSync(MODEL)
    const total = files.reduce((n, f) => n + statSync(join(MODEL, f)).size, 0)
    expect(total).toBeLessThanOrEqual(16 * 1024 * 1024)
    for (const file of files) {
      const sum = createHash("sha256")
        .update(readFileSync(join(MODEL, file)))
        .digest("hex")
      expect(README).toContain(`${sum}  ${file}`)
    }
  })

  it("`offramp evaluate` reproduces the README's quick-check figures", async () => {
    const result = await runCli(["evaluate", "--model", MODEL, "--text", SAMPLE, "--max-tokens", "2000", "--json"])
    expect(result.code).toBe(0)
    const report = JSON.parse(result.stdout)
    const expected = readmeTable("Quick check")
    expect(report.exits.map((e: { layer: number }) => e.layer)).toEqual(expected.map((e) => e.layer))
    report.exits.forEach((exit: { perplexity: number; agreement: number }, i: number) => {
      expect(Math.abs(exit.perplexity / expected[i]!.perplexity - 1)).toBeLessThan(1e-3)
      expect(Math.abs(exit.agreement - expected[i]!.agreement)).toBeLessThan(1e-3)
    })
  })

  it("its tokenizer round-trips any text exactly", async () => {
    const tokenizer = await Effect.runPromise(HfTokenizer.fromFile(join(MODEL, "tokenizer.json")))
    const roundTrip = (text: string) =>
      Effect.runSync(
        Effect.flatMap(tokenizer.encode(text, { addSpecialTokens: false }), (ids) => tokenizer.decode(ids)),
      )
    for (const text of [
      "Hello, world!",
      "naïve café 🙂👍🏽",
      "日本語のテキスト",
      "\u0000\uFFFD Ã© \t\r\n  x",
      "a\u0301",
    ]) {
      expect(roundTrip(text)).toBe(text)
    }
    fc.assert(
      fc.property(fc.string({ unit: "binary", maxLength: 60 }), (text) => roundTrip(text) === text),
      { numRuns: 300 },
    )
  })
})
