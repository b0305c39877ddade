/**
 * Writes a staged model directory (model.json, tokenizer.json, embed/segment/head/kvfill graphs) from weights.
 */
import { mkdir, rename, rm, writeFile } from "node:fs/promises"
import { join } from "node:path"
import { CheckpointError } from "@offramp/core/Errors"
import { FORMAT_VERSION, ModelSpec } from "@offramp/core/ModelSpec"
import { Effect, Schema } from "effect"
import { buildEmbedGraph, buildHeadGraph, buildKvFillGraph, buildSegmentGraph } from "./LlamaGraphs.js"
import type { LlamaWeights } from "./LlamaWeights.js"
import { validateQuantization } from "./Quantize.js"
import { FP32, type WeightFormat, weightStorage } from "./WeightFormat.js"

/** Where a conversion is, for a progress display. */
export interface WriteProgress {
  /** Files written so far, of `files`. */
  readonly filesDone: number
  readonly files: number
  /** Decoder layers whose segment graph is written, of `layers`. */
  readonly layersDone: number
  readonly layers: number
  /** The file just written. */
  readonly file: string
}

export interface StagedModelOptions {
  readonly name: string
  readonly source: string
  /**
   * Early exits as layer counts in 1..layers-1; the full-depth exit is always added (and may be listed: `[layers]`
   * alone converts with no early exits).
   * Default: the layers with dedicated heads if the weights have them, else every layer.
   */
  readonly exits?: ReadonlyArray<number>
  readonly tokens: ModelSpec["tokens"]
  /** A Hugging Face tokenizer.json document. */
  readonly tokenizer: unknown
  /**
   * The tokenizer's size, when it has fewer tokens than the model's (padded) vocabulary: the heads then mask the ids
   * from it on, which the tokenizer could not decode.
   */
  readonly tokenizerTokens?: number
  /** A Hugging Face tokenizer_config.json document (chat template, special tokens), written next to it if given. */
  readonly tokenizerConfig?: unknown
  /** Weight storage in the ONNX files (default: all float32). */
  readonly weights?: WeightFormat
  /** Called after each file is written. */
  readonly onProgress?: (progress: WriteProgress) => void
}

/**
 * The early exits of a list of exit layers: sorted, without repeats and without the full-depth exit, which a model
 * always has and a list may name (so that `[layers]` alone means "no early exits").
 */
export const validateExits = (layers: number, exits: ReadonlyArray<number>): ReadonlyArray<number> => {
  const sorted = [...new Set(exits)].sort((a, b) => a - b)
  const bad = sorted.filter((e) => !Number.isInteger(e) || e < 1 || e > layers)
  if (bad.length > 0) {
    throw new Error(
      `exit layers must be integers in 1..${layers} for a ${layers}-layer model (${layers} alone: no early exits); got ${bad}`,
    )
  }
  return sorted.filter((e) => e < layers)
}

/** The model.json of a conversion (also what the writer lays out on disk). */
export const stagedModelSpec = (w: LlamaWeights, options: StagedModelOptions): ModelSpec => {
  const c = w.config
  const dedicated = w.exitHeads !== undefined && w.exitHeads.size > 0
  // Default: the dedicated heads' layers, else after every layer.
  const everyLayer = Array.from({ length: c.layers - 1 }, (_, i) => i + 1)
  const early = validateExits(c.layers, options.exits ?? (dedicated ? [...w.exitHeads!.keys()] : everyLayer))
  const bounds = [0, ...early, c.layers]
  const missing = dedicated ? early.filter((e) => !w.exitHeads!.has(e)) : []
  if (missing.length > 0) {
    throw new Error(
      `the checkpoint has dedicated exit heads after layers ${[...w.exitHeads!.keys()].sort((a, b) => a - b)}, ` +
        `but none after ${missing}; choose exits among those layers`,
    )
  }
  const fmt = options.weights ?? FP32
  const badQuantization = fmt.quantization && validateQuantization(fmt.quantization)
  if (badQuantization) throw new Error(badQuantization)
  // Decoding through the schema checks the layout (segments tile the layers, exits end segments) as it types it.
  return Schema.decodeUnknownSync(ModelSpec)({
    formatVersion: FORMAT_VERSION,
    name: options.name,
    architecture: "llama",
    source: options.source,
    dtype: "float32",
    weights: weightStorage(fmt),
    dims: {
      hidden: c.dim,
      intermediate: c.hiddenDim,
      layers: c.layers,
      heads: c.heads,
      kvHeads: c.kvHeads,
      headDim: c.headDim,
      vocab: c.vocab,
      contextLength: c.contextLength,
    },
    normEps: c.normEps,
    rope: { theta: c.ropeTheta, style: "half" },
    headKind: dedicated ? "dedicated" : "shared",
    tokens: options.tokens,
    files: { tokenizer: "tokenizer.json", embed: "embed.onnx" },
    segments: bounds.slice(1).map((end, k) => ({
      file: `segment_${k}.onnx`,
      firstLayer: bounds[k]!,
      endLayer: end,
    })),
    exits: [...early, c.layers].map((layer) => ({
      layer,
      head: dedicated && layer < c.layers ? `head_${layer}.onnx` : "head.onnx",
      ...(layer < c.layers ? { kvfill: `kvfill_${layer}.onnx` } : {}),
    })),
  })
}

/**
 * Writes the directory atomically: into a temporary sibling first, renamed into place when complete,
 * so an interrupted conversion never leaves a half-written model that looks valid.
 */
export const writeStagedModel = (
  w: LlamaWeights,
  outDir: string,
  options: StagedModelOptions,
): Effect.Effect<ModelSpec, CheckpointError> =>
  Effect.gen(function* () {
    const spec = yield* Effect.try({
      try: () => stagedModelSpec(w, options),
      catch: (e) => new CheckpointError({ path: outDir, message: (e as Error).message }),
    })
    const fmt = options.weights ?? FP32
    const staging = `${outDir}.partial-${process.pid}`
    type Entry = readonly [name: string, build: () => Uint8Array | string, layers?: number]
    const listed: Array<Entry> = [
      [spec.files.embed, () => buildEmbedGraph(w, fmt)],
      ...spec.segments.map(
        (s): Entry => [s.file, () => buildSegmentGraph(w, s.firstLayer, s.endLayer, fmt), s.endLayer - s.firstLayer],
      ),
      ...spec.exits.map(
        (e): Entry => [
          e.head,
          () =>
            buildHeadGraph(
              w.config,
              (e.layer < w.config.layers && w.exitHeads?.get(e.layer)) || w.finalHead,
              fmt,
              options.tokenizerTokens,
            ),
        ],
      ),
      ...spec.exits.flatMap(
        (e): Array<Entry> => (e.kvfill ? [[e.kvfill, () => buildKvFillGraph(w, e.layer, fmt)]] : []),
      ),
      [spec.files.tokenizer, () => JSON.stringify(options.tokenizer)],
      ...(options.tokenizerConfig === undefined
        ? []
        : [["tokenizer_config.json", () => `${JSON.stringify(options.tokenizerConfig, null, 2)}\n`] as const]),
      ["model.json", () => `${JSON.stringify(spec, null, 2)}\n`],
    ]
    // A shared head is listed once per exit.
    const files = listed.filter(([name], i) => listed.findIndex(([other]) => other === name) === i)
    yield* Effect.tryPromise({
      try: async () => {
        await rm(staging, { recursive: true, force: true })
        await mkdir(staging, { recursive: true })
        let layersDone = 0
        for (const [i, [name, build, layers]] of files.entries()) {
          await writeFile(join(staging, name), build())
          layersDone += layers ?? 0
          options.onProgress?.({
            filesDone: i + 1,
            files: files.length,
            layersDone,
            layers: w.config.layers,
            file: name,
          })
        }
        await rm(outDir, { recursive: true, force: true })
        await rename(staging, outDir)
      },
      catch: (e) => new CheckpointError({ path: outDir, message: `cannot write the model: ${(e as Error).message}` }),
    }).pipe(
      // A failed or interrupted conversion leaves no partial directory behind.
      Effect.onExit((exit) =>
        exit._tag === "Success" ? Effect.void : Effect.promise(() => rm(staging, { recursive: true, force: true })),
      ),
    )
    return spec
  })
