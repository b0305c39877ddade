/**
 * Writes a staged model directory (model.json, tokenizer.json, embed/segment/head/kvfill graphs) from weights.
 */
import { mkdir, rename, rm, writeFile } from "node:fs/promises"
import { join } from "node:path"
import { CheckpointError, FORMAT_VERSION, ModelSpec } from "@offramp/core"
import { Effect, Schema } from "effect"
import { buildEmbedGraph, buildHeadGraph, buildKvFillGraph, buildSegmentGraph } from "./LlamaGraphs.js"
import type { LlamaWeights } from "./LlamaWeights.js"

export interface StagedModelOptions {
  readonly name: string
  readonly source: string
  /** Early exits as layer counts in 1..layers-1; the full-depth exit is always added. Default: every layer. */
  readonly exits?: ReadonlyArray<number>
  readonly tokens: ModelSpec["tokens"]
  /** A Hugging Face tokenizer.json document. */
  readonly tokenizer: unknown
}

export const validateExits = (layers: number, exits: ReadonlyArray<number>): ReadonlyArray<number> => {
  const sorted = [...new Set(exits)].sort((a, b) => a - b)
  const bad = sorted.filter((e) => !Number.isInteger(e) || e < 1 || e >= layers)
  if (bad.length > 0) {
    throw new Error(`exit layers must be integers in 1..${layers - 1} for a ${layers}-layer model; got ${bad}`)
  }
  return sorted
}

/** The model.json of a conversion (also what the writer lays out on disk). */
export const stagedModelSpec = (w: LlamaWeights, options: StagedModelOptions): ModelSpec => {
  const c = w.config
  const early = validateExits(c.layers, options.exits ?? Array.from({ length: c.layers - 1 }, (_, i) => i + 1))
  const bounds = [0, ...early, c.layers]
  const dedicated = w.exitHeads !== undefined && w.exitHeads.size > 0
  // Decoding through the schema checks the layout (segments tile the layers, exits end segments) as it types it.
  return Schema.decodeUnknownSync(ModelSpec)({
    formatVersion: FORMAT_VERSION,
    name: options.name,
    architecture: "llama",
    source: options.source,
    dtype: "float32",
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
    const staging = `${outDir}.partial-${process.pid}`
    const files: Array<[string, () => Uint8Array | string]> = [
      [spec.files.embed, () => buildEmbedGraph(w)],
      ...spec.segments.map((s): [string, () => Uint8Array] => [
        s.file,
        () => buildSegmentGraph(w, s.firstLayer, s.endLayer),
      ]),
      ...spec.exits.map((e): [string, () => Uint8Array] => [
        e.head,
        () => buildHeadGraph(w.config, (e.layer < w.config.layers && w.exitHeads?.get(e.layer)) || w.finalHead),
      ]),
      ...spec.exits.flatMap(
        (e): Array<[string, () => Uint8Array]> => (e.kvfill ? [[e.kvfill, () => buildKvFillGraph(w, e.layer)]] : []),
      ),
      [spec.files.tokenizer, () => JSON.stringify(options.tokenizer)],
      ["model.json", () => `${JSON.stringify(spec, null, 2)}\n`],
    ]
    yield* Effect.tryPromise({
      try: async () => {
        await rm(staging, { recursive: true, force: true })
        await mkdir(staging, { recursive: true })
        const written = new Set<string>()
        for (const [name, build] of files) {
          if (written.has(name)) continue // a shared head is listed once per exit
          written.add(name)
          await writeFile(join(staging, name), build())
        }
        await rm(outDir, { recursive: true, force: true })
        await rename(staging, outDir)
      },
      catch: (e) => new CheckpointError({ path: outDir, message: `cannot write the model: ${(e as Error).message}` }),
    })
    return spec
  })
