/**
 * `offramp convert llama2c|hf`: a checkpoint → a staged model directory.
 */
import { readFile } from "node:fs/promises"
import { basename } from "node:path"
import { Command, Options } from "@effect/cli"
import { readHfCheckpoint } from "@offramp/convert/HfCheckpoint"
import { readLlama2cCheckpoint } from "@offramp/convert/Llama2cCheckpoint"
import { readLlama2cTokenizer, toHuggingFaceTokenizerJson } from "@offramp/convert/Llama2cTokenizer"
import { type WriteProgress, writeStagedModel } from "@offramp/convert/StagedModelWriter"
import { DEFAULT_BLOCK_SIZE, type WeightFormat } from "@offramp/convert/WeightFormat"
import { CheckpointError, InvalidRequestError, TokenizerError } from "@offramp/core/Errors"
import * as HfTokenizer from "@offramp/tokenizer/HfTokenizer"
import { Console, Effect, Option } from "effect"

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

const out = Options.directory("out").pipe(Options.withDescription("output model directory (replaced if it exists)"))
const exits = Options.text("exits").pipe(
  Options.withDescription(
    "early exits as layer counts, e.g. 1,2,3,4 (default: after every layer); the layer count alone: no early exits",
  ),
  Options.optional,
)

const checkpoint = Options.file("checkpoint", { exists: "yes" }).pipe(
  Options.withDescription("llama2.c checkpoint (legacy version-0 export, e.g. stories260K.bin)"),
)
const tokenizer = Options.file("tokenizer", { exists: "yes" }).pipe(
  Options.withDescription("llama2.c tokenizer (e.g. tok512.bin)"),
)

const llama2c = Command.make("llama2c", { checkpoint, tokenizer, out, exits }, (args) =>
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
  }),
).pipe(Command.withDescription("convert a llama2.c checkpoint"))

const dir = Options.directory("dir", { exists: "yes" }).pipe(
  Options.withDescription("Hugging Face checkpoint directory: config.json, *.safetensors, tokenizer.json"),
)
const dtype = Options.choice("dtype", ["fp32", "fp16"]).pipe(
  Options.withDescription("storage of float weights; fp16 halves the files, compute stays fp32"),
  Options.withDefault("fp32" as const),
)
const quantize = Options.choice("quantize", ["int8", "int4"]).pipe(
  Options.withDescription("block-quantize the attention, MLP and LM-head weights (onnxruntime MatMulNBits)"),
  Options.optional,
)
const blockSize = Options.integer("block-size").pipe(
  Options.withDescription(`quantization block along the input dimension (power of two ≥ 16)`),
  Options.withDefault(DEFAULT_BLOCK_SIZE),
)
const symmetric = Options.boolean("symmetric").pipe(
  Options.withDescription("quantize without zero points (default: one zero point per block)"),
)
const accuracyLevel = Options.choice("accuracy-level", ["0", "1", "2", "3", "4"]).pipe(
  Options.withDescription(
    "MatMulNBits accuracy_level: 4 (default) quantizes activations to int8 and runs integer dot products, the fastest " +
      "here (see BENCHMARKS.md); 0 computes in float32",
  ),
  Options.withDefault("4" as const),
)
const context = Options.integer("context").pipe(
  Options.withDescription("context length of the converted model (default: max_position_embeddings)"),
  Options.optional,
)
const hfTokenizer = Options.file("tokenizer", { exists: "yes" }).pipe(
  Options.withDescription("tokenizer.json to use (default: the one in --dir)"),
  Options.optional,
)

const readJsonFile = (path: string) =>
  Effect.tryPromise({
    try: async () => JSON.parse(await readFile(path, "utf8")) as unknown,
    catch: (e) => new CheckpointError({ path, message: `cannot read the tokenizer: ${(e as Error).message}` }),
  })

const hf = Command.make(
  "hf",
  { dir, out, exits, dtype, quantize, blockSize, symmetric, accuracyLevel, context, tokenizer: hfTokenizer },
  (args) =>
    Effect.gen(function* () {
      const exitLayers = Option.isSome(args.exits) ? yield* parseExits(args.exits.value) : undefined
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
    }),
).pipe(Command.withDescription("convert a Hugging Face Llama checkpoint (config.json + safetensors)"))

export const convert = Command.make("convert").pipe(
  Command.withDescription("convert a checkpoint into Offramp's staged ONNX format"),
  Command.withSubcommands([llama2c, hf]),
)
