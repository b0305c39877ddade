/**
 * Reader for Hugging Face Llama-family checkpoints: config.json + safetensors (single file or sharded), and the
 * tokenizer files next to them. Hugging Face stores Q/K rows in the rotate-half RoPE layout the graphs use, so
 * unlike llama2.c no permutation is needed.
 *
 * Dedicated exit heads (EE-LLM style) are read from tensors named `exit_heads.{layer}.norm.weight` and, optionally,
 * `exit_heads.{layer}.lm_head.weight` (`layer` = layers before the exit; see packages/convert/README.md).
 */
import { readFile } from "node:fs/promises"
import { basename, join, resolve } from "node:path"
import { CheckpointError, describeParseError } from "@offramp/core/Errors"
import type { ModelSpec } from "@offramp/core/ModelSpec"
import { Effect, Schema } from "effect"
import { MissingTensorError, type SafetensorsError, TensorShapeError, UnsupportedArchitectureError } from "./Errors.js"
import type { ExitHeadWeights, LlamaConfig, LlamaLayerWeights, LlamaWeights } from "./LlamaWeights.js"
import { ropeInvFreq } from "./LlamaWeights.js"
import { openSafetensors, type SafetensorsArchive } from "./Safetensors.js"

export const SUPPORTED_ARCHITECTURE = "LlamaForCausalLM"

/** Transformers' LlamaConfig defaults for fields a config.json may omit. */
const DEFAULTS = {
  maxPositionEmbeddings: 2048,
  rmsNormEps: 1e-6,
  ropeTheta: 10000,
  bos: 1,
  eos: 2,
} as const

const PositiveInt = Schema.Int.pipe(Schema.positive())
const NonNegativeInt = Schema.Int.pipe(Schema.nonNegative())
const Positive = Schema.Number.pipe(Schema.positive())
const TokenIds = Schema.Union(NonNegativeInt, Schema.Array(NonNegativeInt))

/** `rope_scaling` (and the newer `rope_parameters`): the type is under `rope_type`, or `type` in older configs. */
const RopeScaling = Schema.Struct({
  rope_type: Schema.optional(Schema.String),
  type: Schema.optional(Schema.String),
  rope_theta: Schema.optional(Positive),
  factor: Schema.optional(Positive),
  low_freq_factor: Schema.optional(Positive),
  high_freq_factor: Schema.optional(Positive),
  original_max_position_embeddings: Schema.optional(PositiveInt),
})
export type RopeScaling = typeof RopeScaling.Type

/** The fields of a Llama config.json that the converter reads. */
export const HfLlamaConfig = Schema.Struct({
  architectures: Schema.optional(Schema.NullOr(Schema.Array(Schema.String))),
  model_type: Schema.optional(Schema.String),
  hidden_size: PositiveInt,
  intermediate_size: PositiveInt,
  num_hidden_layers: PositiveInt,
  num_attention_heads: PositiveInt,
  num_key_value_heads: Schema.optional(Schema.NullOr(PositiveInt)),
  head_dim: Schema.optional(Schema.NullOr(PositiveInt)),
  vocab_size: PositiveInt,
  max_position_embeddings: Schema.optional(PositiveInt),
  rms_norm_eps: Schema.optional(Positive),
  rope_theta: Schema.optional(Positive),
  rope_scaling: Schema.optional(Schema.NullOr(RopeScaling)),
  rope_parameters: Schema.optional(Schema.NullOr(RopeScaling)),
  tie_word_embeddings: Schema.optional(Schema.Boolean),
  bos_token_id: Schema.optional(Schema.NullOr(TokenIds)),
  eos_token_id: Schema.optional(Schema.NullOr(TokenIds)),
  hidden_act: Schema.optional(Schema.String),
  attention_bias: Schema.optional(Schema.Boolean),
  mlp_bias: Schema.optional(Schema.Boolean),
  /** Offramp's extension (and some early-exit recipes'): the default early exits, as layer counts. */
  early_exit_layers: Schema.optional(Schema.Array(PositiveInt)),
})
export type HfLlamaConfig = typeof HfLlamaConfig.Type

export type HfCheckpointError =
  | CheckpointError
  | SafetensorsError
  | UnsupportedArchitectureError
  | MissingTensorError
  | TensorShapeError

export interface HfCheckpoint {
  readonly dir: string
  readonly name: string
  /** A one-line description for model.json's `source`. */
  readonly source: string
  readonly config: HfLlamaConfig
  readonly weights: LlamaWeights
  readonly tokens: ModelSpec["tokens"]
  /** Default early exits: config.early_exit_layers, else the dedicated heads' layers; absent: every layer. */
  readonly exits?: ReadonlyArray<number>
  /** tokenizer.json, when the directory has one (parsed JSON, not yet validated as a tokenizer). */
  readonly tokenizer?: unknown
  /** tokenizer_config.json (chat template, special tokens), when present. */
  readonly tokenizerConfig?: unknown
}

export interface HfReadOptions {
  /** Context length of the converted model (RoPE tables); default: max_position_embeddings. */
  readonly contextLength?: number
  /** Called after each tensor is read. */
  readonly onTensor?: (done: number, total: number, name: string) => void
}

/** RoPE inverse frequencies with a `rope_scaling` scheme folded in (linear, llama3); other schemes fail. */
export const hfRopeInvFreq = (
  headDim: number,
  theta: number,
  scaling: RopeScaling | null | undefined,
): { readonly invFreq: Float32Array } | { readonly error: string } => {
  const base = ropeInvFreq(headDim, theta)
  const type = scaling?.rope_type ?? scaling?.type ?? "default"
  if (scaling === null || scaling === undefined || type === "default") return { invFreq: base }
  const factor = scaling.factor
  if (factor === undefined) return { error: `rope_scaling of type ${type} needs a factor` }
  if (type === "linear") return { invFreq: base.map((f) => f / factor) }
  if (type === "llama3") {
    const { low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: old } = scaling
    if (low === undefined || high === undefined || old === undefined || !(high > low)) {
      return {
        error: "rope_scaling llama3 needs low_freq_factor < high_freq_factor and original_max_position_embeddings",
      }
    }
    // transformers' _compute_llama3_parameters: long wavelengths are slowed by `factor`, short ones kept,
    // and the band between is interpolated.
    const lowWavelen = old / low
    const highWavelen = old / high
    return {
      invFreq: base.map((f) => {
        const wavelen = (2 * Math.PI) / f
        if (wavelen < highWavelen) return f
        if (wavelen > lowWavelen) return f / factor
        const smooth = (old / wavelen - low) / (high - low)
        return (1 - smooth) * (f / factor) + smooth * f
      }),
    }
  }
  return {
    error: `rope_scaling type "${type}" is not supported; Offramp folds "linear" and "llama3" into the RoPE tables`,
  }
}

const readJson = (path: string, optional: boolean) =>
  Effect.tryPromise({
    try: () =>
      readFile(path, "utf8").then(
        (text) => text,
        (e: NodeJS.ErrnoException) => {
          if (optional && e.code === "ENOENT") return undefined
          throw e
        },
      ),
    catch: (e) => new CheckpointError({ path, message: `cannot read: ${(e as Error).message}` }),
  }).pipe(
    Effect.flatMap((text) =>
      text === undefined
        ? Effect.succeed(undefined)
        : Effect.try({
            try: () => JSON.parse(text) as unknown,
            catch: (e) => new CheckpointError({ path, message: `not valid JSON (${(e as Error).message})` }),
          }),
    ),
  )

/** Checks the architecture, then decodes the fields the converter needs. */
export const parseHfLlamaConfig = (
  path: string,
  json: unknown,
): Effect.Effect<HfLlamaConfig, CheckpointError | UnsupportedArchitectureError> =>
  Effect.gen(function* () {
    const raw = (typeof json === "object" && json !== null ? json : {}) as {
      architectures?: unknown
      model_type?: unknown
    }
    const architectures = Array.isArray(raw.architectures) ? raw.architectures.map(String) : []
    const supported =
      architectures.length > 0 ? architectures.includes(SUPPORTED_ARCHITECTURE) : raw.model_type === "llama"
    if (!supported) {
      const architecture =
        architectures.join(", ") || (typeof raw.model_type === "string" ? raw.model_type : "(none given)")
      return yield* new UnsupportedArchitectureError({
        path,
        architecture,
        message: `unsupported architecture ${architecture}; Offramp converts Llama-family models (LlamaForCausalLM)`,
      })
    }
    return yield* Schema.decodeUnknown(HfLlamaConfig)(json, { onExcessProperty: "ignore" }).pipe(
      Effect.mapError((e) => new CheckpointError({ path, message: `config.json: ${describeParseError(e)}` })),
    )
  })

/** The LlamaConfig (and RoPE frequencies) a config.json describes, after consistency checks. */
export const llamaConfigFromHf = (
  path: string,
  hf: HfLlamaConfig,
  contextLength?: number,
): Effect.Effect<{ readonly config: LlamaConfig; readonly invFreq: Float32Array }, CheckpointError> =>
  Effect.gen(function* () {
    const bad = (message: string) => new CheckpointError({ path, message })
    const heads = hf.num_attention_heads
    const kvHeads = hf.num_key_value_heads ?? heads
    if (hf.hidden_size % heads !== 0) return yield* bad(`hidden_size ${hf.hidden_size} is not a multiple of ${heads}`)
    const headDim = hf.head_dim ?? hf.hidden_size / heads
    if (headDim !== hf.hidden_size / heads) {
      return yield* bad(
        `head_dim ${headDim} differs from hidden_size / num_attention_heads = ${hf.hidden_size / heads}; ` +
          "the staged format needs them equal",
      )
    }
    if (headDim % 2 !== 0) return yield* bad(`head_dim ${headDim} is odd; RoPE needs an even head size`)
    if (heads % kvHeads !== 0) {
      return yield* bad(`num_attention_heads ${heads} is not a multiple of num_key_value_heads ${kvHeads}`)
    }
    if (hf.hidden_act !== undefined && hf.hidden_act !== "silu") {
      return yield* bad(`hidden_act ${hf.hidden_act} is not supported; Llama's MLP is SwiGLU (silu)`)
    }
    if (hf.attention_bias === true || hf.mlp_bias === true) {
      return yield* bad("attention_bias / mlp_bias are not supported: Llama projections have no biases")
    }
    const ropeTheta = hf.rope_theta ?? hf.rope_parameters?.rope_theta ?? DEFAULTS.ropeTheta
    const rope = hfRopeInvFreq(headDim, ropeTheta, hf.rope_scaling ?? hf.rope_parameters)
    if ("error" in rope) return yield* bad(rope.error)
    const context = contextLength ?? hf.max_position_embeddings ?? DEFAULTS.maxPositionEmbeddings
    if (!Number.isInteger(context) || context < 1) return yield* bad(`context length ${context} is not positive`)
    return {
      config: {
        dim: hf.hidden_size,
        hiddenDim: hf.intermediate_size,
        layers: hf.num_hidden_layers,
        heads,
        kvHeads,
        headDim,
        vocab: hf.vocab_size,
        contextLength: context,
        normEps: hf.rms_norm_eps ?? DEFAULTS.rmsNormEps,
        ropeTheta,
      },
      invFreq: rope.invFreq,
    }
  })

const EXIT_HEAD = /^exit_heads\.(\d+)\.(norm|lm_head)\.weight$/

/** The tensor name of a dedicated exit head's part (see packages/convert/README.md). */
export const exitHeadTensor = (layer: number, part: "norm" | "lm_head") => `exit_heads.${layer}.${part}.weight`

/** The tensors a config requires, with their shapes, in reading order. */
const requiredTensors = (
  c: LlamaConfig,
  tied: boolean,
  exitLayers: ReadonlyArray<number>,
  archive: SafetensorsArchive,
) => {
  const q = c.heads * c.headDim
  const kv = c.kvHeads * c.headDim
  const list: Array<readonly [string, ReadonlyArray<number>]> = [["model.embed_tokens.weight", [c.vocab, c.dim]]]
  for (let l = 0; l < c.layers; l++) {
    const p = `model.layers.${l}`
    list.push(
      [`${p}.input_layernorm.weight`, [c.dim]],
      [`${p}.self_attn.q_proj.weight`, [q, c.dim]],
      [`${p}.self_attn.k_proj.weight`, [kv, c.dim]],
      [`${p}.self_attn.v_proj.weight`, [kv, c.dim]],
      [`${p}.self_attn.o_proj.weight`, [c.dim, q]],
      [`${p}.post_attention_layernorm.weight`, [c.dim]],
      [`${p}.mlp.gate_proj.weight`, [c.hiddenDim, c.dim]],
      [`${p}.mlp.up_proj.weight`, [c.hiddenDim, c.dim]],
      [`${p}.mlp.down_proj.weight`, [c.dim, c.hiddenDim]],
    )
  }
  list.push(["model.norm.weight", [c.dim]])
  if (!tied) list.push(["lm_head.weight", [c.vocab, c.dim]])
  for (const layer of exitLayers) {
    list.push([exitHeadTensor(layer, "norm"), [c.dim]])
    if (archive.tensors.has(exitHeadTensor(layer, "lm_head"))) {
      list.push([exitHeadTensor(layer, "lm_head"), [c.vocab, c.dim]])
    }
  }
  return list
}

const describeShape = (c: LlamaConfig) =>
  `hidden_size ${c.dim}, intermediate_size ${c.hiddenDim}, ${c.heads} heads / ${c.kvHeads} kv heads of ` +
  `${c.headDim}, vocab_size ${c.vocab}`

/** Reads a Llama checkpoint directory: config.json, safetensors weights, tokenizer files. */
export const readHfCheckpoint = (
  dir: string,
  options: HfReadOptions = {},
): Effect.Effect<HfCheckpoint, HfCheckpointError> =>
  Effect.scoped(
    Effect.gen(function* () {
      const configPath = join(dir, "config.json")
      const configJson = yield* readJson(configPath, true)
      if (configJson === undefined) {
        return yield* new CheckpointError({
          path: dir,
          message: "no config.json: expected a Hugging Face checkpoint directory (config.json + *.safetensors)",
        })
      }
      const hf = yield* parseHfLlamaConfig(configPath, configJson)
      const { config: c, invFreq } = yield* llamaConfigFromHf(configPath, hf, options.contextLength)
      const tied = hf.tie_word_embeddings ?? false
      const archive = yield* openSafetensors(dir)

      // Dedicated exit heads: which layers have one.
      const exitLayers = new Set<number>()
      for (const name of archive.tensors.keys()) {
        const match = EXIT_HEAD.exec(name)
        if (match) exitLayers.add(Number(match[1]))
        if (name.startsWith("model.layers.") && name.endsWith(".bias")) {
          return yield* new CheckpointError({
            path: archive.path,
            message: `tensor ${name}: biases are not supported (Llama projections have none)`,
          })
        }
      }
      const headLayers = [...exitLayers].sort((a, b) => a - b)
      const outOfRange = headLayers.filter((l) => l < 1 || l >= c.layers)
      if (outOfRange.length > 0) {
        return yield* new CheckpointError({
          path: archive.path,
          message:
            `exit heads after layers ${outOfRange} are out of range: early exits of a ${c.layers}-layer model ` +
            `are after layers 1..${c.layers - 1} (the full-depth head is model.norm + lm_head)`,
        })
      }

      // Every tensor's presence and shape first, so a wrong checkpoint fails before anything is read.
      const required = requiredTensors(c, tied, headLayers, archive)
      for (const [name, shape] of required) {
        const entry = archive.tensors.get(name)
        if (entry === undefined) {
          return yield* new MissingTensorError({
            path: archive.path,
            tensor: name,
            message:
              `tensor ${name} is missing from the checkpoint; config.json (${c.layers} layers, ` +
              `tie_word_embeddings ${tied}) needs it`,
          })
        }
        if (entry.shape.length !== shape.length || entry.shape.some((d, i) => d !== shape[i])) {
          return yield* new TensorShapeError({
            path: archive.path,
            tensor: name,
            expected: [...shape],
            actual: [...entry.shape],
            message: `tensor ${name} has shape [${entry.shape}], but config.json (${describeShape(c)}) implies [${shape}]`,
          })
        }
      }
      const tensors = new Map<string, Float32Array>()
      for (const [i, [name]] of required.entries()) {
        tensors.set(name, yield* archive.readFloat32(name))
        options.onTensor?.(i + 1, required.length, name)
      }
      const t = (name: string) => tensors.get(name)!
      const layers = Array.from({ length: c.layers }, (_, l): LlamaLayerWeights => {
        const p = `model.layers.${l}`
        return {
          attnNorm: t(`${p}.input_layernorm.weight`),
          wq: t(`${p}.self_attn.q_proj.weight`),
          wk: t(`${p}.self_attn.k_proj.weight`),
          wv: t(`${p}.self_attn.v_proj.weight`),
          wo: t(`${p}.self_attn.o_proj.weight`),
          ffnNorm: t(`${p}.post_attention_layernorm.weight`),
          gate: t(`${p}.mlp.gate_proj.weight`),
          up: t(`${p}.mlp.up_proj.weight`),
          down: t(`${p}.mlp.down_proj.weight`),
        }
      })
      const embedding = t("model.embed_tokens.weight")
      const lmHead = tied ? embedding : t("lm_head.weight")
      const exitHeads = new Map<number, ExitHeadWeights>(
        headLayers.map((l) => [
          l,
          { norm: t(exitHeadTensor(l, "norm")), lmHead: tensors.get(exitHeadTensor(l, "lm_head")) ?? lmHead },
        ]),
      )
      const weights: LlamaWeights = {
        config: c,
        embedding,
        layers,
        finalHead: { norm: t("model.norm.weight"), lmHead },
        ...(exitHeads.size > 0 ? { exitHeads } : {}),
        invFreq,
      }

      const generation = yield* readJson(join(dir, "generation_config.json"), true)
      const tokens = tokenIds(hf, generation)
      const configExits = hf.early_exit_layers?.filter((l) => l < c.layers)
      const exits = configExits ?? (headLayers.length > 0 ? headLayers : undefined)
      const tokenizer = yield* readJson(join(dir, "tokenizer.json"), true)
      const tokenizerConfig = yield* readJson(join(dir, "tokenizer_config.json"), true)
      const architecture = hf.architectures?.[0] ?? SUPPORTED_ARCHITECTURE
      const name = basename(resolve(dir))
      return {
        dir,
        name,
        source: `Hugging Face ${architecture} checkpoint ${name}`,
        config: hf,
        weights,
        tokens,
        ...(exits ? { exits } : {}),
        ...(tokenizer !== undefined ? { tokenizer } : {}),
        ...(tokenizerConfig !== undefined ? { tokenizerConfig } : {}),
      }
    }),
  )

/** bos/eos from config.json; every eos id (config and generation_config.json) stops a generation. */
const tokenIds = (hf: HfLlamaConfig, generation: unknown): ModelSpec["tokens"] => {
  const list = (ids: unknown): Array<number> =>
    (Array.isArray(ids) ? ids : [ids]).filter((id): id is number => Number.isInteger(id) && id >= 0)
  const first = (ids: unknown) => list(ids)[0]
  const bos = first(hf.bos_token_id) ?? DEFAULTS.bos
  const eosIds = list(hf.eos_token_id)
  const generationEos =
    typeof generation === "object" && generation !== null
      ? list((generation as Record<string, unknown>).eos_token_id)
      : []
  const eos = eosIds[0] ?? generationEos[0] ?? DEFAULTS.eos
  return { bos, eos, stop: [...new Set([eos, ...eosIds, ...generationEos])] }
}
