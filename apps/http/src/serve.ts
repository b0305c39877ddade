/**
 * The server command's handler: command.ts defines the flags of `offramp-http` (bin/offramp-http.js) and
 * `offramp serve` in the CLI, and imports this module when the command runs, so that `--help` does not load the
 * engine and the server.
 */
import * as HttpServer from "@effect/platform/HttpServer"
import { InvalidRequestError } from "@offramp/core/Errors"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import * as WorkerEngine from "@offramp/onnx/WorkerEngine"
import { OpenAiServer } from "@offramp/server/OpenAiServer"
import { ListenError, layerNode } from "@offramp/server/Serve"
import { Config, ConfigError, Console, Effect, Either, Layer, Option, Redacted } from "effect"
import type { ServeFlags as Flags } from "./command.js"

/**
 * Test-only: `KIND:N` makes the first engine worker exit, throw or hang (KIND exit, throw or hang) after it sent N
 * batches of token events, so that tests can check supervision and shutdown in a real server process.
 */
export const TEST_FAULT_ENV = "OFFRAMP_TEST_ENGINE_FAULT"

const testFault = Config.string(TEST_FAULT_ENV).pipe(
  Config.mapOrFail((text) => {
    const match = /^(exit|throw|hang):(\d+)$/.exec(text)
    return match
      ? Either.right({ kind: match[1] as WorkerEngine.TestFault["kind"], afterBatches: Number(match[2]) })
      : Either.left(ConfigError.InvalidData([], `expected exit:N, throw:N or hang:N, got ${JSON.stringify(text)}`))
  }),
  Config.option,
)

const positive = (flag: string, value: number) =>
  Number.isInteger(value) && value > 0
    ? Effect.void
    : Effect.fail(new InvalidRequestError({ message: `--${flag} must be a positive integer, got ${value}` }))

const engineConfig = (flags: Flags): WorkerEngine.WorkerEngineConfig => ({
  runner: {
    ...Option.match(flags.kvCacheMb, { onNone: () => ({}), onSome: (mb) => ({ kvCacheBytes: mb * 1024 * 1024 }) }),
    ...Option.match(flags.threads, { onNone: () => ({}), onSome: (threads) => ({ threads }) }),
  },
  scheduler: {
    ...Option.match(flags.maxRunning, { onNone: () => ({}), onSome: (maxRunning) => ({ maxRunning }) }),
    ...Option.match(flags.maxRunningPerRequest, {
      onNone: () => ({}),
      onSome: (maxRunningPerGroup) => ({ maxRunningPerGroup }),
    }),
  },
})

/** How often a server started by npm checks that its parent is still there. */
const ORPHAN_CHECK_INTERVAL_MS = 500

/**
 * Under npm (`npx offramp serve`, `npm exec`, `npm run`) a SIGTERM to npm ends npm and the shell it runs the command
 * in, not this process, which would serve on as an orphan. So a server that npm started (npm_command is set) and
 * whose parent goes away (its parent pid changes: it was adopted by init or a subreaper) sends itself SIGTERM and
 * shuts down gracefully. Outside npm nothing is watched: `nohup offramp serve &` must outlive its shell.
 */
const shutdownWhenOrphaned = Layer.scopedDiscard(
  Effect.acquireRelease(
    Effect.sync(() => {
      const parent = process.ppid
      const timer = setInterval(() => {
        if (process.ppid === parent) return
        clearInterval(timer)
        process.kill(process.pid, "SIGTERM")
      }, ORPHAN_CHECK_INTERVAL_MS)
      timer.unref()
      return timer
    }),
    (timer) => Effect.sync(() => clearInterval(timer)),
  ),
)

/** Serves the model until interrupted (SIGINT/SIGTERM under NodeRuntime.runMain), then shuts down gracefully. */
export const runServe = (flags: Flags) =>
  Effect.gen(function* () {
    if (!Number.isInteger(flags.port) || flags.port < 0 || flags.port > 65535) {
      return yield* new InvalidRequestError({ message: `--port must be in 0..65535, got ${flags.port}` })
    }
    yield* positive("max-body-bytes", flags.maxBodyBytes)
    yield* positive("max-queued", flags.maxQueued)
    if (Option.isSome(flags.kvCacheMb)) yield* positive("kv-cache-mb", flags.kvCacheMb.value)
    if (Option.isSome(flags.threads)) yield* positive("threads", flags.threads.value)
    if (Option.isSome(flags.maxRunning)) yield* positive("max-running", flags.maxRunning.value)
    if (Option.isSome(flags.maxRunningPerRequest))
      yield* positive("max-running-per-request", flags.maxRunningPerRequest.value)
    if (!(flags.shutdownGrace >= 0)) {
      return yield* new InvalidRequestError({
        message: `--shutdown-grace must be >= 0 seconds, got ${flags.shutdownGrace}`,
      })
    }
    if (!(flags.stepDeadline > 0)) {
      return yield* new InvalidRequestError({
        message: `--step-deadline must be > 0 seconds, got ${flags.stepDeadline}`,
      })
    }
    const fault = yield* testFault
    const apiKey = Option.map(flags.apiKey, (key) => Redacted.value(key))
    const api = OpenAiServer.fromModelDirectory(flags.model, {
      maxBodyBytes: flags.maxBodyBytes,
      maxQueuedSequences: flags.maxQueued,
      allowedHosts: flags.allowedHosts,
      ...(Option.isSome(flags.servedModelName) ? { model: flags.servedModelName.value } : {}),
      ...(Option.isSome(apiKey) ? { apiKey: apiKey.value } : {}),
    })
    const announce = Layer.scopedDiscard(
      Effect.gen(function* () {
        const server = yield* OpenAiServer
        yield* HttpServer.addressFormattedWith((address) =>
          Console.error(
            `offramp: serving ${server.model} at ${address}${Option.isSome(apiKey) ? " (API key required)" : ""}`,
          ),
        )
        yield* Effect.addFinalizer(() => Console.error("offramp: shutting down"))
      }),
    )
    const app = announce.pipe(
      Layer.provideMerge(
        layerNode({ host: flags.host, port: flags.port, shutdownGrace: `${flags.shutdownGrace} seconds` }),
      ),
      Layer.provideMerge(api),
      Layer.provide(
        flags.inProcess
          ? onnxEngineLayer(flags.model, engineConfig(flags))
          : WorkerEngine.layer(flags.model, engineConfig(flags), {
              stepDeadline: `${flags.stepDeadline} seconds`,
              ...(Option.isSome(fault) ? { testFault: fault.value } : {}),
            }),
      ),
    )
    return yield* Layer.launch(
      process.env.npm_command === undefined ? app : Layer.merge(app, shutdownWhenOrphaned),
    ).pipe(
      Effect.catchTag("ListenError", (error) =>
        Effect.fail(
          new ListenError({ host: error.host, port: error.port, message: `${error.message} (--host, --port)` }),
        ),
      ),
    )
  })
