/**
 * `offramp convert llama2c|hf`: a checkpoint → a staged model directory. The flags are defined here; the
 * implementation (handlers/convert.ts, which loads onnx-proto and the tokenizers) is imported when a subcommand runs.
 */
import { Command, Options } from "@effect/cli"
import { DEFAULT_BLOCK_SIZE } from "@offramp/convert/WeightFormat"
import { Effect } from "effect"

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

const llama2cFlags = { checkpoint, tokenizer, out, exits }

export type Llama2cFlags = Command.Command.ParseConfig<typeof llama2cFlags>

const llama2c = Command.make("llama2c", llama2cFlags, (args) =>
  Effect.flatMap(
    Effect.promise(() => import("../handlers/convert.js")),
    (handler) => handler.llama2c(args),
  ),
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
const embedding = Options.choice("embedding", ["float", "quantized"]).pipe(
  Options.withDescription(
    "with --quantize: the embedding table in --dtype floats (default), or quantized like the MatMul weights (a tied " +
      "embedding then shares the LM head's quantized rows; see BENCHMARKS.md for what it costs)",
  ),
  Options.withDefault("float" as const),
)
const context = Options.integer("context").pipe(
  Options.withDescription("context length of the converted model (default: max_position_embeddings)"),
  Options.optional,
)
const hfTokenizer = Options.file("tokenizer", { exists: "yes" }).pipe(
  Options.withDescription("tokenizer.json to use (default: the one in --dir)"),
  Options.optional,
)

const hfFlags = {
  dir,
  out,
  exits,
  dtype,
  quantize,
  blockSize,
  symmetric,
  accuracyLevel,
  embedding,
  context,
  tokenizer: hfTokenizer,
}

export type HfFlags = Command.Command.ParseConfig<typeof hfFlags>

const hf = Command.make("hf", hfFlags, (args) =>
  Effect.flatMap(
    Effect.promise(() => import("../handlers/convert.js")),
    (handler) => handler.hf(args),
  ),
).pipe(Command.withDescription("convert a Hugging Face Llama checkpoint (config.json + safetensors)"))

export const convert = Command.make("convert").pipe(
  Command.withDescription("convert a checkpoint into Offramp's staged ONNX format"),
  Command.withSubcommands([llama2c, hf]),
)
