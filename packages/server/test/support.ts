/**
 * Test helpers: a real server on a loopback port (port 0), an `openai` client for it, and raw HTTP helpers.
 */
import * as HttpServer from "@effect/platform/HttpServer"
import { Engine } from "@offramp/core/Engine"
import type { GenerationRequest } from "@offramp/core/Generation"
import type { Tokenizer } from "@offramp/core/Tokenizer"
import { Chunk, Effect, Layer, ManagedRuntime, Stream } from "effect"
import OpenAI from "openai"
import { parseMetrics } from "../src/Metrics.js"
import { OpenAiServer, type OpenAiServerOptions } from "../src/OpenAiServer.js"
import { layerNode } from "../src/Serve.js"

export interface TestServer {
  readonly url: string
  readonly client: OpenAI
  readonly runtime: ManagedRuntime.ManagedRuntime<Engine | Tokenizer | OpenAiServer | HttpServer.HttpServer, unknown>
  /** The engine's own output text for a request (the reference for HTTP results). */
  readonly engineText: (request: GenerationRequest) => Promise<string>
  readonly metrics: () => Promise<Map<string, number>>
  readonly close: () => Promise<void>
}

export const startServer = async (
  engine: Layer.Layer<Engine | Tokenizer, unknown>,
  options: OpenAiServerOptions = {},
): Promise<TestServer> => {
  const layer = layerNode({ port: 0, shutdownGrace: "200 millis" }).pipe(
    Layer.provideMerge(OpenAiServer.layer(options)),
    Layer.provideMerge(engine),
  )
  const runtime = ManagedRuntime.make(layer)
  const server = await runtime.runPromise(HttpServer.HttpServer)
  if (server.address._tag !== "TcpAddress") throw new Error("expected a TCP address")
  const url = `http://127.0.0.1:${server.address.port}`
  const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: options.apiKey ?? "unused", maxRetries: 0 })
  const engineText = (request: GenerationRequest) =>
    runtime.runPromise(
      Effect.flatMap(Engine, (e) => Stream.runCollect(e.generate(request))).pipe(
        Effect.map((events) =>
          Chunk.toArray(events)
            .map((e) => e.text)
            .join(""),
        ),
      ),
    )
  const metrics = async () => parseMetrics(await (await fetch(`${url}/metrics`)).text())
  return { url, client, runtime, engineText, metrics, close: () => runtime.dispose() }
}

export const postJson = (url: string, body: unknown, headers: Record<string, string> = {}) =>
  fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  })

/** A JSON response body, inspected field by field. */
// biome-ignore lint/suspicious/noExplicitAny: test bodies are inspected field by field
export const json = (response: Response): Promise<any> => response.json()

/** The `data:` payloads of an SSE body, and whether it ended with `data: [DONE]`. */
export const readSse = async (response: Response) => {
  const text = await response.text()
  const blocks = text.split("\n\n").filter((b) => b !== "")
  const data = blocks.map((b) => b.replace(/^data: /, ""))
  const done = text.endsWith("data: [DONE]\n\n")
  // biome-ignore lint/suspicious/noExplicitAny: chunks are inspected field by field
  const chunks: Array<any> = data.filter((d) => d !== "[DONE]").map((d) => JSON.parse(d))
  return { chunks, done, text }
}

/**
 * A streaming completion whose client disconnects after reading a few chunks ("aborted"), or, with `abortAfterMs`,
 * possibly before any (then the request itself fails: "aborted early").
 */
export const abandonedStream = async (
  url: string,
  body: Record<string, unknown>,
  options: { readonly abortAfterMs?: number } = {},
): Promise<"aborted" | "aborted early"> => {
  const controller = new AbortController()
  if (options.abortAfterMs !== undefined) setTimeout(() => controller.abort(), options.abortAfterMs)
  try {
    const response = await fetch(`${url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ ...body, stream: true }),
      signal: controller.signal,
    })
    const reader = response.body!.getReader()
    for (let chunks = 0; chunks < 3; chunks++) if ((await reader.read()).done) break
    controller.abort()
    await reader.cancel().catch(() => undefined)
    return "aborted"
  } catch {
    return "aborted early"
  }
}

/** Polls /metrics until the engine has nothing running or waiting. */
export const waitIdle = async (server: TestServer, model: string, timeoutMs = 20_000) => {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const m = await server.metrics()
    const idle = ["offramp_sequences_running", "offramp_sequences_waiting", "offramp_requests_active"].every(
      (name) => metric(m, model, name) === 0,
    )
    if (idle) return m
    if (Date.now() > deadline) throw new Error("the engine did not become idle")
    await new Promise((r) => setTimeout(r, 20))
  }
}

/** A metric's value with the model label (and any other labels given). */
export const metric = (m: Map<string, number>, model: string, name: string, labels = "") =>
  m.get(`${name}{model_name="${model}"${labels === "" ? "" : `,${labels}`}}`)
