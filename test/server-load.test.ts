/**
 * The server under concurrent clients: 32 simultaneous streams all end with [DONE] (greedy ones as when alone),
 * and 100 clients that disconnect mid-stream leave no KV blocks in use.
 */
import { Engine } from "@offramp/core/Engine"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { Effect } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { BENCH_PROMPTS } from "../apps/cli/src/commands/bench.js"
import {
  abandonedStream,
  json,
  metric,
  postJson,
  readSse,
  startServer,
  type TestServer,
  waitIdle,
} from "../packages/server/test/support.js"
import { convertStories, tempDir } from "./support/stories.js"

const MODEL = "stories260K"
let server: TestServer

beforeAll(async () => {
  const modelDir = tempDir("server-load")
  await convertStories(modelDir)
  server = await startServer(onnxEngineLayer(modelDir))
})
afterAll(() => server?.close())

const engineStats = () => server.runtime.runPromise(Effect.flatMap(Engine, (e) => e.stats))

describe("concurrent clients", () => {
  it("32 simultaneous streaming clients all end with [DONE]; greedy ones equal their single-client output", async () => {
    const requests = Array.from({ length: 32 }, (_, i) => {
      const greedy = i % 2 === 0
      return {
        chat: i % 4 === 1,
        greedy,
        body: {
          model: MODEL,
          max_tokens: 20 + ((i * 7) % 40),
          temperature: greedy ? 0 : 0.9,
          ...(greedy ? {} : { seed: i }),
          ...(i % 4 === 1
            ? { messages: [{ role: "user", content: BENCH_PROMPTS[i % 8]! }] }
            : { prompt: `${BENCH_PROMPTS[i % 8]!}${i >= 16 ? ". Then" : ""}` }),
        },
      }
    })
    const path = (chat: boolean) => `${server.url}/v1/${chat ? "chat/completions" : "completions"}`
    const textOf = (
      chat: boolean,
      chunks: ReadonlyArray<{ choices: Array<{ text?: string; delta?: { content?: string } }> }>,
    ) => chunks.map((c) => (chat ? (c.choices[0]?.delta?.content ?? "") : (c.choices[0]?.text ?? ""))).join("")

    // Alone first, one at a time.
    const alone: Array<string> = []
    for (const r of requests.filter((r) => r.greedy)) {
      const body = await json(await postJson(path(r.chat), r.body))
      alone.push(r.chat ? body.choices[0].message.content : body.choices[0].text)
    }

    const together = await Promise.all(
      requests.map(async (r) => {
        const response = await postJson(path(r.chat), { ...r.body, stream: true })
        expect(response.status).toBe(200)
        expect(response.headers.get("content-type")).toMatch(/^text\/event-stream/)
        return readSse(response)
      }),
    )
    for (const result of together) {
      expect(result.done).toBe(true)
      expect(result.chunks.at(-1).choices[0].finish_reason).toMatch(/^(stop|length)$/)
    }
    const greedyTexts = requests.flatMap((r, i) => (r.greedy ? [textOf(r.chat, together[i]!.chunks)] : []))
    expect(greedyTexts).toEqual(alone)
  })

  it("100 clients that disconnect mid-stream leave zero KV blocks in use once idle", async () => {
    const before = await engineStats()
    // A fifth give up while queued, before any token; the others after a few chunks.
    const clients = Array.from({ length: 100 }, (_, i) =>
      abandonedStream(
        server.url,
        { model: MODEL, prompt: BENCH_PROMPTS[i % 8]!, max_tokens: 400, temperature: 0.8 },
        i % 5 === 0 ? { abortAfterMs: 1 } : {},
      ),
    )
    const outcomes = await Promise.all(clients)
    expect(outcomes.filter((o) => o === "aborted").length).toBeGreaterThan(50)
    const m = await waitIdle(server, MODEL)
    expect(metric(m, MODEL, "offramp_kv_blocks_used")).toBe(0)
    expect(metric(m, MODEL, "offramp_sequences_queued")).toBe(0)
    const after = await engineStats()
    // Cancelled, not run to the end: far fewer than 100 × 400 tokens were decoded.
    expect(after.decodeTokens - before.decodeTokens).toBeLessThan(100 * 400 * 0.25)
    // The server still serves.
    const ok = await postJson(`${server.url}/v1/completions`, { model: MODEL, prompt: "Once", max_tokens: 4 })
    expect(ok.status).toBe(200)
  })

  it("a hog request (4 prompts × n = 16) does not take the engine: another client's request ends while the hog runs", async () => {
    // More than a quarter of the queue (64 of 256 sequences) in one request is refused outright.
    const tooBig = await postJson(`${server.url}/v1/completions`, {
      model: MODEL,
      prompt: Array.from({ length: 16 }, (_, i) => BENCH_PROMPTS[i % 8]!),
      n: 16,
      max_tokens: 60,
    })
    expect(tooBig.status).toBe(400)
    expect((await json(tooBig)).error.code).toBe("too_many_sequences")
    const hog = postJson(`${server.url}/v1/completions`, {
      model: MODEL,
      prompt: Array.from({ length: 4 }, (_, i) => BENCH_PROMPTS[i]!),
      n: 16,
      max_tokens: 60,
      temperature: 0.8,
    })
    let hogDone = false
    const hogEnded = hog.then(async (response) => {
      hogDone = true
      return response
    })
    // The other client asks once the hog's sequences run.
    for (let i = 0; i < 500 && (await engineStats()).running === 0; i++) await new Promise((r) => setTimeout(r, 5))
    const other = await postJson(`${server.url}/v1/completions`, { model: MODEL, prompt: "Once", max_tokens: 8 })
    expect(other.status).toBe(200)
    expect((await json(other)).choices[0].text.length).toBeGreaterThan(0)
    // The hog's 64 sequences run at most 16 at a time (a quarter of the engine's 64 slots): the other request did
    // not wait for them.
    expect(hogDone).toBe(false)
    const stats = await engineStats()
    expect(stats.running).toBeLessThanOrEqual(16)
    expect(stats.waiting).toBeGreaterThan(0)
    const response = await hogEnded
    expect(response.status).toBe(200)
    expect((await json(response)).choices).toHaveLength(64)
  })
})
