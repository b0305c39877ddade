/**
 * The standalone server as a command: `offramp-http` (bin/offramp-http.js) and `offramp serve` in the CLI share
 * these flags and this handler. The handler's implementation (serve.ts: the engine and the server) is imported when
 * the command runs, so that this module, and `--help`, load neither.
 */
import { Command, Options } from "@effect/cli"
import { modelDir as DEFAULT_MODEL_DIR } from "@offramp/default-model"
import {
  DEFAULT_HOST,
  DEFAULT_MAX_BODY_BYTES,
  DEFAULT_MAX_QUEUED_SEQUENCES,
  DEFAULT_PORT,
} from "@offramp/server/Defaults"
import { Config, Effect, Option } from "effect"

export const API_KEY_ENV = "OFFRAMP_API_KEY"

export const serveFlags = {
  model: Options.directory("model").pipe(
    Options.withDescription("a staged model directory (default: the embedded model, models/default)"),
    Options.optional,
    Options.map(Option.getOrElse(() => DEFAULT_MODEL_DIR)),
  ),
  host: Options.text("host").pipe(
    Options.withDescription("address to listen on (0.0.0.0 for every interface)"),
    Options.withDefault(DEFAULT_HOST),
  ),
  port: Options.integer("port").pipe(
    Options.withDescription("TCP port; 0 picks a free one"),
    Options.withDefault(DEFAULT_PORT),
  ),
  allowedHosts: Options.text("allowed-host").pipe(
    Options.withDescription(
      "a Host header name (no port) accepted on loopback connections besides localhost and loopback addresses, e.g. a reverse proxy's name; repeatable; * accepts any",
    ),
    Options.repeated,
  ),
  servedModelName: Options.text("served-model-name").pipe(
    Options.withDescription("the model id clients send (default: the name in model.json)"),
    Options.optional,
  ),
  apiKey: Options.redacted("api-key").pipe(
    Options.withDescription(`require 'Authorization: Bearer KEY' on /v1 routes (or set ${API_KEY_ENV})`),
    Options.withFallbackConfig(Config.redacted(API_KEY_ENV)),
    Options.optional,
  ),
  maxBodyBytes: Options.integer("max-body-bytes").pipe(
    Options.withDescription("largest request body; larger ones get 413"),
    Options.withDefault(DEFAULT_MAX_BODY_BYTES),
  ),
  maxQueued: Options.integer("max-queued").pipe(
    Options.withDescription(
      "most sequences (prompts × n) waiting for their first token; more get 429, a request asking for more alone gets 400",
    ),
    Options.withDefault(DEFAULT_MAX_QUEUED_SEQUENCES),
  ),
  shutdownGrace: Options.float("shutdown-grace").pipe(
    Options.withDescription("seconds in-flight requests may run on after SIGTERM before their streams are ended"),
    Options.withDefault(10),
  ),
  stepDeadline: Options.float("step-deadline").pipe(
    Options.withDescription(
      "seconds one engine step may take before the engine worker counts as hung and is replaced (worker engine only)",
    ),
    Options.withDefault(30),
  ),
  kvCacheMb: Options.integer("kv-cache-mb").pipe(
    Options.withDescription("memory for the paged KV cache, in MiB (default 64)"),
    Options.optional,
  ),
  threads: Options.integer("threads").pipe(
    Options.withDescription("onnxruntime intra-op threads per session (default 1)"),
    Options.optional,
  ),
  maxRunning: Options.integer("max-running").pipe(
    Options.withDescription("most sequences the engine runs at once (default 64)"),
    Options.optional,
  ),
  maxRunningPerRequest: Options.integer("max-running-per-request").pipe(
    Options.withDescription(
      "most sequences of one request (its prompts × n) running at once, so that one request cannot take the whole batch (default a quarter of --max-running)",
    ),
    Options.optional,
  ),
  inProcess: Options.boolean("in-process").pipe(
    Options.withDescription(
      "run the engine on the main thread, not in a worker thread (onnxruntime then blocks the event loop during steps)",
    ),
  ),
}

export type ServeFlags = Command.Command.ParseConfig<typeof serveFlags>

/** The serve command under a name: "serve" in the offramp CLI, "offramp-http" standalone. */
export const serveCommand = (name: string) =>
  Command.make(name, serveFlags, (flags) =>
    Effect.flatMap(
      Effect.promise(() => import("./serve.js")),
      (serve) => serve.runServe(flags),
    ),
  ).pipe(Command.withDescription("serve a model over an OpenAI-compatible HTTP API"))
