/**
 * `offramp generate`: streams the continuation of a prompt to stdout as it is generated.
 */
import { Command, Options } from "@effect/cli"
import { Engine, type TokenEvent } from "@offramp/core"
import { Console, Effect, Option, Stream } from "effect"
import { engineLayer } from "../ModelLayer.js"

const model = Options.directory("model").pipe(Options.withDescription("a staged model directory"))
const prompt = Options.text("prompt").pipe(Options.withDescription("the text to continue"))
const maxTokens = Options.integer("max-tokens").pipe(
  Options.withDescription("most tokens to generate"),
  Options.withDefault(256),
)
const temperature = Options.float("temperature").pipe(
  Options.withDescription("sampling temperature; 0 = greedy"),
  Options.withDefault(0.8),
)
const topP = Options.float("top-p").pipe(
  Options.withDescription("nucleus sampling; 1 = off"),
  Options.withDefault(0.95),
)
const topK = Options.integer("top-k").pipe(Options.withDescription("top-k sampling; 0 = off"), Options.withDefault(40))
const seed = Options.integer("seed").pipe(
  Options.withDescription("RNG seed, for reproducible sampling"),
  Options.optional,
)
const json = Options.boolean("json").pipe(Options.withDescription("print one JSON object per line"))

const write = (text: string) => Effect.sync(() => process.stdout.write(text))

export const generate = Command.make(
  "generate",
  { model, prompt, maxTokens, temperature, topP, topK, seed, json },
  (args) =>
    Effect.gen(function* () {
      const engine = yield* Engine
      const started = performance.now()
      let firstAt = 0
      let last: TokenEvent | undefined
      let count = 0
      const stream = engine.generate({
        prompt: args.prompt,
        maxTokens: args.maxTokens,
        sampling: {
          temperature: args.temperature,
          topP: args.topP,
          topK: args.topK,
          ...(Option.isSome(args.seed) ? { seed: args.seed.value } : {}),
        },
      })
      yield* Stream.runForEach(stream, (event) => {
        if (count++ === 0) firstAt = performance.now()
        last = event
        return args.json
          ? write(
              `${JSON.stringify({ type: "token", id: event.id, text: event.text, exitLayer: event.exitLayer, confidence: event.confidence })}\n`,
            )
          : write(event.text)
      })
      const ended = performance.now()
      // Decode rate: tokens after the first over the time after the first (prefill is reported separately).
      const tokensPerSecond = count > 1 ? ((count - 1) * 1000) / (ended - firstAt) : 0
      const summary = {
        type: "done",
        tokens: count,
        finishReason: last?.finishReason ?? "length",
        tokensPerSecond,
        timeToFirstTokenMs: firstAt - started,
      }
      if (args.json) yield* write(`${JSON.stringify(summary)}\n`)
      else {
        yield* write("\n")
        yield* Console.error(
          `[${count} tokens, ${tokensPerSecond.toFixed(0)} tokens/s, first token after ${summary.timeToFirstTokenMs.toFixed(1)} ms, finish: ${summary.finishReason}]`,
        )
      }
    }).pipe(Effect.provide(engineLayer(args.model))),
).pipe(Command.withDescription("generate a continuation of a prompt"))
