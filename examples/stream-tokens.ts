/**
 * Streams tokens from the Engine in a host program, with each token's exit layer.
 * Run: npm run demo (once, to convert the model), then npx tsx examples/stream-tokens.ts
 */
import { Engine } from "@offramp/core/Engine"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { Effect, Stream } from "effect"

const program = Effect.gen(function* () {
  const engine = yield* Engine
  yield* engine
    .generate({ prompt: "Once upon a time", maxTokens: 64, sampling: { temperature: 0, topK: 0, topP: 1 } })
    .pipe(Stream.runForEach((token) => Effect.sync(() => process.stdout.write(token.text))))
  process.stdout.write("\n")
})

Effect.runPromise(program.pipe(Effect.provide(onnxEngineLayer(process.argv[2] ?? "build/stories260K"))))
