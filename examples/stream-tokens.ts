/**
 * Streams tokens from the Engine in a host program, then the generation's early-exit summary.
 * Run: npm run demo (once, to convert the model), then npx tsx examples/stream-tokens.ts
 */
import { Engine } from "@offramp/core/Engine"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { Effect, Stream } from "effect"

const program = Effect.gen(function* () {
  const engine = yield* Engine
  yield* engine.generate({ prompt: "Once upon a time", maxTokens: 64 }).pipe(
    Stream.runForEach((token) =>
      Effect.sync(() => {
        process.stdout.write(token.text)
        // The last event sums up the generation's early exits.
        const summary = token.summary
        if (summary)
          process.stdout.write(
            `\n[${summary.tokens} tokens, mean exit depth ${summary.meanExitDepth.toFixed(2)} of ${summary.layers} layers]`,
          )
      }),
    ),
  )
  process.stdout.write("\n")
})

Effect.runPromise(program.pipe(Effect.provide(onnxEngineLayer(process.argv[2] ?? "build/stories260K"))))
