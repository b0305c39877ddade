/**
 * `offramp generate`: streams continuations of one or more prompts, run concurrently through the engine.
 */
import { readFile } from "node:fs/promises"
import { Command, Options } from "@effect/cli"
import { Engine, InvalidRequestError, type TokenEvent } from "@offramp/core"
import { onnxEngineLayer } from "@offramp/onnx"
import { Console, Effect, Option, Stream } from "effect"

const model = Options.directory("model").pipe(Options.withDescription("a staged model directory"))
const prompt = Options.text("prompt").pipe(
  Options.withDescription("a text to continue; repeat the flag for several prompts, run concurrently"),
  Options.repeated,
)
const promptsFile = Options.file("prompts", { exists: "yes" }).pipe(
  Options.withDescription("a file with one prompt per line"),
  Options.optional,
)
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

const readPrompts = (flags: ReadonlyArray<string>, file: Option.Option<string>) =>
  Effect.gen(function* () {
    const fromFile = Option.isSome(file)
      ? (yield* Effect.promise(() => readFile(file.value, "utf8"))).split("\n").filter((line) => line.trim() !== "")
      : []
    const prompts = [...flags, ...fromFile]
    if (prompts.length === 0) {
      return yield* new InvalidRequestError({ message: "give a prompt with --prompt TEXT or --prompts FILE" })
    }
    return prompts
  })

export const generate = Command.make(
  "generate",
  { model, prompt, promptsFile, maxTokens, temperature, topP, topK, seed, json },
  (args) =>
    Effect.gen(function* () {
      const engine = yield* Engine
      const prompts = yield* readPrompts(args.prompt, args.promptsFile)
      const single = prompts.length === 1
      const run = (text: string, request: number) =>
        Effect.gen(function* () {
          const started = performance.now()
          let firstAt = 0
          let last: TokenEvent | undefined
          let count = 0
          let output = ""
          const stream = engine.generate({
            prompt: text,
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
            if (args.json) {
              const line = { type: "token", ...(single ? {} : { request }), id: event.id, text: event.text }
              return write(`${JSON.stringify({ ...line, exitLayer: event.exitLayer, confidence: event.confidence })}\n`)
            }
            if (single) return write(event.text)
            output += event.text
            return Effect.void
          })
          const ended = performance.now()
          // Decode rate: tokens after the first over the time after the first (prefill is reported separately).
          const tokensPerSecond = count > 1 ? ((count - 1) * 1000) / (ended - firstAt) : 0
          const summary = {
            type: "done",
            ...(single ? {} : { request }),
            tokens: count,
            finishReason: last?.finishReason ?? "length",
            tokensPerSecond,
            timeToFirstTokenMs: firstAt - started,
          }
          if (args.json) return yield* write(`${JSON.stringify(summary)}\n`)
          if (!single) yield* write(`[${request}] ${text}${output}\n`)
          else yield* write("\n")
          yield* Console.error(
            `[${single ? "" : `request ${request}: `}${count} tokens, ${tokensPerSecond.toFixed(0)} tokens/s, first token after ${summary.timeToFirstTokenMs.toFixed(1)} ms, finish: ${summary.finishReason}]`,
          )
        })
      yield* Effect.forEach(prompts, run, { concurrency: "unbounded" })
    }).pipe(Effect.provide(onnxEngineLayer(args.model))),
).pipe(Command.withDescription("generate continuations of prompts"))
