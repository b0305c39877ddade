/**
 * `offramp convert llama2c`: a llama2.c checkpoint + tokenizer → a staged model directory.
 */
import { basename } from "node:path"
import { Command, Options } from "@effect/cli"
import {
  readLlama2cCheckpoint,
  readLlama2cTokenizer,
  toHuggingFaceTokenizerJson,
  writeStagedModel,
} from "@offramp/convert"
import { InvalidRequestError } from "@offramp/core"
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

const checkpoint = Options.file("checkpoint", { exists: "yes" }).pipe(
  Options.withDescription("llama2.c checkpoint (legacy version-0 export, e.g. stories260K.bin)"),
)
const tokenizer = Options.file("tokenizer", { exists: "yes" }).pipe(
  Options.withDescription("llama2.c tokenizer (e.g. tok512.bin)"),
)
const out = Options.directory("out").pipe(Options.withDescription("output model directory (replaced if it exists)"))
const exits = Options.text("exits").pipe(
  Options.withDescription("early exits as layer counts, e.g. 1,2,3,4 (default: after every layer)"),
  Options.optional,
)

const llama2c = Command.make("llama2c", { checkpoint, tokenizer, out, exits }, (args) =>
  Effect.gen(function* () {
    const exitLayers = Option.isSome(args.exits) ? yield* parseExits(args.exits.value) : undefined
    const weights = yield* readLlama2cCheckpoint(args.checkpoint)
    const vocab = yield* readLlama2cTokenizer(args.tokenizer)
    const spec = yield* writeStagedModel(weights, args.out, {
      name: basename(args.checkpoint).replace(/\.bin$/, ""),
      source: `llama2.c checkpoint ${basename(args.checkpoint)}`,
      ...(exitLayers ? { exits: exitLayers } : {}),
      // llama2.c's run.c stops when it samples BOS again; EOS ends a text too.
      tokens: { bos: 1, eos: 2, stop: [1, 2] },
      tokenizer: toHuggingFaceTokenizerJson(vocab),
    })
    yield* Console.error(
      `wrote ${args.out}: ${spec.dims.layers} layers, exits after ${spec.exits.map((e) => e.layer).join(", ")}`,
    )
  }),
).pipe(Command.withDescription("convert a llama2.c checkpoint"))

export const convert = Command.make("convert").pipe(
  Command.withDescription("convert a checkpoint into Offramp's staged ONNX format"),
  Command.withSubcommands([llama2c]),
)
