/**
 * The server's main thread under huge prompts, on the default model: a prompt that cannot fit the context is refused
 * before it is tokenized, so it does not stall other clients' streams (before, a 1 MiB prompt was tokenized first and
 * every stream stood still for 1.5 s). Measured as a property of the event loop: the largest gap between another
 * client's chunks against its usual gap, not as a timing benchmark.
 */
import { join } from "node:path"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { BENCH_PROMPTS } from "../apps/cli/src/commands/bench.js"
import { json, postJson, startServer, type TestServer } from "../packages/server/test/support.js"
import { REPO_ROOT } from "./support/stories.js"

const MODEL_DIR = join(REPO_ROOT, "models/default")
let server: TestServer
let model = ""

beforeAll(async () => {
  server = await startServer(onnxEngineLayer(MODEL_DIR))
  model = (await server.client.models.list()).data[0]!.id
})
afterAll(() => server?.close())

const STORY = "Once upon a time there was a cat. "

describe("huge prompts and the main thread", () => {
  it("a 1 MiB prompt, or 64 over-long ones, does not hold up another client's stream", async () => {
    const arrivals: Array<number> = []
    let started: () => void = () => {}
    const streaming = new Promise<void>((resolve) => {
      started = resolve
    })
    const reader = (async () => {
      const stream = await server.client.completions.create({
        model,
        prompt: BENCH_PROMPTS[0]!,
        max_tokens: 200,
        temperature: 0.8,
        seed: 1,
        stream: true,
      })
      for await (const _ of stream) {
        arrivals.push(performance.now())
        if (arrivals.length === 20) started()
      }
    })()
    await streaming

    const hostileStart = performance.now()
    // Just under the 1 MiB body limit, so it is the context check, not the 413, that refuses it.
    const one = await postJson(`${server.url}/v1/completions`, {
      model,
      prompt: STORY.repeat(Math.floor(1_000_000 / STORY.length)),
      max_tokens: 8,
    })
    // The most prompts a request may have, each too long for the context but short enough to pass the
    // bytes-per-token bound: the first one refuses the request.
    const many = await postJson(`${server.url}/v1/completions`, {
      model,
      prompt: Array.from({ length: 64 }, () => STORY.repeat(120)),
      max_tokens: 8,
    })
    const hostileEnd = performance.now()
    const errors = [(await json(one)).error, (await json(many)).error]
    expect([one.status, many.status]).toEqual([400, 400])
    expect(errors.map((e) => e.code)).toEqual(["context_length_exceeded", "context_length_exceeded"])
    expect(errors[0].message).toMatch(/However, your prompt is at least \d+ tokens/)
    await reader

    // The hostile requests' whole time lies between the stream's chunks.
    expect(arrivals[0]!).toBeLessThan(hostileStart)
    expect(arrivals.at(-1)!).toBeGreaterThan(hostileEnd)
    // Chunks read from one network read arrive together; the usual gap is the median between such arrivals.
    const gaps = arrivals.slice(1).map((t, i) => t - arrivals[i]!)
    const spaced = gaps.filter((g) => g > 0.5).sort((a, b) => a - b)
    const median = spaced[Math.floor(spaced.length / 2)]!
    const worst = Math.max(...gaps)
    console.log(`inter-chunk gap: median ${median.toFixed(1)} ms, max ${worst.toFixed(1)} ms`)
    expect(worst).toBeLessThan(median * 20 + 100)
  })
})
