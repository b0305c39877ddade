/**
 * Mounts Offramp's OpenAI-compatible router into an existing @effect/platform HTTP app, next to the app's own
 * route: the API answers under /openai (an OpenAI client uses baseURL http://HOST:PORT/openai/v1).
 *
 * Run: npx tsx --conditions=source examples/mount-router.ts [MODEL_DIR] [--serve]
 * Without --serve it asks both routes once, prints the answers and exits; with it, it keeps serving on port 8000.
 */
import { createServer } from "node:http"
import * as HttpMiddleware from "@effect/platform/HttpMiddleware"
import * as HttpRouter from "@effect/platform/HttpRouter"
import * as HttpServer from "@effect/platform/HttpServer"
import * as HttpServerResponse from "@effect/platform/HttpServerResponse"
import * as NodeHttpServer from "@effect/platform-node/NodeHttpServer"
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import { modelDir as defaultModelDir } from "@offramp/default-model"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { OpenAiServer } from "@offramp/server/OpenAiServer"
import { OpenAiRouter } from "@offramp/server/Router"
import { Console, Effect, Layer } from "effect"

const modelDir = process.argv[2] ?? defaultModelDir
const keepServing = process.argv.includes("--serve")

// The host app: its own routes, with the OpenAI API mounted under a prefix.
const app = HttpRouter.empty.pipe(
  HttpRouter.get("/hello", HttpServerResponse.text("hello from the host app\n")),
  HttpRouter.mount("/openai", OpenAiRouter),
)

const ServerLive = HttpServer.serve(app, HttpMiddleware.logger).pipe(
  HttpServer.withLogAddress,
  Layer.provideMerge(NodeHttpServer.layer(createServer, { host: "127.0.0.1", port: keepServing ? 8000 : 0 })),
  // What the mounted router needs: the OpenAiServer service over an engine.
  Layer.provide(OpenAiServer.fromModelDirectory(modelDir)),
  Layer.provide(onnxEngineLayer(modelDir)),
)

/** Asks the host route and the mounted API once, as a client would. */
const demo = Effect.gen(function* () {
  const server = yield* HttpServer.HttpServer
  if (server.address._tag !== "TcpAddress") return
  const base = `http://127.0.0.1:${server.address.port}`
  const hello = yield* Effect.promise(() => fetch(`${base}/hello`).then((r) => r.text()))
  yield* Console.log(`GET /hello → ${hello.trim()}`)
  const completion = yield* Effect.promise(() =>
    fetch(`${base}/openai/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ prompt: "Once upon a time", max_tokens: 24, temperature: 0 }),
    }).then((r) => r.json() as Promise<{ choices: Array<{ text: string }> }>),
  )
  yield* Console.log(`POST /openai/v1/completions → ${JSON.stringify(completion.choices[0].text)}`)
})

const main = keepServing ? Layer.launch(ServerLive) : demo.pipe(Effect.provide(ServerLive))

NodeRuntime.runMain(main)
