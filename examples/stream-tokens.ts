/**
 * Streams tokens from the Engine in a host program, with each token's exit layer, then the generation's figures.
 * Run: npx tsx --conditions=source examples/stream-tokens.ts [MODEL_DIR] (default: the embedded default model)
 */
import { Engine } from "@offramp/core"
import { modelDir } from "@offramp/default-model"
import * as Offramp from "@offramp/onnx/Offramp"
import { Console, Effect, Stream } from "effect"

const program = Engine.generate({ prompt: "Once upon a time", maxTokens: 64 }).pipe(
  Stream.tap((event) => Effect.sync(() => process.stdout.write(event.text))),
  Stream.runLast,
  Effect.flatMap((last) =>
    last._tag === "Some" && last.value.summary
      ? Console.log(`\nmean depth ${last.value.summary.meanExitDepth.toFixed(2)} of ${last.value.summary.layers}`)
      : Effect.void,
  ),
)

Effect.runPromise(program.pipe(Effect.provide(Offramp.layer({ model: process.argv[2] ?? modelDir }))))
