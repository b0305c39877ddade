/**
 * `offramp bench-http`: the HTTP server's streaming throughput with the engine in a worker thread, against the
 * in-process engine's own throughput measured in the same run, and the main thread's event-loop delay and
 * utilization in each setup while the streams generate.
 *
 * One process holds four setups over one model: the in-process engine driven directly (the throughput reference),
 * the worker engine driven directly, and the real server on loopback over each of them. The load is `--clients`
 * concurrent clients, each running `--requests` greedy streams one after another (a closed loop, as a load generator
 * with a concurrency limit runs it: a client's next request starts when its previous stream ends, not when every
 * client's has). Each round runs every setup once, in a rotating order; figures are medians over rounds, and the
 * ratio of HTTP (worker engine) to the in-process engine is the median of the per-round ratios. The HTTP
 * clients (SSE, `include_usage` for the token count) run in a thread of their own, as remote clients would, so the
 * main thread's figures (`perf_hooks.monitorEventLoopDelay`, `eventLoopUtilization`) are the server's; that thread
 * runs at a lower CPU priority (`--client-nice`), so that on a small machine it takes less from the server than
 * clients on the same host would.
 *
 * Implemented here; commands/bench-http.ts defines the flags and imports this when the command runs.
 */
import { readFileSync } from "node:fs"
import { type IntervalHistogram, monitorEventLoopDelay } from "node:perf_hooks"
import { Worker as Thread } from "node:worker_threads"
import * as HttpServer from "@effect/platform/HttpServer"
import { Engine } from "@offramp/core/Engine"
import { InvalidRequestError } from "@offramp/core/Errors"
import { greedyParams } from "@offramp/core/Sampler"
import type { Tokenizer } from "@offramp/core/Tokenizer"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import * as WorkerEngine from "@offramp/onnx/WorkerEngine"
import { OpenAiServer } from "@offramp/server/OpenAiServer"
import { layerNode } from "@offramp/server/Serve"
import { Console, Context, Effect, Layer, Stream } from "effect"
import { median } from "../bench/quality.js"
import { BENCH_PROMPTS } from "../commands/bench.js"
import type { BenchHttpFlags, Client } from "../commands/bench-http.js"
import { engineConfig } from "../engineOptions.js"

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
  /** Main-thread event-loop delay while the streams ran, in ms (1 ms timer). */
  readonly eventLoopDelayMs: DelayFigures
  /** Fraction of the wall time the main thread's event loop was busy. */
  readonly eventLoopUtilization: number
  /**
   * CPU time per generated token: the main thread's (Linux schedstat; null elsewhere) and the whole process's, which
   * includes the engine thread and the HTTP clients' thread. Unlike wall-clock figures, these hold on a busy machine.
   */
  readonly cpuMsPerToken: { readonly mainThread: number | null; readonly process: number }
}

export interface SetupReport extends SetupRun {
  readonly runs: ReadonlyArray<SetupRun>
}

/** Medians of every figure over the rounds. */
const summarize = (runs: ReadonlyArray<SetupRun>): SetupReport => {
  const of = (f: (r: SetupRun) => number) => median(runs.map(f))
  return {
    tokens: of((r) => r.tokens),
    wallMs: of((r) => r.wallMs),
    tokensPerSecond: of((r) => r.tokensPerSecond),
    decodeTokensPerSecond: of((r) => r.decodeTokensPerSecond),
    eventLoopDelayMs: {
      p50: of((r) => r.eventLoopDelayMs.p50),
      p99: of((r) => r.eventLoopDelayMs.p99),
      max: of((r) => r.eventLoopDelayMs.max),
    },
    eventLoopUtilization: of((r) => r.eventLoopUtilization),
    cpuMsPerToken: {
      mainThread: runs.some((r) => r.cpuMsPerToken.mainThread === null) ? null : of((r) => r.cpuMsPerToken.mainThread!),
      process: of((r) => r.cpuMsPerToken.process),
    },
    runs,
  }
}

interface StreamResult {
  readonly tokens: number
  /** performance.now() of the stream's first token. */
  readonly firstAt: number
}

/** The load of one measurement: `clients` concurrent clients, each running `requests` streams one after another. */
interface Load {
  readonly clients: number
  readonly requests: number
}

/** Runs a load; one result per stream. */
type Setup = (load: Load) => Effect.Effect<ReadonlyArray<StreamResult>>

const delayFigures = (histogram: IntervalHistogram): DelayFigures => ({
  p50: histogram.percentile(50) / 1e6,
  p99: histogram.percentile(99) / 1e6,
  max: histogram.max / 1e6,
})

/** The main thread's CPU time in ms (the first field of its schedstat is ns on a CPU), or null without /proc. */
const mainThreadCpuMs = (): number | null => {
  try {
    return Number(readFileSync(`/proc/self/task/${process.pid}/schedstat`, "utf8").split(" ")[0]) / 1e6
  } catch {
    return null
  }
}

/** Runs a load on a setup under the main thread's event-loop monitors. */
const measure = (load: Load, setup: Setup) =>
  Effect.gen(function* () {
    const histogram = monitorEventLoopDelay({ resolution: 1 })
    histogram.enable()
    const utilization = performance.eventLoopUtilization()
    const mainCpu = mainThreadCpuMs()
    const processCpu = process.cpuUsage()
    const started = performance.now()
    const results = yield* setup(load)
    const ended = performance.now()
    const processCpuMs = (({ user, system }) => (user + system) / 1000)(process.cpuUsage(processCpu))
    const mainCpuMs = mainCpu === null ? null : mainThreadCpuMs()! - mainCpu
    histogram.disable()
    const tokens = results.reduce((n, r) => n + r.tokens, 0)
    const firstToken = Math.min(...results.map((r) => r.firstAt))
    return {
      tokens,
      wallMs: ended - started,
      tokensPerSecond: (tokens * 1000) / (ended - started),
      decodeTokensPerSecond: ((tokens - results.length) * 1000) / (ended - firstToken),
      eventLoopDelayMs: delayFigures(histogram),
      eventLoopUtilization: performance.eventLoopUtilization(utilization).utilization,
      cpuMsPerToken: { mainThread: mainCpuMs === null ? null : mainCpuMs / tokens, process: processCpuMs / tokens },
    } satisfies SetupRun
  })

/** Client c's r-th request continues this prompt: every client starts on a different one and moves on. */
const prompt = (client: number, request: number) => BENCH_PROMPTS[(client + request) % BENCH_PROMPTS.length]!

/** The engine driven directly: each client a fiber that runs its greedy streams one after another. */
const engineStreams =
  (engine: Engine["Type"], max: number): Setup =>
  ({ clients, requests }) =>
    Effect.forEach(
      Array.from({ length: clients }, (_, c) => c),
      (c) =>
        Effect.forEach(
          Array.from({ length: requests }, (_, r) => prompt(c, r)),
          (text) =>
            Effect.suspend(() => {
              let firstAt = Number.POSITIVE_INFINITY
              return engine.generate({ prompt: text, maxTokens: max, sampling: greedyParams }).pipe(
                Stream.tap((event) =>
                  Effect.sync(() => {
                    if (event.index === 0 && event.sample === 0) firstAt = performance.now()
                  }),
                ),
                Stream.runCount,
                Effect.map((tokens) => ({ tokens, firstAt })),
                Effect.orDie,
              )
            }),
        ),
      { concurrency: "unbounded" },
    ).pipe(Effect.map((perClient) => perClient.flat()))

/**
 * The HTTP clients run in a worker thread of their own, as remote clients would, so that the main thread's figures
 * are the server's. Each client is one streaming completion; it reports its first token's time (epoch ms) and the
 * usage count, and fails unless the stream ends with usage and `[DONE]`. `node:http` with keep-alive is the default
 * load generator: `fetch` (undici's WHATWG streams) costs about three times the CPU per token, which on a small
 * machine is taken from the server it measures; `--client fetch` measures with it.
 */
const CLIENTS_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads")
const http = require("node:http")
const now = () => performance.timeOrigin + performance.now()
// The load generator stands in for clients on other machines, which take no CPU from the server: at a lower priority
// (a higher nice value; Linux sets it per thread) it runs when a core is free rather than preempt the engine.
const lowerPriority = (nice) => {
  try {
    const tid = Number(require("node:fs").readlinkSync("/proc/thread-self").split("/").pop())
    require("node:os").setPriority(tid, nice)
  } catch {}
}
if (workerData.nice > 0) lowerPriority(workerData.nice)
const events = (onData) => {
  let buffer = ""
  return (text) => {
    buffer += text
    let end
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const event = buffer.slice(0, end)
      buffer = buffer.slice(end + 2)
      onData(event.startsWith("data: ") ? event.slice(6) : event)
    }
  }
}
// One stream's SSE reader: feed() throws on an error event, end() returns the figures or throws.
const reader = () => {
  let firstAt = Infinity, tokens, done = false
  const feed = events((data) => {
    if (data === "[DONE]") { done = true; return }
    const chunk = JSON.parse(data)
    if (chunk.error) throw new Error(chunk.error.message)
    if (chunk.choices.length > 0 && firstAt === Infinity) firstAt = now()
    if (chunk.usage) tokens = chunk.usage.completion_tokens
  })
  const end = () => {
    if (!done || tokens === undefined) throw new Error("the stream ended without usage and [DONE]")
    return { tokens, firstAt }
  }
  return { feed, end }
}
const viaHttp = (agent, url, body) => new Promise((resolve, reject) => {
  const request = http.request(url + "/v1/completions", { method: "POST", agent, headers: { "content-type": "application/json" } }, (response) => {
    response.setEncoding("utf8")
    let text = ""
    const r = response.statusCode === 200 ? reader() : { feed: (t) => { text += t }, end: () => { throw new Error("HTTP " + response.statusCode + ": " + text) } }
    const settle = (f) => { try { f() } catch (error) { response.destroy(); reject(error) } }
    response.on("data", (t) => settle(() => r.feed(t)))
    response.on("end", () => settle(() => resolve(r.end())))
    response.on("error", reject)
  })
  request.on("error", reject)
  request.end(JSON.stringify(body))
})
const viaFetch = async (_agent, url, body) => {
  const response = await fetch(url + "/v1/completions", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  })
  if (response.status !== 200 || response.body === null) throw new Error("HTTP " + response.status + ": " + (await response.text()))
  const r = reader()
  const decoder = new TextDecoder()
  for await (const bytes of response.body) r.feed(decoder.decode(bytes, { stream: true }))
  return r.end()
}
// Each client runs its requests one after another; the clients run at once.
parentPort.on("message", ({ url, clients, client }) => {
  const one = client === "fetch" ? viaFetch : viaHttp
  // Keep-alive within a measurement only: a connection left idle until the next round can meet the server's idle
  // timeout just as it is reused ("socket hang up").
  const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity })
  const runClient = async (bodies) => {
    const results = []
    for (const body of bodies) results.push(await one(agent, url, body))
    return results
  }
  Promise.all(clients.map(runClient)).then((perClient) => perClient.flat()).finally(() => agent.destroy()).then(
    (results) => parentPort.postMessage({ results }),
    (error) => parentPort.postMessage({ error: String(error) }),
  )
})
`

const clientThread = (nice: number) =>
  Effect.acquireRelease(
    Effect.sync(() => new Thread(CLIENTS_SOURCE, { eval: true, workerData: { nice } })),
    (thread) => Effect.promise(() => thread.terminate()),
  )

/** The load as streaming completions from the client thread against the server at `url`. */
const httpStreams =
  (thread: Thread, url: string, max: number, client: Client): Setup =>
  ({ clients, requests }) =>
    Effect.async<ReadonlyArray<StreamResult>, Error>((resume) => {
      const bodies = Array.from({ length: clients }, (_, c) =>
        Array.from({ length: requests }, (_, r) => ({
          prompt: prompt(c, r),
          max_tokens: max,
          temperature: 0,
          stream: true,
          stream_options: { include_usage: true },
        })),
      )
      thread.once("message", (reply: { results?: ReadonlyArray<StreamResult>; error?: string }) =>
        resume(
          reply.results
            ? Effect.succeed(reply.results.map((r) => ({ ...r, firstAt: r.firstAt - performance.timeOrigin })))
            : Effect.fail(new Error(reply.error)),
        ),
      )
      thread.postMessage({ url, clients: bodies, client })
    }).pipe(Effect.orDie)

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
    return delayFigures(histogram)
  })

const fmt = (d: DelayFigures) => `${d.p50.toFixed(2)} / ${d.p99.toFixed(2)} / ${d.max.toFixed(2)} ms`

const SETUPS = {
  engine: "in-process engine, direct",
  workerEngine: "worker engine, direct",
  inProcessHttp: "HTTP, in-process engine",
  workerHttp: "HTTP, worker engine",
} as const
type SetupName = keyof typeof SETUPS

export const handle = (args: BenchHttpFlags) =>
  Effect.scoped(
    Effect.gen(function* () {
      for (const [flag, value] of [
        ["clients", args.clients],
        ["requests", args.requests],
        ["max-tokens", args.maxTokens],
        ["repeats", args.repeats],
      ] as const) {
        if (!(Number.isInteger(value) && value > 0)) {
          return yield* new InvalidRequestError({ message: `--${flag} must be a positive integer, got ${value}` })
        }
      }
      if (!(Number.isInteger(args.warmup) && args.warmup >= 0)) {
        return yield* new InvalidRequestError({ message: `--warmup must be a whole number, got ${args.warmup}` })
      }
      if (!(Number.isInteger(args.clientNice) && args.clientNice >= 0 && args.clientNice <= 19)) {
        return yield* new InvalidRequestError({
          message: `--client-nice must be a whole number from 0 to 19, got ${args.clientNice}`,
        })
      }
      const load: Load = { clients: args.clients, requests: args.requests }
      const config = yield* engineConfig(args)
      const inProcess = yield* startServer(onnxEngineLayer(args.model, config))
      const worker = yield* startServer(WorkerEngine.layer(args.model, config.runner ? { runner: config.runner } : {}))
      const thread = yield* clientThread(args.clientNice)
      const setups: Record<SetupName, Setup> = {
        engine: engineStreams(inProcess.engine, args.maxTokens),
        workerEngine: engineStreams(worker.engine, args.maxTokens),
        inProcessHttp: httpStreams(thread, inProcess.url, args.maxTokens, args.client),
        workerHttp: httpStreams(thread, worker.url, args.maxTokens, args.client),
      }
      const names = Object.keys(SETUPS) as Array<SetupName>
      // Warm-up rounds that are not counted: onnxruntime's lazy initialisation, first-run allocations, and the JIT
      // of both threads. The worker's code starts cold and reaches its steady rate only after a few seconds of
      // generation (measured: its first 4 s ran at 0.7x of its rate from 8 s on), so one round is not enough.
      for (let round = 0; round < args.warmup; round++) {
        for (const name of names) yield* measure(load, setups[name])
      }
      const idle = yield* idleDelay(500)
      const runs = Object.fromEntries(names.map((name) => [name, [] as Array<SetupRun>])) as Record<
        SetupName,
        Array<SetupRun>
      >
      for (let round = 0; round < args.repeats; round++) {
        // Rotate the order so that machine noise and warm caches do not favour one setup.
        for (let k = 0; k < names.length; k++) {
          const name = names[(round + k) % names.length]!
          runs[name].push(yield* measure(load, setups[name]))
        }
      }
      const report = Object.fromEntries(names.map((name) => [name, summarize(runs[name])])) as Record<
        SetupName,
        SetupReport
      >
      // Every round runs all setups within seconds of each other, so a ratio is the median of the per-round ratios:
      // the machine's slower drifts (other tenants, CPU steal) then cancel, as in `offramp bench`.
      const perRound = (f: (r: SetupRun) => number) => median(runs.workerHttp.map((r, i) => f(r) / f(runs.engine[i]!)))
      const ratio = perRound((r) => r.tokensPerSecond)
      const decodeRatio = perRound((r) => r.decodeTokensPerSecond)
      const command =
        `offramp bench-http --model ${args.model} --clients ${args.clients} --requests ${args.requests} ` +
        `--max-tokens ${args.maxTokens} ` +
        `--repeats ${args.repeats} --warmup ${args.warmup} --client ${args.client} --client-nice ${args.clientNice}`
      if (args.json) {
        yield* Console.log(
          JSON.stringify({
            model: inProcess.engine.spec.name,
            command,
            node: process.version,
            clients: args.clients,
            requests: args.requests,
            maxTokens: args.maxTokens,
            repeats: args.repeats,
            warmup: args.warmup,
            client: args.client,
            clientNice: args.clientNice,
            idleEventLoopDelayMs: idle,
            inProcess: { engine: report.engine, http: report.inProcessHttp },
            worker: { engine: report.workerEngine, http: report.workerHttp },
            workerHttpOverInProcessEngine: { tokensPerSecond: ratio, decodeTokensPerSecond: decodeRatio },
            withinTenPercent: ratio >= 0.9,
          }),
        )
        return
      }
      yield* Console.log(`${command}  (medians of ${args.repeats} rounds)`)
      yield* Console.log(
        `${"".padEnd(26)} ${"tok/s".padStart(6)} ${"decode".padStart(6)} ${"tokens".padStart(6)}  ` +
          "main thread: event-loop delay p50 / p99 / max, utilization; CPU ms/token main, process",
      )
      for (const name of names) {
        const r = report[name]
        yield* Console.log(
          `${SETUPS[name].padEnd(26)} ${r.tokensPerSecond.toFixed(0).padStart(6)} ` +
            `${r.decodeTokensPerSecond.toFixed(0).padStart(6)} ${String(r.tokens).padStart(6)}  ` +
            `${fmt(r.eventLoopDelayMs)}, ${(r.eventLoopUtilization * 100).toFixed(0)}%; ` +
            `${r.cpuMsPerToken.mainThread?.toFixed(3) ?? "-"}, ${r.cpuMsPerToken.process.toFixed(3)}`,
        )
      }
      yield* Console.log(`${"idle main thread".padEnd(48)}  ${fmt(idle)}`)
      yield* Console.log(
        `HTTP with the worker engine / in-process engine: x${ratio.toFixed(3)} tok/s, x${decodeRatio.toFixed(3)} ` +
          `decode tok/s (${ratio >= 0.9 ? "within" : "NOT within"} 10%)`,
      )
    }),
  )
