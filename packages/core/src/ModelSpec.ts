/**
 * model.json: the description of a staged ONNX model directory (see DESIGN.md, "Model format").
 */
import { Schema } from "effect"

/** 2: the segments' KV pools are head-major, [kvHeads, blocks, blockSize, headDim], and the block table int32. */
export const FORMAT_VERSION = 2

const PositiveInt = Schema.Int.pipe(Schema.positive())
const NonNegativeInt = Schema.Int.pipe(Schema.nonNegative())

export const ModelDims = Schema.Struct({
  hidden: PositiveInt,
  intermediate: PositiveInt,
  layers: PositiveInt,
  heads: PositiveInt,
  kvHeads: PositiveInt,
  headDim: PositiveInt,
  vocab: PositiveInt,
  contextLength: PositiveInt,
})
export type ModelDims = typeof ModelDims.Type

/** Layers [firstLayer, endLayer) run by one ONNX graph; zero-based, end exclusive. */
export const SegmentSpec = Schema.Struct({
  file: Schema.String,
  firstLayer: NonNegativeInt,
  endLayer: PositiveInt,
})
export type SegmentSpec = typeof SegmentSpec.Type

/**
 * An exit after `layer` layers (1-based count). The last entry is always the full-depth exit
 * (layer == dims.layers), which has no kvfill graph because no layer is skipped.
 */
export const ExitSpec = Schema.Struct({
  layer: PositiveInt,
  head: Schema.String,
  kvfill: Schema.optional(Schema.String),
  /** A learned exit classifier: hidden [N,D] → exit_prob [N] (optional). */
  classifier: Schema.optional(Schema.String),
})
export type ExitSpec = typeof ExitSpec.Type

/**
 * How the ONNX files store weights; compute is float32 whatever the storage (`dtype`). Absent: all float32.
 * Norm weights and RoPE tables are always float32.
 */
export const WeightStorage = Schema.Struct({
  /** The big MatMul weights (attention, MLP, LM heads): float, or block-quantized for onnxruntime's MatMulNBits. */
  matmul: Schema.Literal("fp32", "fp16", "int8", "int4"),
  /** The token embedding table (int8 / int4: in the MatMul weights' blocks, GatherBlockQuantized). */
  embedding: Schema.Literal("fp32", "fp16", "int8", "int4"),
  /** Quantized MatMul weights: values per block along the input dimension. */
  blockSize: Schema.optional(PositiveInt),
  /** Quantized MatMul weights: true when blocks have no zero point (symmetric around 0). */
  symmetric: Schema.optional(Schema.Boolean),
})
export type WeightStorage = typeof WeightStorage.Type

export const ModelSpec = Schema.Struct({
  formatVersion: Schema.Literal(FORMAT_VERSION),
  name: Schema.String,
  architecture: Schema.Literal("llama"),
  source: Schema.optional(Schema.String),
  /** The compute dtype. */
  dtype: Schema.Literal("float32"),
  weights: Schema.optional(WeightStorage),
  dims: ModelDims,
  normEps: Schema.Number.pipe(Schema.positive()),
  rope: Schema.Struct({ theta: Schema.Number.pipe(Schema.positive()), style: Schema.Literal("half") }),
  /** "shared": one final-norm + LM head at every exit (LayerSkip); "dedicated": one head per exit (EE-LLM). */
  headKind: Schema.Literal("shared", "dedicated"),
  tokens: Schema.Struct({
    bos: NonNegativeInt,
    eos: NonNegativeInt,
    /** Ids that end a generation (EOS, and BOS for llama2.c models, whose reference stops on it). */
    stop: Schema.Array(NonNegativeInt),
  }),
  files: Schema.Struct({
    tokenizer: Schema.String,
    embed: Schema.String,
  }),
  segments: Schema.NonEmptyArray(SegmentSpec),
  exits: Schema.NonEmptyArray(ExitSpec),
}).pipe(
  Schema.filter((spec) => {
    const { layers } = spec.dims
    if (spec.dims.hidden !== spec.dims.heads * spec.dims.headDim) return "dims.hidden must equal heads × headDim"
    if (spec.dims.heads % spec.dims.kvHeads !== 0) return "heads must be a multiple of kvHeads"
    let next = 0
    for (const s of spec.segments) {
      if (s.firstLayer !== next || s.endLayer <= s.firstLayer) return `segments must tile layers 0..${layers} in order`
      next = s.endLayer
    }
    if (next !== layers) return `segments must end at layer ${layers}`
    const ends = new Set(spec.segments.map((s) => s.endLayer))
    const exitLayers = spec.exits.map((e) => e.layer)
    if (exitLayers.some((l, i) => i > 0 && l <= exitLayers[i - 1]!)) return "exits must be in increasing layer order"
    if (exitLayers.at(-1) !== layers) return `the last exit must be the full depth (layer ${layers})`
    if (exitLayers.some((l) => !ends.has(l))) return "every exit must sit at the end of a segment"
    if (spec.exits.some((e) => e.layer < layers && e.kvfill === undefined))
      return "every early exit needs a kvfill graph"
    return true
  }),
)
export type ModelSpec = typeof ModelSpec.Type
