/**
 * The server tokenizes each prompt once, for its context check and usage, and hands the engine those token ids: on
 * the fake engine (packages/core/test/support/FakeModel.ts) with a tokenizer that records what it encodes.
 */
import type { TokenizerShape } from "@offramp/core/Tokenizer"
import { Effect } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { fakeEngineLayer, fakeTokenizer } from "../../core/test/support/FakeModel.js"
import { startServer, type TestServer } from "./support.js"

const encoded: Array<string> = []
const recording: TokenizerShape = {
  ...fakeTokenizer,
  encode: (text, options) =>
    Effect.zipRight(
      Effect.sync(() => encoded.push(text)),
      fakeTokenizer.encode(text, options),
    ),
}

let server: TestServer
beforeAll(async () => {
  server = await startServer(fakeEngineLayer({ tokenizer: recording }))
})
afterAll(() => server?.close())

const times = (text: string) => encoded.filter((t) => t === text).length

describe("prompts as token ids", () => {
  it("a completion tokenizes each prompt once and equals the engine's own output for the text", async () => {
    const prompts = ["the cat sat", "we went to the park and"]
    const response = await server.client.completions.create({
      model: "fake",
      prompt: prompts,
      max_tokens: 12,
      temperature: 0,
    })
    for (const prompt of prompts) expect(times(prompt)).toBe(1)
    for (const [i, prompt] of prompts.entries())
      expect(response.choices[i]!.text).toBe(await server.engineText({ prompt, maxTokens: 12 }))
    // BOS and one token a character.
    const promptTokens = prompts.reduce((sum, p) => sum + 1 + p.length, 0)
    expect(response.usage).toEqual({
      prompt_tokens: promptTokens,
      completion_tokens: 24,
      total_tokens: promptTokens + 24,
    })
  })
})
