/**
 * The OpenAI-compatible server end to end on stories260K: a real server on a loopback port, driven by the official
 * `openai` client (and raw fetch where the wire format itself is checked).
 */
import { readdirSync, statSync } from "node:fs"
import { join } from "node:path"
import { Engine } from "@offramp/core/Engine"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { Effect } from "effect"
import OpenAI from "openai"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { BENCH_PROMPTS } from "../apps/cli/src/commands/bench.js"
import { json, metric, postJson, readSse, startServer, type TestServer } from "../packages/server/test/support.js"
import { convertStories, REFERENCE_CONTINUATION, tempDir } from "./support/stories.js"

let modelDir = ""
const MODEL = "stories260K"
let server: TestServer
let client: OpenAI

beforeAll(async () => {
  modelDir = tempDir("server")
  await convertStories(modelDir)
  server = await startServer(onnxEngineLayer(modelDir))
  client = server.client
})
afterAll(() => server?.close())

const greedy = { temperature: 0 } as const

describe("completions", () => {
  it("greedy completion through HTTP equals the engine's own output and llama2.c's", async () => {
    const response = await client.completions.create({
      model: MODEL,
      prompt: "Once upon a time",
      max_tokens: 60,
      ...greedy,
    })
    const engine = await server.engineText({
      prompt: "Once upon a time",
      maxTokens: 60,
      sampling: { temperature: 0, topK: 0, topP: 1 },
    })
    expect(response.choices[0]!.text).toBe(engine)
    expect(response.choices[0]!.text).toBe(REFERENCE_CONTINUATION)
    expect(response.choices[0]!.finish_reason).toBe("length")
    expect(response.object).toBe("text_completion")
    expect(response.model).toBe(MODEL)
    // BOS + 4 prompt tokens; 60 generated.
    expect(response.usage).toEqual({ prompt_tokens: 5, completion_tokens: 60, total_tokens: 65 })
  })

  it("streaming gives the same text in chunks, a finish reason, a usage chunk and [DONE]", async () => {
    const whole = await client.completions.create({
      model: MODEL,
      prompt: BENCH_PROMPTS[1]!,
      max_tokens: 30,
      ...greedy,
    })
    const stream = await client.completions.create({
      model: MODEL,
      prompt: BENCH_PROMPTS[1]!,
      max_tokens: 30,
      stream: true,
      stream_options: { include_usage: true },
      ...greedy,
    })
    let text = ""
    let finish: string | null = null
    // biome-ignore lint/suspicious/noExplicitAny: the usage chunk also carries the early_exit extension
    let last: any
    let chunks = 0
    for await (const chunk of stream) {
      chunks++
      for (const choice of chunk.choices) {
        text += choice.text
        finish = choice.finish_reason ?? finish
      }
      last = chunk
    }
    expect(text).toBe(whole.choices[0]!.text)
    expect(chunks).toBeGreaterThan(10)
    expect(finish).toBe("length")
    expect(last.choices).toEqual([])
    expect(last.usage).toEqual(whole.usage)
    expect(last.early_exit).toMatchObject({ mean_exit_depth: 5, layers_skipped: 0, layers: 5 })
  })

  it("stop strings are cut exactly, also across token boundaries when streaming", async () => {
    const full = (
      await client.completions.create({ model: MODEL, prompt: "Once upon a time", max_tokens: 60, ...greedy })
    ).choices[0]!.text
    // " girl" spans the tokens " g", "ir", "l"; "Lily" comes twice.
    for (const stop of [" girl", ["park", "Lily"], "Lily. She"]) {
      const stops = typeof stop === "string" ? [stop] : stop
      const cut = Math.min(...stops.map((s) => full.indexOf(s)).filter((i) => i >= 0))
      const expected = full.slice(0, cut)
      const plain = await client.completions.create({
        model: MODEL,
        prompt: "Once upon a time",
        max_tokens: 60,
        stop,
        ...greedy,
      })
      expect(plain.choices[0]!.text).toBe(expected)
      expect(plain.choices[0]!.finish_reason).toBe("stop")
      const response = await postJson(`${server.url}/v1/completions`, {
        model: MODEL,
        prompt: "Once upon a time",
        max_tokens: 60,
        stop,
        stream: true,
        temperature: 0,
      })
      const { chunks, done } = await readSse(response)
      expect(done).toBe(true)
      const texts: Array<string> = chunks.map((c) => c.choices[0]?.text ?? "")
      expect(texts.join("")).toBe(expected)
      // No chunk ever carried any part of the stop string beyond what the final text has.
      expect(texts.join("").includes(stops[0]!)).toBe(false)
      expect(chunks.at(-1).choices[0].finish_reason).toBe("stop")
    }
  })

  it("n samples: greedy ones equal the single output; seeded ones are reproducible", async () => {
    const single = await client.completions.create({
      model: MODEL,
      prompt: BENCH_PROMPTS[2]!,
      max_tokens: 20,
      ...greedy,
    })
    const three = await client.completions.create({
      model: MODEL,
      prompt: BENCH_PROMPTS[2]!,
      max_tokens: 20,
      n: 3,
      ...greedy,
    })
    expect(three.choices.map((c) => c.index)).toEqual([0, 1, 2])
    for (const c of three.choices) expect(c.text).toBe(single.choices[0]!.text)
    expect(three.usage!.completion_tokens).toBe(60)
    expect(three.usage!.prompt_tokens).toBe(single.usage!.prompt_tokens)

    const seeded = { model: MODEL, prompt: BENCH_PROMPTS[3]!, max_tokens: 40, n: 2, temperature: 1, seed: 1234 }
    const a = await client.completions.create(seeded)
    const b = await client.completions.create(seeded)
    expect(b.choices.map((c) => c.text)).toEqual(a.choices.map((c) => c.text))
    expect(a.choices[0]!.text).not.toBe(a.choices[1]!.text)
    const other = await client.completions.create({ ...seeded, seed: 99 })
    expect(other.choices.map((c) => c.text)).not.toEqual(a.choices.map((c) => c.text))
  })

  it("seeded, each choice of a batch of prompts draws its own stream: choice c is stream c of the seed", async () => {
    const seeded = { model: MODEL, max_tokens: 30, temperature: 1, seed: 77 }
    const twice = await client.completions.create({ ...seeded, prompt: [BENCH_PROMPTS[5]!, BENCH_PROMPTS[5]!], n: 2 })
    const texts = twice.choices.map((c) => c.text)
    expect(new Set(texts).size).toBe(4)
    // Prompt 0 draws as the prompt alone; prompt 1's samples are the streams after it.
    const alone = await client.completions.create({ ...seeded, prompt: BENCH_PROMPTS[5]!, n: 4 })
    expect(alone.choices.map((c) => c.text)).toEqual(texts)
  })

  it("several prompts give prompt-major choices", async () => {
    const prompts = [BENCH_PROMPTS[0]!, BENCH_PROMPTS[4]!]
    const both = await client.completions.create({ model: MODEL, prompt: prompts, max_tokens: 12, n: 2, ...greedy })
    expect(both.choices).toHaveLength(4)
    for (const [i, prompt] of prompts.entries()) {
      const alone = await client.completions.create({ model: MODEL, prompt, max_tokens: 12, ...greedy })
      expect(both.choices[2 * i]!.text).toBe(alone.choices[0]!.text)
      expect(both.choices[2 * i + 1]!.text).toBe(alone.choices[0]!.text)
    }
  })

  it("logprobs: the chosen tokens with their log-probabilities, and echo", async () => {
    const r = await client.completions.create({
      model: MODEL,
      prompt: "Once upon a time",
      max_tokens: 10,
      logprobs: 1,
      echo: true,
      ...greedy,
    })
    const choice = r.choices[0]!
    const lp = choice.logprobs!
    expect(choice.text.startsWith("Once upon a time")).toBe(true)
    expect(lp.tokens!.join("")).toBe(choice.text.slice("Once upon a time".length))
    expect(lp.token_logprobs).toHaveLength(10)
    for (const v of lp.token_logprobs!) expect(v).toBeLessThanOrEqual(0)
    expect(lp.text_offset![0]).toBe("Once upon a time".length)
  })
})

describe("chat completions", () => {
  const messages = [
    { role: "system" as const, content: "You tell stories." },
    { role: "user" as const, content: "Tell me about a cat." },
  ]

  it("non-streaming and streaming agree; the fallback transcript is the prompt; usage adds up", async () => {
    const whole = await client.chat.completions.create({ model: MODEL, messages, max_completion_tokens: 25, ...greedy })
    const choice = whole.choices[0]!
    expect(choice.message.role).toBe("assistant")
    expect(choice.finish_reason).toBe("length")
    const transcript = "system: You tell stories.\nuser: Tell me about a cat.\nassistant:"
    expect(choice.message.content).toBe(
      await server.engineText({ prompt: transcript, maxTokens: 25, sampling: { temperature: 0, topK: 0, topP: 1 } }),
    )
    expect(whole.usage!.completion_tokens).toBe(25)
    expect(whole.usage!.total_tokens).toBe(whole.usage!.prompt_tokens + 25)

    const stream = await client.chat.completions.create({
      model: MODEL,
      messages,
      max_tokens: 25,
      stream: true,
      stream_options: { include_usage: true },
      ...greedy,
    })
    let content = ""
    let role: string | undefined
    // biome-ignore lint/suspicious/noExplicitAny: the usage chunk carries the early_exit extension
    let last: any
    for await (const chunk of stream) {
      for (const c of chunk.choices) {
        content += c.delta.content ?? ""
        role ??= c.delta.role
      }
      last = chunk
    }
    expect(role).toBe("assistant")
    expect(content).toBe(choice.message.content)
    expect(last.usage).toEqual(whole.usage)
  })

  it("logprobs: one entry per token, whose strings make up the content", async () => {
    const r = await client.chat.completions.create({
      model: MODEL,
      messages,
      max_tokens: 12,
      logprobs: true,
      ...greedy,
    })
    const content = r.choices[0]!.logprobs!.content!
    expect(content).toHaveLength(12)
    expect(content.map((t) => t.token).join("")).toBe(r.choices[0]!.message.content)
    expect(content[0]!.bytes).toEqual([...new TextEncoder().encode(content[0]!.token)])
  })

  it("n streaming choices each open with the role and end with a finish reason", async () => {
    const response = await postJson(`${server.url}/v1/chat/completions`, {
      model: MODEL,
      messages,
      max_tokens: 8,
      n: 3,
      stream: true,
      temperature: 0.8,
      seed: 5,
    })
    const { chunks, done } = await readSse(response)
    expect(done).toBe(true)
    for (const index of [0, 1, 2]) {
      const mine = chunks.filter((c) => c.choices[0]?.index === index)
      expect(mine[0].choices[0].delta.role).toBe("assistant")
      expect(mine.at(-1).choices[0].finish_reason).toBe("length")
    }
  })
})

describe("the early_exit extension", () => {
  it("per-request early exit matches the engine's, with per-response figures", async () => {
    const early_exit = { threshold: 0, min_exit_layer: 2, kv: "fill" as const }
    const request = { model: MODEL, prompt: BENCH_PROMPTS[1]!, max_tokens: 16, temperature: 0, early_exit }
    const response = await postJson(`${server.url}/v1/completions`, request)
    expect(response.status).toBe(200)
    const body = await json(response)
    // The first token comes from the prompt's prefill, which runs at full depth.
    expect(body.early_exit).toEqual({
      mean_exit_depth: (15 * 2 + 5) / 16,
      layers_skipped: 15 * 3,
      layers: 5,
      exit_histogram: { 2: 15, 5: 1 },
    })
    const engine = await server.engineText({
      prompt: BENCH_PROMPTS[1]!,
      maxTokens: 16,
      sampling: { temperature: 0, topK: 0, topP: 1 },
      earlyExit: { threshold: 0, minExitLayer: 2, kv: "fill" },
    })
    expect(body.choices[0].text).toBe(engine)

    // Streaming: the final chunk carries the figures.
    const streamed = await readSse(await postJson(`${server.url}/v1/completions`, { ...request, stream: true }))
    expect(streamed.chunks.at(-1).early_exit).toEqual(body.early_exit)
    expect(streamed.chunks.map((c) => c.choices[0]?.text ?? "").join("")).toBe(engine)
  })

  it("a gated decision (head-free measure, then the head's confirmation) reaches the engine as given", async () => {
    const early_exit = { measure: "saturation" as const, threshold: 0, min_exit_layer: 2, confirm: 0.95 }
    const request = { model: MODEL, prompt: BENCH_PROMPTS[2]!, max_tokens: 16, temperature: 0, early_exit }
    const body = await json(await postJson(`${server.url}/v1/completions`, request))
    const engine = await server.engineText({
      prompt: BENCH_PROMPTS[2]!,
      maxTokens: 16,
      sampling: { temperature: 0, topK: 0, topP: 1 },
      earlyExit: { measure: "saturation", threshold: 0, minExitLayer: 2, confirm: 0.95 },
    })
    expect(body.choices[0].text).toBe(engine)
    // Without the confirmation every token after the first would leave at layer 2.
    expect(body.early_exit.exit_histogram[2] ?? 0).toBeLessThan(15)
  })

  it("a measure the model cannot serve is a 400 before any stream starts", async () => {
    const response = await postJson(`${server.url}/v1/chat/completions`, {
      model: MODEL,
      messages: [{ role: "user", content: "hi" }],
      stream: true,
      early_exit: { measure: "classifier", threshold: 0.5 },
    })
    expect(response.status).toBe(400)
    expect((await json(response)).error.message).toMatch(/classifier/)
  })
})

describe("the speculative extension", () => {
  it("speculative decoding through the openai client gives full depth's text; a bad draft exit is a 400", async () => {
    const params = { model: MODEL, prompt: BENCH_PROMPTS[3]!, max_tokens: 24, temperature: 0 }
    const plain = await client.completions.create(params)
    // biome-ignore lint/suspicious/noExplicitAny: the speculative extension is not in the openai client's types
    const speculated = await client.completions.create({ ...params, speculative: {} } as any)
    expect(speculated.choices[0]!.text).toBe(plain.choices[0]!.text)
    const stats = await server.runtime.runPromise(Effect.flatMap(Engine, (e) => e.stats))
    expect(stats.speculative.verifications).toBeGreaterThan(0)
    const bad = await postJson(`${server.url}/v1/completions`, { ...params, speculative: { exit: 5, max_draft: 2 } })
    expect(bad.status).toBe(400)
    expect((await json(bad)).error.message).toMatch(/speculative.exit must be one of the model's early exits/)
  })
})

describe("models, health, metrics", () => {
  it("lists and retrieves the one model; an unknown one is 404", async () => {
    const list = await client.models.list()
    expect(list.data.map((m) => m.id)).toEqual([MODEL])
    expect((await client.models.retrieve(MODEL)).id).toBe(MODEL)
    await expect(client.models.retrieve("gpt-4")).rejects.toBeInstanceOf(OpenAI.NotFoundError)
  })

  it("/health and Prometheus /metrics", async () => {
    const health = await fetch(`${server.url}/health`)
    expect(health.status).toBe(200)
    expect(await health.json()).toEqual({ status: "ready", model: MODEL })
    const response = await fetch(`${server.url}/metrics`)
    expect(response.headers.get("content-type")).toMatch(/^text\/plain; version=0.0.4/)
    const text = await response.text()
    for (const name of [
      "offramp_http_requests_total",
      "offramp_prompt_tokens_total",
      "offramp_generation_tokens_total",
      "offramp_time_to_first_token_seconds",
      "offramp_inter_token_latency_seconds",
      "offramp_exit_layer",
      "offramp_kv_blocks_used",
      "offramp_kv_blocks_free",
      "offramp_prefix_cache_hits_total",
      "offramp_sequences_queued",
      "offramp_sequences_waiting",
      "offramp_sequences_running",
    ]) {
      expect(text).toContain(`# TYPE ${name} `)
    }
    const m = await server.metrics()
    expect(metric(m, MODEL, "offramp_http_requests_total", 'route="/v1/completions",status="200"')).toBeGreaterThan(0)
    expect(metric(m, MODEL, "offramp_generation_tokens_total")).toBeGreaterThan(0)
    expect(metric(m, MODEL, "offramp_time_to_first_token_seconds_count")).toBeGreaterThan(0)
    expect(metric(m, MODEL, "offramp_exit_layer_bucket", 'le="2"')).toBeGreaterThan(0)
    expect(metric(m, MODEL, "offramp_kv_blocks_total")).toBeGreaterThan(0)
    // Memory: the K/V pools, and the weights as stored (the graph files) and resident (measured at load).
    expect(metric(m, MODEL, "offramp_kv_cache_bytes")).toBeGreaterThan(0)
    const graphs = readdirSync(modelDir).filter((f) => f.endsWith(".onnx"))
    const stored = graphs.reduce((n, f) => n + statSync(join(modelDir, f)).size, 0)
    expect(metric(m, MODEL, "offramp_model_weight_bytes", 'kind="stored"')).toBe(stored)
    expect(metric(m, MODEL, "offramp_model_weight_bytes", 'kind="resident"')).toBeGreaterThan(0)
  })
})
