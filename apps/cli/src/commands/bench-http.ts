/**
 * `offramp bench-http`: the HTTP server's streaming throughput with the engine in a worker thread, against the
 * in-process engine's own throughput measured in the same run, and the main thread's event-loop delay and
 * utilization in each setup while the streams generate. The flags are defined here; the implementation
 * (handlers/bench-http.ts, which loads onnxruntime and the server) is imported when it runs.
 */
import { Command, Options } from "@effect/cli"
import { Effect } from "effect"
import { modelOption as model } from "../defaultModel.js"
import { kvCacheMb, threads } from "../engineOptions.js"

const clients = Options.integer("clients").pipe(
  Options.withDescription("concurrent streaming clients"),
  Options.withDefault(16),
)
const requests = Options.integer("requests").pipe(
  Options.withDescription("streams each client runs one after another in a measurement"),
  Options.withDefault(4),
)
const maxTokens = Options.integer("max-tokens").pipe(
  Options.withDescription("max_tokens of every stream"),
  Options.withDefault(128),
)
const repeats = Options.integer("repeats").pipe(
  Options.withDescription("rounds; every round runs each setup once, and medians are reported"),
  Options.withDefault(3),
)
const warmup = Options.integer("warmup").pipe(
  Options.withDescription("uncounted rounds before the measured ones (JIT, first-run allocations)"),
  Options.withDefault(3),
)
const CLIENTS = ["http", "fetch"] as const
export type Client = (typeof CLIENTS)[number]
const client = Options.choice("client", CLIENTS).pipe(
  Options.withDescription("the load generator's HTTP client: node:http with keep-alive, or fetch"),
  Options.withDefault("http" as Client),
)
const clientNice = Options.integer("client-nice").pipe(
  Options.withDescription(
    "the load generator thread's nice value (0-19; Linux): 0 lets it compete with the server for the CPU as equals",
  ),
  Options.withDefault(10),
)
const json = Options.boolean("json").pipe(Options.withDescription("print one JSON document"))

const flags = { model, clients, requests, maxTokens, repeats, warmup, client, clientNice, json, kvCacheMb, threads }

export type BenchHttpFlags = Command.Command.ParseConfig<typeof flags>

export const benchHttp = Command.make("bench-http", flags, (args) =>
  Effect.flatMap(
    Effect.promise(() => import("../handlers/bench-http.js")),
    (handler) => handler.handle(args),
  ),
).pipe(
  Command.withDescription(
    "HTTP streaming throughput with the engine in a worker thread against the in-process engine, with event-loop delay",
  ),
)
