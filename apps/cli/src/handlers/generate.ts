/**
 * `offramp generate`, implemented (commands/generate.ts defines its flags and imports this when it runs): streams
 * continuations of one or more prompts, run concurrently through the engine.
 */
import { readFile } from "node:fs/promises"
import type { EarlyExitParams, EarlyExitRequest } from "@offramp/core/EarlyExit"
import { Engine } from "@offramp/core/Engine"
import { InvalidRequestError } from "@offramp/core/Errors"
import type { TokenEvent } from "@offramp/core/Generation"
import { speculativeDefaults } from "@offramp/core/Speculation"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { Console, Effect, Layer, Option, Stream } from "effect"
import type { GenerateFlags } from "../commands/generate.js"
import { engineConfig } from "../engineOptions.js"

/** The early-exit flags that were given, over the engine defaults (calibration.json, else full depth). */
const earlyExitFlags = (flags: {
  threshold: Option.Option<number>
  measure: Option.Option<EarlyExitParams["measure"]>
  policy: Option.Option<EarlyExitParams["policy"]>
  kv: Option.Option<EarlyExitParams["kv"]>
  minExitLayer: Option.Option<number>
  confirm: Option.Option<number>
}): EarlyExitRequest | undefined => {
  const options: Record<string, Option.Option<unknown>> = flags
  const given = Object.fromEntries(
    Object.entries(options).flatMap(([key, value]) => (Option.isSome(value) ? [[key, value.value]] : [])),
  )
  return Object.keys(given).length > 0 ? (given as EarlyExitRequest) : undefined
}

/** Dims a token by how early it exited (ANSI faint for the shallowest exits), on a terminal only. */
const shade = (text: string, exitLayer: number, layers: number) =>
  exitLayer >= layers || text === "" ? text : `\x1b[${exitLayer <= layers / 2 ? 2 : 36}m${text}\x1b[0m`

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

export const handle = (args: GenerateFlags) =>
  Effect.gen(function* () {
    const engine = yield* Engine
    const prompts = yield* readPrompts(args.prompt, args.promptsFile)
    const single = prompts.length === 1
    const earlyExit = earlyExitFlags(args)
    const layers = engine.spec.dims.layers
    const speculating =
      args.speculate ||
      Option.isSome(args.draftExit) ||
      Option.isSome(args.maxDraft) ||
      Option.isSome(args.draftThreshold)
    const given = {
      ...(Option.isSome(args.draftExit) ? { exit: args.draftExit.value } : {}),
      ...(Option.isSome(args.maxDraft) ? { maxDraft: args.maxDraft.value } : {}),
      ...(Option.isSome(args.draftThreshold) ? { threshold: args.draftThreshold.value } : {}),
    }
    const speculative = speculating ? speculativeDefaults(engine.spec, given) : undefined
    if (speculating && speculative === undefined) {
      return yield* new InvalidRequestError({ message: "--speculate needs a model with an early exit to draft with" })
    }
    const colour = single && !args.json && process.stdout.isTTY
    const run = (text: string, request: number) =>
      Effect.gen(function* () {
        const started = performance.now()
        let firstAt = 0
        let last: TokenEvent | undefined
        let count = 0
        let output = ""
        let depth = 0
        const stream = engine.generate({
          prompt: text,
          maxTokens: args.maxTokens,
          sampling: {
            temperature: args.temperature,
            topP: args.topP,
            topK: args.topK,
            // Each prompt draws from its own stream of the seed.
            ...(Option.isSome(args.seed) ? { seed: args.seed.value, stream: request } : {}),
          },
          ...(earlyExit ? { earlyExit } : {}),
          ...(speculative ? { speculative } : {}),
        })
        yield* Stream.runForEach(stream, (event) => {
          if (count++ === 0) firstAt = performance.now()
          last = event
          depth += event.exitLayer
          if (args.json) {
            const line = { type: "token", ...(single ? {} : { request }), id: event.id, text: event.text }
            return write(`${JSON.stringify({ ...line, exitLayer: event.exitLayer, confidence: event.confidence })}\n`)
          }
          if (single) return write(colour ? shade(event.text, event.exitLayer, layers) : event.text)
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
          meanExitDepth: count > 0 ? depth / count : 0,
          layersSkipped: count * layers - depth,
        }
        if (args.json) return yield* write(`${JSON.stringify(summary)}\n`)
        if (!single) yield* write(`[${request}] ${text}${output}\n`)
        else yield* write("\n")
        yield* Console.error(
          `[${single ? "" : `request ${request}: `}${count} tokens, ${tokensPerSecond.toFixed(0)} tokens/s, ` +
            `first token after ${summary.timeToFirstTokenMs.toFixed(1)} ms, mean exit depth ` +
            `${summary.meanExitDepth.toFixed(2)}/${layers} (${summary.layersSkipped} layers skipped), finish: ${summary.finishReason}]`,
        )
      })
    yield* Effect.forEach(prompts, run, { concurrency: "unbounded" })
    if (speculative && !args.json) {
      const { speculative: s } = yield* engine.stats
      yield* Console.error(
        `[speculative: draft exit ${speculative.exit}, ${s.drafted} tokens drafted, ${((100 * s.accepted) / Math.max(1, s.drafted)).toFixed(0)}% accepted, ${(s.kept / Math.max(1, s.verifications)).toFixed(2)} tokens per verification]`,
      )
    }
  }).pipe(
    Effect.provide(Layer.unwrapEffect(Effect.map(engineConfig(args), (config) => onnxEngineLayer(args.model, config)))),
  )
