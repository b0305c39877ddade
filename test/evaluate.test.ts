/**
 * `offramp evaluate` against the plain-TypeScript reference: each exit's teacher-forced perplexity and top-1
 * agreement with the final head on a held-out text (stories260K, whose reference head serves every exit).
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import * as HfTokenizer from "@offramp/tokenizer/HfTokenizer"
import { Effect } from "effect"
import { beforeAll, describe, expect, it } from "vitest"
import { runCli } from "./support/cli.js"
import { argmax, loadLlama2cReference } from "./support/reference-llama.js"
import { convertStories, REPO_ROOT, STORIES_CHECKPOINT, tempDir } from "./support/stories.js"

const HELDOUT = join(REPO_ROOT, "apps/cli/src/bench/heldout.txt")
let modelDir = ""
beforeAll(async () => {
  modelDir = tempDir("evaluate")
  await convertStories(modelDir)
})

describe("offramp evaluate", () => {
  it("reports each exit's perplexity and agreement as the reference computes them", async () => {
    const result = await runCli(["evaluate", "--model", modelDir, "--text", HELDOUT, "--max-tokens", "300", "--json"])
    expect(result.code).toBe(0)
    const report = JSON.parse(result.stdout)
    expect(report.tokens).toBe(300)

    const tokenizer = await Effect.runPromise(HfTokenizer.fromFile(join(modelDir, "tokenizer.json")))
    const ids = (
      await Effect.runPromise(tokenizer.encode(readFileSync(HELDOUT, "utf8"), { addSpecialTokens: false }))
    ).slice(0, 300)
    // The same windows as the command: BOS, then up to 255 text tokens.
    const reference = loadLlama2cReference(STORIES_CHECKPOINT)
    const layers = 5
    const logprobs = Array.from({ length: layers }, () => [] as Array<number>)
    const agree = Array.from({ length: layers }, () => 0)
    let positions = 0
    for (let start = 0; start < ids.length; start += 255) {
      const window = [1, ...ids.slice(start, start + 255)]
      const out = reference.run(window)
      out.forEach((position, p) => {
        positions++
        const final = argmax(position.logits)
        for (let e = 0; e < layers; e++) {
          const logits = position.exitLogits[e]!
          if (argmax(logits) === final) agree[e]!++
          if (p + 1 < window.length) {
            const max = Math.max(...logits)
            const logSum = Math.log(logits.reduce((sum, v) => sum + Math.exp(v - max), 0))
            logprobs[e]!.push(logits[window[p + 1]!]! - max - logSum)
          }
        }
      })
    }
    report.exits.forEach((exit: { layer: number; perplexity: number; agreement: number }, e: number) => {
      expect(exit.layer).toBe(e + 1)
      const perplexity = Math.exp(-logprobs[e]!.reduce((a, b) => a + b, 0) / logprobs[e]!.length)
      expect(Math.abs(exit.perplexity / perplexity - 1)).toBeLessThan(1e-4)
      expect(exit.agreement).toBeCloseTo(agree[e]! / positions, 10)
    })
  })
})
