/**
 * Serving the API: `serve` on whatever HttpServer the host provides, `layerNode` on a node:http server.
 *
 * Shutdown (the layer's scope closes, e.g. on SIGTERM under NodeRuntime.runMain) is graceful: new generation
 * requests get 503 (and /health says draining) while in-flight ones finish, for up to `shutdownGrace`; streams still
 * open then end with an error event and `data: [DONE]`; then the listener closes and the engine stops. The grace is
 * enforced although the drain runs in a finalizer (see OpenAiServer's shutdown).
 */
import { createServer } from "node:http"
import * as HttpServer from "@effect/platform/HttpServer"
import * as NodeHttpServer from "@effect/platform-node/NodeHttpServer"
import { type Duration, Effect, Layer, Schema } from "effect"
import { DEFAULT_HOST, DEFAULT_PORT } from "./Defaults.js"
import { OpenAiServer } from "./OpenAiServer.js"
import { OpenAiApp } from "./Router.js"

export interface ServeOptions {
  /** How long in-flight requests may run on after shutdown begins (default 10 seconds). */
  readonly shutdownGrace?: Duration.DurationInput
}

export const DEFAULT_SHUTDOWN_GRACE = "10 seconds"

/** Serves `OpenAiApp` on the HttpServer in context. */
export const serve = (options: ServeOptions = {}): Layer.Layer<never, never, HttpServer.HttpServer | OpenAiServer> =>
  Layer.scopedDiscard(
    Effect.gen(function* () {
      const server = yield* OpenAiServer
      yield* HttpServer.serveEffect(OpenAiApp)
      // Finalizers run in reverse: this drain runs first, while the listener still answers (with 503s).
      yield* Effect.addFinalizer(() => server.shutdown(options.shutdownGrace ?? DEFAULT_SHUTDOWN_GRACE))
    }),
  )

export interface ListenOptions extends ServeOptions {
  /** Default 127.0.0.1 (loopback only). */
  readonly host?: string
  /** Default 8000; 0 picks a free port (read it from HttpServer's address). */
  readonly port?: number
}

export { DEFAULT_HOST, DEFAULT_PORT }

/** The server cannot listen on its address: the port is taken, out of range or privileged, or the host is not here. */
export class ListenError extends Schema.TaggedError<ListenError>()("ListenError", {
  host: Schema.String,
  port: Schema.Number,
  message: Schema.String,
}) {}

const MAX_PORT = 65535

/** What went wrong, from node's listen error code. */
const listenProblem = (host: string, port: number, cause: unknown): string => {
  const code = typeof cause === "object" && cause !== null && "code" in cause ? String(cause.code) : undefined
  switch (code) {
    case "EADDRINUSE":
      return `port ${port} is in use on ${host}; choose another port`
    case "EACCES":
      return `no permission to listen on port ${port} of ${host} (ports below 1024 need privileges); choose another port`
    case "EADDRNOTAVAIL":
    case "ENOTFOUND":
    case "EAI_AGAIN":
      return `cannot listen on ${host}: it is not an address of this machine`
    default:
      return `cannot listen on ${host}:${port}: ${cause instanceof Error ? cause.message : String(cause)}`
  }
}

/** Serves the API on a node:http server; the HttpServer stays visible so callers can read the bound address. */
export const layerNode = (options: ListenOptions = {}) => {
  const host = options.host ?? DEFAULT_HOST
  const port = options.port ?? DEFAULT_PORT
  // node's listen throws on a port out of range, which would be a defect.
  const listener = Layer.unwrapEffect(
    Effect.gen(function* () {
      if (!Number.isInteger(port) || port < 0 || port > MAX_PORT) {
        return yield* new ListenError({
          host,
          port,
          message: `the port must be an integer in 0..${MAX_PORT}, got ${port}`,
        })
      }
      return NodeHttpServer.layer(() => createServer(), { host, port })
    }),
  ).pipe(
    Layer.mapError((error) =>
      error._tag === "ListenError"
        ? error
        : new ListenError({ host, port, message: listenProblem(host, port, error.cause) }),
    ),
  )
  return serve(options).pipe(Layer.provideMerge(listener))
}
