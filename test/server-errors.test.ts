/**
 * Bad requests, limits and failure modes of the server: each gets its documented status and OpenAI's error body,
 * and the server keeps serving afterwards. Also the API key, the queue limit (429), a stopped engine and graceful
 * shutdown (503), and a model chat template.
 */
import { request } from "node:http"
import { Engine } from "@offramp/core/Engine"
import { EngineStoppedError } from "@offramp/core/Errors"
import { Tokenizer } from "@offramp/core/Tokenizer"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { OpenAiServer } from "@offramp/server/OpenAiServer"
import { Context, Effect, Fiber, Layer, Stream } from "effect"
import OpenAI from "openai"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { json, metric, postJson, readSse, startServer, type TestServer } from "../packages/server/test/support.js"
import { convertStories, tempDir } from "./support/stories.js"

const MODEL = "stories260K"
const KEY = "sk-test-key"
let modelDir = ""
let strict: TestServer

beforeAll(async () => {
  modelDir = tempDir("server-errors")
  await convertStories(modelDir)
  strict = await startServer(onnxEngineLayer(modelDir), { apiKey: KEY })
})
afterAll(() => strict?.close())

const auth = { authorization: `Bearer ${KEY}` }

const expectOpenAiError = async (response: Response, status: number) => {
  expect(response.status).toBe(status)
  expect(response.headers.get("content-type")).toMatch(/^application\/json/)
  const text = await response.text()
  const body = JSON.parse(text)
  expect(Object.keys(body)).toEqual(["error"])
  expect(typeof body.error.message).toBe("string")
  expect(typeof body.error.type).toBe("string")
  expect("param" in body.error && "code" in body.error).toBe(true)
  // Never a stack trace.
  expect(text).not.toMatch(/\bat .+:\d+:\d+/)
  return body.error as { message: string; type: string; param: string | null; code: string | null }
}

const valid = { model: MODEL, prompt: "Once upon a time", max_tokens: 3 }

/** The status of a GET over node:http with this Host header (fetch does not let a caller set Host). */
const statusWithHost = (url: string, host: string, path = "/v1/models") =>
  new Promise<number>((resolve, reject) => {
    const req = request(`${url}${path}`, { headers: { host, ...auth }, agent: false }, (res) => {
      res.resume()
      resolve(res.statusCode ?? 0)
    })
    req.on("error", reject)
    req.end()
  })

const stillServes = async (server: TestServer, headers: Record<string, string>) => {
  const response = await postJson(`${server.url}/v1/completions`, valid, headers)
  expect(response.status).toBe(200)
  expect((await json(response)).choices[0].text.length).toBeGreaterThan(0)
}

const invalidUtf8 = new Uint8Array([
  ...new TextEncoder().encode('{"model":"stories260K","prompt":"Once '),
  0xff,
  0xfe,
  ...new TextEncoder().encode('","max_tokens":3}'),
])

/** A body sent in chunks, without Content-Length: the limit must hold while reading. */
const chunkedBody = (bytes: number) => {
  const piece = new TextEncoder().encode("a".repeat(64 * 1024))
  let sent = 0
  return new ReadableStream<Uint8Array>({
    pull: (controller) => {
      if (sent >= bytes) return controller.close()
      sent += piece.length
      controller.enqueue(piece)
    },
  })
}

interface BadCase {
  readonly name: string
  readonly path?: string
  readonly method?: string
  readonly body?: unknown
  readonly headers?: Record<string, string>
  readonly status: number
  readonly code?: string | null
  readonly param?: string | null
  /** What the message must say (it never quotes more than a short piece of the request). */
  readonly message?: string
}

const chat = "/v1/chat/completions"
const BAD: ReadonlyArray<BadCase> = [
  { name: "invalid JSON", body: '{"model": "stories260K", "prompt": ', status: 400, code: "invalid_json" },
  { name: "empty body", body: "", status: 400, code: "invalid_json" },
  { name: "a JSON array", body: "[1, 2]", status: 400, code: "invalid_json" },
  { name: "prompt of the wrong type", body: { ...valid, prompt: 5 }, status: 400, param: "prompt" },
  { name: "max_tokens as a string", body: { ...valid, max_tokens: "10" }, status: 400, param: "max_tokens" },
  { name: "temperature of the wrong type", body: { ...valid, temperature: "hot" }, status: 400, param: "temperature" },
  { name: "temperature out of range", body: { ...valid, temperature: 3 }, status: 400, param: "temperature" },
  { name: "stream as a string", body: { ...valid, stream: "yes" }, status: 400, param: "stream" },
  { name: "negative max_tokens", body: { ...valid, max_tokens: -5 }, status: 400, param: "max_tokens" },
  { name: "zero max_tokens", body: { ...valid, max_tokens: 0 }, status: 400, param: "max_tokens" },
  { name: "fractional max_tokens", body: { ...valid, max_tokens: 2.5 }, status: 400, param: "max_tokens" },
  {
    name: "huge max_tokens",
    body: { ...valid, max_tokens: 1_000_000_000 },
    status: 400,
    param: "max_tokens",
    code: "context_length_exceeded",
  },
  { name: "n out of range", body: { ...valid, n: 0 }, status: 400, param: "n" },
  {
    name: "too many stop strings",
    body: { ...valid, stop: ["a", "b", "c", "d", "e"] },
    status: 400,
    param: "stop",
    message: "stop: a string or an array of at most 4 strings (stop sequences)",
  },
  {
    name: "too many huge stop strings (not echoed back)",
    body: { ...valid, stop: Array.from({ length: 5 }, () => "x".repeat(100_000)) },
    status: 400,
    param: "stop",
    message: "at most 4 strings",
  },
  {
    name: "a huge value of the wrong type (not echoed back)",
    body: { ...valid, max_tokens: "9".repeat(500_000) },
    status: 400,
    param: "max_tokens",
    message: "characters)",
  },
  {
    name: "an exit-layer threshold for a layer that is not an exit",
    body: { ...valid, early_exit: { thresholds: { "2": 0.5, "7": 0.5 } } },
    status: 400,
    param: "early_exit.thresholds",
    message: 'early_exit.thresholds: "7" is not an exit layer of this model; its exits are after layers 1, 2, 3, 4, 5',
  },
  {
    name: "tools (not supported)",
    path: "/v1/chat/completions",
    body: {
      model: MODEL,
      messages: [{ role: "user", content: "hi" }],
      tools: [{ type: "function", function: { name: "f", parameters: {} } }],
    },
    status: 400,
    param: "tools",
    code: "unsupported_parameter",
  },
  {
    name: "tool_choice (not supported)",
    path: "/v1/chat/completions",
    body: { model: MODEL, messages: [{ role: "user", content: "hi" }], tool_choice: "required" },
    status: 400,
    param: "tool_choice",
    code: "unsupported_parameter",
  },
  {
    name: "a JSON response_format (not supported)",
    path: "/v1/chat/completions",
    body: { model: MODEL, messages: [{ role: "user", content: "hi" }], response_format: { type: "json_object" } },
    status: 400,
    param: "response_format",
    code: "unsupported_parameter",
  },
  { name: "stop of the wrong type", body: { ...valid, stop: 7 }, status: 400, param: "stop" },
  {
    name: "an unknown early-exit measure",
    body: { ...valid, early_exit: { measure: "vibes" } },
    status: 400,
    param: "early_exit.measure",
  },
  {
    name: "a negative early-exit threshold",
    body: { ...valid, early_exit: { threshold: -1 } },
    status: 400,
    param: "early_exit.threshold",
  },
  {
    name: "an early-exit confirmation above 1",
    body: { ...valid, early_exit: { measure: "saturation", confirm: 1.5 } },
    status: 400,
    param: "early_exit.confirm",
  },
  { name: "empty messages", path: chat, body: { model: MODEL, messages: [] }, status: 400, param: "messages" },
  { name: "messages not an array", path: chat, body: { model: MODEL, messages: "hi" }, status: 400, param: "messages" },
  {
    name: "a message with an unknown role",
    path: chat,
    body: { model: MODEL, messages: [{ role: "wizard", content: "hi" }] },
    status: 400,
    param: "messages.0.role",
    message: "messages.0.role: must be one of system, developer, user, assistant, tool",
  },
  {
    name: "max_completion_tokens negative",
    path: chat,
    body: { model: MODEL, messages: [{ role: "user", content: "hi" }], max_completion_tokens: -1 },
    status: 400,
    param: "max_completion_tokens",
  },
  {
    name: "an unknown model",
    body: { ...valid, model: "gpt-4o" },
    status: 404,
    code: "model_not_found",
    param: "model",
  },
  {
    name: "a prompt longer than the context",
    body: { ...valid, prompt: "Once upon a time there was a cat. ".repeat(80) },
    status: 400,
    code: "context_length_exceeded",
    param: "prompt",
  },
  {
    name: "a chat longer than the context",
    path: chat,
    body: { model: MODEL, messages: [{ role: "user", content: "The dog ran. ".repeat(200) }] },
    status: 400,
    code: "context_length_exceeded",
  },
  {
    name: "an oversized body",
    body: JSON.stringify({ ...valid, prompt: "a".repeat(2 * 1024 * 1024) }),
    status: 413,
    code: "request_too_large",
  },
  {
    name: "an oversized chunked body (no Content-Length)",
    body: "chunked",
    status: 413,
    code: "request_too_large",
  },
  { name: "an invalid UTF-8 body", body: invalidUtf8, status: 400, code: "invalid_encoding" },
  {
    name: "a text/plain body (what any web page may POST cross-site)",
    body: valid,
    headers: { "content-type": "text/plain" },
    status: 415,
    code: "unsupported_media_type",
  },
  {
    name: "a form body",
    path: chat,
    body: "model=stories260K",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    status: 415,
    code: "unsupported_media_type",
  },
  { name: "an unknown route", path: "/v1/embeddings", status: 404 },
  { name: "GET on a POST route", path: "/v1/completions", method: "GET", status: 404 },
  { name: "a missing API key", body: valid, headers: { authorization: "" }, status: 401, code: "invalid_api_key" },
  {
    name: "a wrong API key",
    body: valid,
    headers: { authorization: "Bearer sk-wrong" },
    status: 401,
    code: "invalid_api_key",
  },
  {
    name: "a malformed Authorization header",
    body: valid,
    headers: { authorization: KEY },
    status: 401,
    code: "invalid_api_key",
  },
]

describe("bad requests", () => {
  for (const bad of BAD) {
    it(`${bad.name} → ${bad.status}, and the server still serves`, async () => {
      const headers: Record<string, string> = { "content-type": "application/json", ...auth, ...bad.headers }
      if (headers.authorization === "") delete headers.authorization
      const method = bad.method ?? "POST"
      const body =
        bad.body === undefined || method === "GET"
          ? undefined
          : bad.body === "chunked"
            ? chunkedBody(2 * 1024 * 1024)
            : typeof bad.body === "string" || bad.body instanceof Uint8Array
              ? bad.body
              : JSON.stringify(bad.body)
      const response = await fetch(`${strict.url}${bad.path ?? "/v1/completions"}`, {
        method,
        headers,
        ...(body === undefined ? {} : { body, duplex: "half" }),
      } as RequestInit)
      const error = await expectOpenAiError(response, bad.status)
      if (bad.code !== undefined) expect(error.code).toBe(bad.code)
      if (bad.param !== undefined) expect(error.param).toBe(bad.param)
      if (bad.message !== undefined) expect(error.message).toContain(bad.message)
      expect(error.message.length).toBeLessThan(500)
      await stillServes(strict, auth)
    })
  }

  it("a body whose Content-Length is over the limit gets its 413 whole, not a broken pipe, while the client sends", async () => {
    const bytes = 10 * 1024 * 1024
    const result = await new Promise<{ status: number; body: string; error: string | undefined }>((resolve) => {
      let status = 0
      let body = ""
      let error: string | undefined
      const req = request(`${strict.url}/v1/completions`, {
        method: "POST",
        agent: false,
        headers: { "content-type": "application/json", "content-length": String(bytes), ...auth },
      })
      req.on("response", (res) => {
        status = res.statusCode ?? 0
        res.setEncoding("utf8")
        res.on("data", (data: string) => {
          body += data
        })
      })
      req.on("error", (e) => {
        error = e.message
      })
      req.on("close", () => resolve({ status, body, error }))
      req.end(Buffer.alloc(bytes, 0x61))
    })
    expect(result.error).toBeUndefined()
    expect(result.status).toBe(413)
    expect(JSON.parse(result.body).error.code).toBe("request_too_large")
    await stillServes(strict, auth)
  })

  it("on a loopback connection, a Host that is not a loopback name gets 403 (DNS rebinding); loopback names pass", async () => {
    for (const host of ["evil.example", "evil.example:8000", "192.168.1.10:80", "localhost.evil.example"]) {
      expect(await statusWithHost(strict.url, host)).toBe(403)
    }
    expect(await statusWithHost(strict.url, "evil.example", "/health")).toBe(403)
    for (const host of [
      "localhost",
      "localhost:8000",
      "LOCALHOST:1",
      "127.0.0.1:9",
      "127.1.2.3",
      "[::1]:8000",
      "a.localhost",
    ]) {
      expect(await statusWithHost(strict.url, host)).toBe(200)
    }
    const refused = await new Promise<string>((resolve, reject) => {
      const req = request(`${strict.url}/v1/models`, { headers: { host: "evil.example", ...auth }, agent: false })
      req.on("response", (res) => {
        let text = ""
        res.setEncoding("utf8")
        res.on("data", (d: string) => {
          text += d
        })
        res.on("end", () => resolve(text))
      })
      req.on("error", reject)
      req.end()
    })
    expect(JSON.parse(refused).error).toMatchObject({ code: "host_not_allowed", type: "invalid_request_error" })
    expect(JSON.parse(refused).error.message).toContain("--allowed-host")
  })

  it("special-token text in a completion prompt is text, not EOS or BOS", async () => {
    const prompt = "Once upon a time</s><s>"
    const [parsed, plain] = await strict.runtime.runPromise(
      Effect.flatMap(Tokenizer, (t) => Effect.all([t.encode(prompt), t.encode(prompt, { parseSpecialTokens: false })])),
    )
    expect(parsed).toContain(2)
    expect(plain).not.toContain(2)
    expect(plain.length).toBeGreaterThan(parsed.length)
    const response = await postJson(`${strict.url}/v1/completions`, { ...valid, prompt, temperature: 0 }, auth)
    expect(response.status).toBe(200)
    expect((await json(response)).usage.prompt_tokens).toBe(plain.length)
  })

  it('tools: [], tool_choice "none" and response_format {"type": "text"} are what the server does anyway', async () => {
    const response = await postJson(
      `${strict.url}/v1/chat/completions`,
      {
        model: MODEL,
        messages: [{ role: "user", content: "hi" }],
        max_tokens: 2,
        tools: [],
        tool_choice: "none",
        response_format: { type: "text" },
      },
      auth,
    )
    expect(response.status).toBe(200)
  })

  it("unknown fields are tolerated", async () => {
    const response = await postJson(`${strict.url}/v1/completions`, { ...valid, frobnicate: { deeply: [1] } }, auth)
    expect(response.status).toBe(200)
  })

  it("the openai client sees the same errors as typed exceptions", async () => {
    const bare = new OpenAI({ baseURL: `${strict.url}/v1`, apiKey: "sk-wrong", maxRetries: 0 })
    await expect(bare.models.list()).rejects.toBeInstanceOf(OpenAI.AuthenticationError)
    const keyed = new OpenAI({ baseURL: `${strict.url}/v1`, apiKey: KEY, maxRetries: 0 })
    await expect(keyed.completions.create({ ...valid, max_tokens: -1 })).rejects.toBeInstanceOf(OpenAI.BadRequestError)
    // /health and /metrics are open without the key.
    expect((await fetch(`${strict.url}/health`)).status).toBe(200)
    const m = await strict.metrics()
    expect(metric(m, MODEL, "offramp_http_requests_total", 'route="/v1/completions",status="401"')).toBeGreaterThan(0)
  })
})

/** Control over a wrapped engine: hold requests before admission, slow tokens down, or report the engine down. */
const control = { down: false, delayMs: 0 }

describe("queue limit, engine down, shutdown, chat template", () => {
  let gated: TestServer
  let open: Effect.Effect<void>
  let close: Effect.Effect<void>
  const template =
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}" +
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"

  beforeAll(async () => {
    const latch = Effect.runSync(Effect.makeLatch(true))
    open = latch.open
    close = latch.close
    const wrapped = Layer.effectContext(
      Effect.gen(function* () {
        const engine = yield* Engine
        const tokenizer = yield* Tokenizer
        const generate: typeof engine.generate = (request) =>
          control.down
            ? Stream.fail(new EngineStoppedError({ message: "the engine has shut down" }))
            : Stream.unwrap(
                Effect.as(
                  latch.await,
                  engine
                    .generate(request)
                    .pipe(Stream.tap(() => (control.delayMs > 0 ? Effect.sleep(control.delayMs) : Effect.void))),
                ),
              )
        // The server takes generations through submit: the same gated stream, fed to the sink by a fiber.
        const submit: typeof engine.submit = (request, sink) =>
          Effect.forkDaemon(
            generate(request).pipe(
              Stream.runForEach((event) => Effect.sync(() => sink.onEvent(event))),
              Effect.exit,
              Effect.flatMap((exit) => Effect.sync(() => sink.onEnd(exit))),
            ),
          ).pipe(Effect.map((fiber) => Effect.asVoid(Fiber.interrupt(fiber))))
        return Context.make(Engine, { ...engine, generate, submit }).pipe(Context.add(Tokenizer, tokenizer))
      }),
    ).pipe(Layer.provide(onnxEngineLayer(modelDir)))
    gated = await startServer(wrapped, {
      maxQueuedSequences: 2,
      allowedHosts: ["API.example.com"],
      chatTemplate: { template, bosToken: "<s>", eosToken: "</s>" },
    })
  })
  afterAll(() => gated?.close())

  it("a full queue answers 429 with Retry-After; the queued requests complete once the engine takes them", async () => {
    await Effect.runPromise(close)
    const queued = [0, 1].map(() => postJson(`${gated.url}/v1/completions`, valid))
    for (let i = 0; i < 200; i++) {
      if (metric(await gated.metrics(), MODEL, "offramp_sequences_queued") === 2) break
      await new Promise((r) => setTimeout(r, 10))
    }
    const full = await postJson(`${gated.url}/v1/completions`, valid)
    expect(full.headers.get("retry-after")).toBe("1")
    const error = await expectOpenAiError(full, 429)
    expect(error.code).toBe("queue_full")
    await Effect.runPromise(open)
    for (const response of await Promise.all(queued)) expect(response.status).toBe(200)
    await stillServes(gated, {})
  })

  it("limits count sequences: a request of more prompts × n than the queue holds gets 400, and one that fits is served", async () => {
    const tooMany = { ...valid, prompt: ["Once upon a time", "The cat"], n: 2 }
    const error = await expectOpenAiError(await postJson(`${gated.url}/v1/completions`, tooMany), 400)
    expect(error.code).toBe("too_many_sequences")
    // The queue holds 2 here, and one request may hold a quarter of it (at least one).
    expect(error.message).toContain("4 sequences (2 prompts × n = 2) but one request may queue at most 1")
    const fits = await postJson(`${gated.url}/v1/completions`, valid)
    expect(fits.status).toBe(200)
    expect((await json(fits)).choices).toHaveLength(1)
  })

  it("allowedHosts adds Host names a loopback server answers (a reverse proxy's)", async () => {
    expect(await statusWithHost(gated.url, "api.example.com")).toBe(200)
    expect(await statusWithHost(gated.url, "api.example.com:443")).toBe(200)
    expect(await statusWithHost(gated.url, "other.example.com")).toBe(403)
  })

  it("a stopped engine answers 503 with Retry-After", async () => {
    control.down = true
    try {
      const down = await postJson(`${gated.url}/v1/completions`, valid)
      expect(down.headers.get("retry-after")).toBe("1")
      const error = await expectOpenAiError(down, 503)
      expect(error.type).toBe("server_error")
    } finally {
      control.down = false
    }
    await stillServes(gated, {})
  })

  it("the model's chat template renders the prompt (its BOS is not doubled)", async () => {
    const messages = [{ role: "user" as const, content: "Once upon a time" }]
    const r = await gated.client.chat.completions.create({ model: MODEL, messages, max_tokens: 10, temperature: 0 })
    const prompt = "<|user|>Once upon a time\n<|assistant|>"
    const ids = await gated.runtime.runPromise(Effect.flatMap(Tokenizer, (t) => t.encode(prompt)))
    expect(r.usage!.prompt_tokens).toBe(ids.length)
    expect(ids.filter((id) => id === 1)).toHaveLength(1)
    expect(r.choices[0]!.message.content).toBe(
      await gated.engineText({ prompt, maxTokens: 10, sampling: { temperature: 0, topK: 0, topP: 1 } }),
    )
  })

  it("graceful shutdown: in-flight streams end with an error event and [DONE]; new requests get 503", async () => {
    control.delayMs = 20
    const inFlight = postJson(`${gated.url}/v1/completions`, { ...valid, max_tokens: 300, stream: true })
    const response = await inFlight
    expect(response.status).toBe(200)
    const shutdown = gated.runtime.runPromise(Effect.flatMap(OpenAiServer, (s) => s.shutdown("100 millis")))
    const { chunks, done } = await readSse(response)
    await shutdown
    expect(done).toBe(true)
    expect(chunks.at(-1).error.code).toBe("engine_unavailable")
    expect(chunks.length).toBeLessThan(300)
    expect((await fetch(`${gated.url}/health`)).status).toBe(503)
    await expectOpenAiError(await postJson(`${gated.url}/v1/completions`, valid), 503)
    control.delayMs = 0
  })
})
