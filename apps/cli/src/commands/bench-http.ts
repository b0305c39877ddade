/**
 * `offramp bench-http`: the HTTP server's streaming throughput with the engine in a worker thread, against the
 * in-process engine's own throughput measured in the same run, and the main thread's event-loop delay in each
 * setup while the streams generate.
 *
 * One process holds three setups: the in-process engine driven directly (the throughput reference), the real server
 * on loopback over the same in-process engine, and the real server over the worker engine. Each round runs every
 * setup once with `--clients` concurrent greedy streams (plain `fetch`, SSE, `include_usage` for the token count);
 * figures are medians over rounds. Event-loop delay is `perf_hooks.monitorEventLoopDelay` on the main thread, which
 * also runs the HTTP clients.
 */
import { monitorEventLoopDelay } from "node:perf_hooks"
import { Command, Options } from "@effect/cli"
import { HttpServer } from "@effect/platform"
import { Engine, InvalidRequestError, type Tokenizer } from "@offramp/core"
import { onnxEngineLayer, WorkerEngine } from "@offramp/onnx"
import { layerNode, OpenAiServer } from "@offramp/server"
import { Console, Context, Effect, Layer, Stream } from "effect"
import { median } from "../bench/quality.js"
import { engineConfig, kvCacheMb, threads } from "../engineOptions.js"
import { BENCH_PROMPTS } from "./bench.js"

const model = Options.directory("model").pipe(Options.withDescription("a staged model directory"))
const clients = Options.integer("clients").pipe(
  Options.withDescription("concurrent streaming clients"),
  Options.withDefault(16),
)
const maxTokens = Options.integer("max-tokens").pipe(
  Options.withDescription("max_tokens of every stream"),
  Options.withDefault(128),
)
const repeats = Options.integer("repeats").pipe(
  Options.withDescription("rounds; every round runs each setup once, and medians are reported"),
  Options.withDefault(3),
)
const json = Options.boolean("json").pipe(Options.withDescription("print one JSON document"))

export interface DelayFigures {
  readonly p50: number
  readonly p99: number
  readonly max: number
}

export interface SetupRun {
  readonly tokens: number
  readonly wallMs: number
  /** All generated tokens ÷ wall seconds from the first request to the last stream's end. */
  readonly tokensPerSecond: number
  /** Tokens after each stream's first ÷ seconds from the first token of any stream to the end (as `offramp bench`). */
  readonly decodeTokensPerSecond: number
  /** Main-thread event-loop delay while the streams ran, in ms. */
  readonly eventLoopDelayMs: DelayFigures
}

export interface SetupReport extends SetupRun {
  readonly runs: ReadonlyArray<SetupRun>
}

/** Medians of every figure over the rounds. */
const summarize = (runs: ReadonlyArray<SetupRun>): SetupReport => ({
  tokens: median(runs.map((r) => r.tokens)),
  wallMs: median(runs.map((r) => r.wallMs)),
  tokensPerSecond: median(runs.map((r) => r.tokensPerSecond)),
  decodeTokensPerSecond: median(runs.map((r) => r.decodeTokensPerSecond)),
  eventLoopDelayMs: {
    p50: median(runs.map((r) => r.eventLoopDelayMs.p50)),
    p99: median(runs.map((r) => r.eventLoopDelayMs.p99)),
    max: median(runs.map((r) => r.eventLoopDelayMs.max)),
  },
  runs,
})

interface StreamResult {
  readonly tokens: number
  /** performance.now() of the stream's first token. */
  readonly firstAt: number
}

/** Runs `count` streams at once under an event-loop delay monitor (1 ms timer). */
const measure = (count: number, stream: (i: number) => Effect.Effect<StreamResult>) =>
  Effect.gen(function* () {
    const histogram = monitorEventLoopDelay({ resolution: 1 })
    histogram.enable()
    const started = performance.now()
    const results = yield* Effect.forEach(
      Array.from({ length: count }, (_, i) => i),
      stream,
      { concurrency: "unbounded" },
    )
    const ended = performance.now()
    histogram.disable()
    const ms = (ns: number) => ns / 1e6
    const tokens = results.reduce((n, r) => n + r.tokens, 0)
    const firstToken = Math.min(...results.map((r) => r.firstAt))
    return {
      tokens,
      wallMs: ended - started,
      tokensPerSecond: (tokens * 1000) / (ended - started),
      decodeTokensPerSecond: ((tokens - count) * 1000) / (ended - firstToken),
      eventLoopDelayMs: {
        p50: ms(histogram.percentile(50)),
        p99: ms(histogram.percentile(99)),
        max: ms(histogram.max),
      },
    } satisfies SetupRun
  })

const prompt = (i: number) => BENCH_PROMPTS[i % BENCH_PROMPTS.length]!

/** The engine driven directly: greedy streams, counted as they arrive. */
const engineStream = (engine: Engine["Type"], max: number) => (i: number) =>
  Effect.suspend(() => {
    let firstAt = Number.POSITIVE_INFINITY
    return engine.generate({ prompt: prompt(i), maxTokens: max, sampling: { temperature: 0, topK: 0, topP: 1 } }).pipe(
      Stream.tap((event) =>
        Effect.sync(() => {
          if (event.index === 0 && event.sample === 0) firstAt = performance.now()
        }),
      ),
      Stream.runCount,
      Effect.map((tokens) => ({ tokens, firstAt })),
      Effect.orDie,
    )
  })

/** One streaming completion over HTTP with plain fetch: the first token's time and the usage count. */
const httpStream = (url: string, max: number) => (i: number) =>
  Effect.promise(async (): Promise<StreamResult> => {
    const response = await fetch(`${url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        prompt: prompt(i),
        max_tokens: max,
        temperature: 0,
        stream: true,
        stream_options: { include_usage: true },
      }),
    })
    if (response.status !== 200 || response.body === null) {
      throw new Error(`HTTP ${response.status}: ${await response.text()}`)
    }
    const decoder = new TextDecoder()
    let buffer = ""
    let firstAt = Number.POSITIVE_INFINITY
    let tokens: number | undefined
    let done = false
    for await (const bytes of response.body) {
      buffer += decoder.decode(bytes, { stream: true })
      let end = buffer.indexOf("\n\n")
      while (end >= 0) {
        const data = buffer.slice(0, end).replace(/^data: /, "")
        buffer = buffer.slice(end + 2)
        end = buffer.indexOf("\n\n")
        if (data === "[DONE]") {
          done = true
          continue
        }
        const chunk = JSON.parse(data) as {
          choices: Array<unknown>
          usage?: { completion_tokens: number } | null
          error?: { message: string }
        }
        if (chunk.error) throw new Error(chunk.error.message)
        if (chunk.choices.length > 0 && firstAt === Number.POSITIVE_INFINITY) firstAt = performance.now()
        if (chunk.usage) tokens = chunk.usage.completion_tokens
      }
    }
    if (!done || tokens === undefined) throw new Error("the stream ended without usage and [DONE]")
    return { tokens, firstAt }
  })

/** The real server on a loopback port over an engine layer; returns its URL and the engine. */
const startServer = (engine: Layer.Layer<Engine | Tokenizer, unknown>) =>
  Effect.gen(function* () {
    const layer = layerNode({ host: "127.0.0.1", port: 0, shutdownGrace: "1 second" }).pipe(
      Layer.provideMerge(OpenAiServer.layer({})),
      Layer.provideMerge(engine),
    )
    const context = yield* Layer.build(layer)
    const address = Context.get(context, HttpServer.HttpServer).address
    if (address._tag !== "TcpAddress") return yield* Effect.dieMessage("expected a TCP address")
    return { url: `http://127.0.0.1:${address.port}`, engine: Context.get(context, Engine) }
  })

/** Event-loop delay of the idle main thread over `ms`: the floor of the figures above. */
const idleDelay = (ms: number) =>
  Effect.gen(function* () {
    const histogram = monitorEventLoopDelay({ resolution: 1 })
    histogram.enable()
    yield* Effect.promise(() => new Promise((resolve) => setTimeout(resolve, ms)))
    histogram.disable()
    return { p50: histogram.percentile(50) / 1e6, p99: histogram.percentile(99) / 1e6, max: histogram.max / 1e6 }
  })

const fmt = (d: DelayFigures) => `${d.p50.toFixed(2)} / ${d.p99.toFixed(2)} / ${d.max.toFixed(2)} ms`

export const benchHttp = Command.make(
  "bench-http",
  { model, clients, maxTokens, repeats, json, kvCacheMb, threads },
  (args) =>
    Effect.scoped(
      Effect.gen(function* () {
        for (const [flag, value] of [
          ["clients", args.clients],
          ["max-tokens", args.maxTokens],
          ["repeats", args.repeats],
        ] as const) {
          if (!(Number.isInteger(value) && value > 0)) {
            return yield* new InvalidRequestError({ message: `--${flag} must be a positive integer, got ${value}` })
          }
        }
        const config = yield* engineConfig(args)
        const inProcess = yield* startServer(onnxEngineLayer(args.model, config))
        const worker = yield* startServer(WorkerEngine.layer(args.model, config))
        const setups = {
          engine: engineStream(inProcess.engine, args.maxTokens),
          inProcessHttp: httpStream(inProcess.url, args.maxTokens),
          workerHttp: httpStream(worker.url, args.maxTokens),
        }
        // Warm-up: onnxruntime's lazy initialisation, the worker's first messages, first-run allocations.
        for (const run of Object.values(setups)) yield* measure(2, run)
        const idle = yield* idleDelay(500)
        const runs: Record<keyof typeof setups, Array<SetupRun>> = { engine: [], inProcessHttp: [], workerHttp: [] }
        const order = ["engine", "inProcessHttp", "workerHttp"] as const
        for (let round = 0; round < args.repeats; round++) {
          // Rotate the order so that machine noise and warm caches do not favour one setup.
          for (let k = 0; k < order.length; k++) {
            const name = order[(round + k) % order.length]!
            runs[name].push(yield* measure(args.clients, setups[name]))
          }
        }
        const engine = summarize(runs.engine)
        const inProcessHttp = summarize(runs.inProcessHttp)
        const workerHttp = summarize(runs.workerHttp)
        const ratio = workerHttp.tokensPerSecond / engine.tokensPerSecond
        const decodeRatio = workerHttp.decodeTokensPerSecond / engine.decodeTokensPerSecond
        const command =
          `offramp bench-http --model ${args.model} --clients ${args.clients} --max-tokens ${args.maxTokens} ` +
          `--repeats ${args.repeats}`
        if (args.json) {
          yield* Console.log(
            JSON.stringify({
              model: inProcess.engine.spec.name,
              command,
              node: process.version,
              clients: args.clients,
              maxTokens: args.maxTokens,
              repeats: args.repeats,
              idleEventLoopDelayMs: idle,
              inProcess: { engine, http: inProcessHttp },
              worker: { http: workerHttp },
              workerHttpOverInProcessEngine: { tokensPerSecond: ratio, decodeTokensPerSecond: decodeRatio },
              withinTenPercent: ratio >= 0.9,
            }),
          )
          return
        }
        const line = (name: string, r: SetupReport) =>
          `${name.padEnd(28)} ${r.tokensPerSecond.toFixed(0).padStart(6)} tok/s  ` +
          `${r.decodeTokensPerSecond.toFixed(0).padStart(6)} decode tok/s  ${String(r.tokens).padStart(6)} tokens  ` +
          `event-loop delay p50/p99/max ${fmt(r.eventLoopDelayMs)}`
        yield* Console.log(`${command}  (${args.clients} clients, medians of ${args.repeats} rounds)`)
        yield* Console.log(line("in-process engine, direct", engine))
        yield* Console.log(line("HTTP, in-process engine", inProcessHttp))
        yield* Console.log(line("HTTP, worker engine", workerHttp))
        yield* Console.log(`idle main thread: event-loop delay p50/p99/max ${fmt(idle)}`)
        yield* Console.log(
          `HTTP with the worker engine / in-process engine: x${ratio.toFixed(3)} tok/s, x${decodeRatio.toFixed(3)} decode ` +
            `tok/s (${ratio >= 0.9 ? "within" : "NOT within"} 10%)`,
        )
      }),
    ),
).pipe(
  Command.withDescription(
    "HTTP streaming throughput with the engine in a worker thread against the in-process engine, with event-loop delay",
  ),
)
