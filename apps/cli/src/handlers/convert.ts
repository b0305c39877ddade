/**
 * `offramp convert llama2c|hf`: a checkpoint → a staged model directory. Implemented here; commands/convert.ts
 * defines the flags and imports this when a subcommand runs.
 */
import { readFile } from "node:fs/promises"
import { basename } from "node:path"
import { readHfCheckpoint } from "@offramp/convert/HfCheckpoint"
import { readLlama2cCheckpoint } from "@offramp/convert/Llama2cCheckpoint"
import { readLlama2cTokenizer, toHuggingFaceTokenizerJson } from "@offramp/convert/Llama2cTokenizer"
import { type WriteProgress, writeStagedModel } from "@offramp/convert/StagedModelWriter"
import type { WeightFormat } from "@offramp/convert/WeightFormat"
import { CheckpointError, InvalidRequestError, TokenizerError } from "@offramp/core/Errors"
import * as HfTokenizer from "@offramp/tokenizer/HfTokenizer"
import { Console, Effect, Option } from "effect"
import type { HfFlags, Llama2cFlags } from "../commands/convert.js"

/** Parses "1,2,3" into exit layers. */
export const parseExits = (text: string): Effect.Effect<ReadonlyArray<number>, InvalidRequestError> => {
  const parts = text.split(",").map((p) => p.trim())
  const exits = parts.map(Number)
  return exits.every((e, i) => parts[i] !== "" && Number.isInteger(e))
    ? Effect.succeed(exits)
    : Effect.fail(
        new InvalidRequestError({ message: `--exits takes comma-separated layer numbers, like 1,2,3; got "${text}"` }),
      )
}

/**
 * Progress on stderr: a bar redrawn in place on a terminal; otherwise plain lines, one per finished layer span,
 * so logs stay readable.
 */
const progressReporter = () => {
  const tty = process.stderr.isTTY === true
  const width = 24
  let drawn = false
  const bar = (done: number, total: number, label: string) => {
    const filled = total === 0 ? width : Math.round((done / total) * width)
    const line = `[${"#".repeat(filled)}${".".repeat(width - filled)}] ${label}`
    const columns = process.stderr.columns || 120 // 0 under some pseudo-terminals
    process.stderr.write(`\r${line.slice(0, columns - 1)}\x1b[K`)
    drawn = true
  }
  const end = () => {
    if (drawn) process.stderr.write("\n")
    drawn = false
  }
  let lastLayers = 0
  return {
    tensor: (done: number, total: number) => {
      if (tty) bar(done, total, `reading tensors ${done}/${total}`)
      else if (done === total) process.stderr.write(`read ${total} tensors\n`)
      if (tty && done === total) end()
    },
    write: (p: WriteProgress) => {
      if (tty) {
        bar(p.filesDone, p.files, `layers ${p.layersDone}/${p.layers}  files ${p.filesDone}/${p.files}  ${p.file}`)
        if (p.filesDone === p.files) end()
      } else if (p.layersDone > lastLayers) {
        const span = p.layersDone === lastLayers + 1 ? `${p.layersDone}` : `${lastLayers + 1}-${p.layersDone}`
        process.stderr.write(
          `wrote layer${p.layersDone === lastLayers + 1 ? "" : "s"} ${span} of ${p.layers} (${p.file})\n`,
        )
        lastLayers = p.layersDone
      }
    },
    end,
  }
}

export const llama2c = (args: Llama2cFlags) =>
  Effect.gen(function* () {
    const exitLayers = Option.isSome(args.exits) ? yield* parseExits(args.exits.value) : undefined
    const weights = yield* readLlama2cCheckpoint(args.checkpoint)
    const vocab = yield* readLlama2cTokenizer(args.tokenizer)
    const progress = progressReporter()
    const spec = yield* writeStagedModel(weights, args.out, {
      name: basename(args.checkpoint).replace(/\.bin$/, ""),
      source: `llama2.c checkpoint ${basename(args.checkpoint)}`,
      ...(exitLayers ? { exits: exitLayers } : {}),
      // llama2.c's run.c stops when it samples BOS again; EOS ends a text too.
      tokens: { bos: 1, eos: 2, stop: [1, 2] },
      tokenizer: toHuggingFaceTokenizerJson(vocab),
      onProgress: progress.write,
    }).pipe(Effect.ensuring(Effect.sync(progress.end)))
    yield* Console.error(
      `wrote ${args.out}: ${spec.dims.layers} layers, exits after ${spec.exits.map((e) => e.layer).join(", ")}`,
    )
  })

const readJsonFile = (path: string) =>
  Effect.tryPromise({
    try: async () => JSON.parse(await readFile(path, "utf8")) as unknown,
    catch: (e) => new CheckpointError({ path, message: `cannot read the tokenizer: ${(e as Error).message}` }),
  })

export const hf = (args: HfFlags) =>
  Effect.gen(function* () {
    const exitLayers = Option.isSome(args.exits) ? yield* parseExits(args.exits.value) : undefined
    if (args.embedding === "quantized" && Option.isNone(args.quantize)) {
      return yield* new InvalidRequestError({
        message: "--embedding quantized quantizes the table like the MatMul weights: add --quantize int8 or int4",
      })
    }
    const progress = progressReporter()
    const model = yield* readHfCheckpoint(args.dir, {
      ...(Option.isSome(args.context) ? { contextLength: args.context.value } : {}),
      onTensor: progress.tensor,
    }).pipe(Effect.ensuring(Effect.sync(progress.end)))
    const tokenizerJson = Option.isSome(args.tokenizer) ? yield* readJsonFile(args.tokenizer.value) : model.tokenizer
    if (tokenizerJson === undefined) {
      return yield* new CheckpointError({
        path: args.dir,
        message: "no tokenizer.json in the checkpoint directory; pass one with --tokenizer",
      })
    }
    // The runner loads it with @huggingface/tokenizers: refuse one that would fail there, or emit unknown ids.
    const config = model.tokenizerConfig
    const loaded = yield* HfTokenizer.fromJson(
      tokenizerJson,
      typeof config === "object" && config !== null && !Array.isArray(config) ? config : undefined,
    )
    if (loaded.vocabSize > model.weights.config.vocab) {
      return yield* new TokenizerError({
        message: `the tokenizer has ${loaded.vocabSize} tokens but the model's vocab_size is ${model.weights.config.vocab}`,
      })
    }
    const weights: WeightFormat = {
      float: args.dtype === "fp16" ? "float16" : "float32",
      ...(Option.isSome(args.quantize)
        ? {
            quantization: {
              bits: args.quantize.value === "int8" ? 8 : 4,
              blockSize: args.blockSize,
              symmetric: args.symmetric,
              accuracyLevel: Number(args.accuracyLevel) as 0 | 1 | 2 | 3 | 4,
            },
            embedding: args.embedding,
          }
        : {}),
    }
    const chosenExits = exitLayers ?? model.exits
    const spec = yield* writeStagedModel(model.weights, args.out, {
      name: model.name,
      source: model.source,
      ...(chosenExits ? { exits: chosenExits } : {}),
      tokens: model.tokens,
      tokenizer: tokenizerJson,
      ...(loaded.vocabSize < model.weights.config.vocab ? { tokenizerTokens: loaded.vocabSize } : {}),
      ...(config !== undefined ? { tokenizerConfig: config } : {}),
      weights,
      onProgress: progress.write,
    }).pipe(Effect.ensuring(Effect.sync(progress.end)))
    const storage = spec.weights ? `, weights ${spec.weights.matmul} (embedding ${spec.weights.embedding})` : ""
    yield* Console.error(
      `wrote ${args.out}: ${spec.dims.layers} layers, exits after ${spec.exits.map((e) => e.layer).join(", ")}, ` +
        `${spec.headKind} heads${storage}`,
    )
  })
