// A host program on Offramp's packages, as installed from npm tarballs (see README.md). Plain JavaScript ES modules:
// every name below is typed in the packages' declarations, so an editor shows the fields as you type.
import { Engine, Errors } from "@offramp/core"
import { modelDir } from "@offramp/default-model"
import { Offramp } from "@offramp/onnx"
import { Chunk, Console, Effect, Schedule, Stream } from "effect"

// One story, streamed as it is generated. Greedy unless told otherwise; the model's calibrated early exit applies.
const story = Engine.generate({ prompt: "Once upon a time", maxTokens: 48 }).pipe(
  Stream.tap((event) => Effect.sync(() => process.stdout.write(event.text))),
  Stream.runLast,
  // The last event of a sample carries the generation's early-exit figures.
  Effect.flatMap((last) => {
    const summary = last._tag === "Some" ? last.value.summary : undefined
    if (summary === undefined) return Effect.dieMessage("the last event carries no summary")
    return Console.log(
      `\n\n${summary.tokens} tokens, mean depth ${summary.meanExitDepth.toFixed(2)} of ${summary.layers} layers, ` +
        `${summary.layersSkipped} layers skipped, exits ${JSON.stringify(summary.exitHistogram)}`,
    )
  }),
)

// Two generations at once, merged into one stream (the engine batches them), each tagged with its name; the pair
// must finish within 30 seconds, and a generation the engine dropped (a restarted worker) is retried twice.
const generation = (name, prompt) =>
  Engine.generate({ prompt, maxTokens: 24, sampling: { temperature: 0.8, topP: 0.95, seed: 7 } }).pipe(
    Stream.map((event) => ({ name, text: event.text })),
  )
const pair = Stream.merge(generation("a", "The little dog"), generation("b", "The old king")).pipe(
  Stream.runCollect,
  Effect.timeout("30 seconds"),
  Effect.retry({ schedule: Schedule.recurs(2), while: (error) => error._tag === "EngineStoppedError" }),
  Effect.flatMap((events) => {
    const text = (name) =>
      Chunk.toArray(events)
        .filter((e) => e.name === name)
        .map((e) => e.text)
        .join("")
    return Console.log(`a: The little dog${text("a")}\nb: The old king${text("b")}`)
  }),
)

// A request the engine refuses fails with a typed error, caught by its tag.
const refused = Engine.generate({ prompt: "Hello", maxTokens: 0 }).pipe(
  Stream.runDrain,
  Effect.as("accepted"),
  Effect.catchTag("InvalidRequestError", (error) => Effect.succeed(`refused: ${error.message}`)),
  Effect.flatMap(Console.log),
)

const program = Effect.gen(function* () {
  yield* story
  yield* pair
  yield* refused
})

program.pipe(
  Effect.provide(Offramp.layer({ model: modelDir })),
  Effect.catchAll((error) =>
    // Loading errors (a model directory that is missing or inconsistent) are typed too.
    Console.error(
      error instanceof Errors.ModelLoadError ? `cannot load ${error.path}: ${error.message}` : String(error),
    ).pipe(Effect.zipRight(Effect.sync(() => (process.exitCode = 1)))),
  ),
  Effect.runPromise,
)
