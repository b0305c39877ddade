/**
 * The wire format: OpenAI's request and response bodies in Effect Schema, with Offramp's `early_exit` extension.
 *
 * Requests decode leniently where OpenAI is lenient (unknown fields are ignored, `null` means "not given") and
 * strictly where it is strict (a known field of the wrong type is a 400).
 */
import { ConfidenceMeasure, ExitPolicy, KvStrategy } from "@offramp/core/EarlyExit"
import { Schema } from "effect"

/** OpenAI clients send `null` for "not given"; both decode to absent-or-null. */
const Nullable = <S extends Schema.Schema.Any>(schema: S) => Schema.optionalWith(Schema.NullOr(schema), { exact: true })

const NonNegative = Schema.Number.pipe(Schema.nonNegative())

/** Per-request early-exit controls (Offramp extension), mapped onto the engine's `earlyExit`. */
export const EarlyExitExtension = Schema.Struct({
  /** Exit when the exit head's confidence reaches this; above 1 never exits early. */
  threshold: Nullable(NonNegative),
  /** Per-exit thresholds by exit layer, e.g. `{ "2": 0.9 }`. */
  thresholds: Nullable(Schema.Record({ key: Schema.String, value: NonNegative })),
  measure: Nullable(ConfidenceMeasure),
  policy: Nullable(ExitPolicy),
  kv: Nullable(KvStrategy),
  min_exit_layer: Nullable(Schema.Int.pipe(Schema.positive())),
  /** CALM's decaying threshold schedule. */
  decay_tau: Nullable(NonNegative),
  /** A gated decision: with a head-free measure, a passing row exits only if the head's max probability reaches this. */
  confirm: Nullable(Schema.Number.pipe(Schema.between(0, 1))),
})
export type EarlyExitExtension = typeof EarlyExitExtension.Type

/**
 * Lossless self-speculative decoding (Offramp extension), mapped onto the engine's `speculative`: `{}` uses the
 * defaults (the early exit nearest half the depth drafts 4 tokens a verification).
 */
export const SpeculativeExtension = Schema.Struct({
  /** The draft exit, by layer count. */
  exit: Nullable(Schema.Int.pipe(Schema.positive())),
  max_draft: Nullable(Schema.Int.pipe(Schema.between(1, 16))),
  threshold: Nullable(Schema.Number.pipe(Schema.between(0, 1))),
})
export type SpeculativeExtension = typeof SpeculativeExtension.Type

/** A union's own message replaces its members' ("Expected string, actual [...]" for an array that is too long). */
const Stop = Schema.Union(Schema.String, Schema.Array(Schema.String).pipe(Schema.maxItems(4))).annotations({
  message: () => ({ message: "a string or an array of at most 4 strings (stop sequences)", override: true }),
})

const MaxTokens = Schema.Int.pipe(Schema.positive({ message: () => "must be a positive integer" }))

const commonFields = {
  model: Nullable(Schema.String),
  max_tokens: Nullable(MaxTokens),
  temperature: Nullable(Schema.Number.pipe(Schema.between(0, 2))),
  top_p: Nullable(Schema.Number.pipe(Schema.between(0, 1))),
  /** vLLM's extension; 0 = off. */
  top_k: Nullable(Schema.Int.pipe(Schema.nonNegative())),
  seed: Nullable(Schema.Int.pipe(Schema.filter((n) => Number.isSafeInteger(n) || "must be a safe integer"))),
  stop: Nullable(Stop),
  n: Nullable(Schema.Int.pipe(Schema.between(1, 64))),
  stream: Nullable(Schema.Boolean),
  stream_options: Nullable(Schema.Struct({ include_usage: Nullable(Schema.Boolean) })),
  // Accepted for compatibility and ignored (documented in the README).
  presence_penalty: Nullable(Schema.Number.pipe(Schema.between(-2, 2))),
  frequency_penalty: Nullable(Schema.Number.pipe(Schema.between(-2, 2))),
  user: Nullable(Schema.String),
  early_exit: Nullable(EarlyExitExtension),
  speculative: Nullable(SpeculativeExtension),
}

export const CompletionRequest = Schema.Struct({
  ...commonFields,
  prompt: Schema.Union(
    Schema.String,
    Schema.Array(Schema.String).pipe(Schema.minItems(1), Schema.maxItems(64)),
  ).annotations({ message: () => ({ message: "a string or an array of 1 to 64 strings (prompts)", override: true }) }),
  /** Any value asks for the chosen tokens' log-probabilities (alternatives are not returned). */
  logprobs: Nullable(Schema.Int.pipe(Schema.between(0, 5))),
  echo: Nullable(Schema.Boolean),
})
export type CompletionRequest = typeof CompletionRequest.Type

const TextPart = Schema.Struct({ type: Schema.Literal("text"), text: Schema.String })

const ROLES = ["system", "developer", "user", "assistant", "tool"] as const

export const ChatMessage = Schema.Struct({
  role: Schema.Literal(...ROLES).annotations({
    message: () => ({ message: `must be one of ${ROLES.join(", ")}`, override: true }),
  }),
  content: Nullable(
    Schema.Union(Schema.String, Schema.Array(TextPart)).annotations({
      message: () => ({ message: 'a string or an array of {"type": "text", "text": ...} parts', override: true }),
    }),
  ),
  name: Nullable(Schema.String),
})
export type ChatMessage = typeof ChatMessage.Type

export const ChatCompletionRequest = Schema.Struct({
  ...commonFields,
  messages: Schema.Array(ChatMessage).pipe(Schema.minItems(1, { message: () => "give at least one message" })),
  max_completion_tokens: Nullable(MaxTokens),
  logprobs: Nullable(Schema.Boolean),
  top_logprobs: Nullable(Schema.Int.pipe(Schema.between(0, 20))),
  // Decoded to be refused when used (see Router's `checkUnsupported`), not silently ignored.
  tools: Nullable(Schema.Array(Schema.Unknown)),
  tool_choice: Nullable(Schema.Unknown),
  response_format: Nullable(Schema.Struct({ type: Schema.String })),
})
export type ChatCompletionRequest = typeof ChatCompletionRequest.Type

// --- responses ---

export const FinishReason = Schema.Literal("stop", "length")

export const Usage = Schema.Struct({
  prompt_tokens: Schema.Int,
  completion_tokens: Schema.Int,
  total_tokens: Schema.Int,
})
export type Usage = typeof Usage.Type

/** Per-response early-exit figures (Offramp extension). */
export const EarlyExitFigures = Schema.Struct({
  /** Mean layers run per generated token (the model's depth when nothing exited early). */
  mean_exit_depth: Schema.Number,
  /** Layers skipped by early exits, summed over generated tokens. */
  layers_skipped: Schema.Int,
  /** The model's depth. */
  layers: Schema.Int,
  /** Generated tokens by the layer count of the exit that produced them. */
  exit_histogram: Schema.Record({ key: Schema.String, value: Schema.Int }),
})
export type EarlyExitFigures = typeof EarlyExitFigures.Type

export const CompletionLogprobs = Schema.Struct({
  tokens: Schema.Array(Schema.String),
  token_logprobs: Schema.Array(Schema.Number),
  /** Alternatives are not computed: always null. */
  top_logprobs: Schema.Null,
  text_offset: Schema.Array(Schema.Int),
})

export const CompletionChoice = Schema.Struct({
  index: Schema.Int,
  text: Schema.String,
  logprobs: Schema.NullOr(CompletionLogprobs),
  finish_reason: Schema.NullOr(FinishReason),
})

export const CompletionResponse = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("text_completion"),
  created: Schema.Int,
  model: Schema.String,
  choices: Schema.Array(CompletionChoice),
  usage: Schema.optionalWith(Schema.NullOr(Usage), { exact: true }),
  early_exit: Schema.optionalWith(EarlyExitFigures, { exact: true }),
})
export type CompletionResponse = typeof CompletionResponse.Type

export const ChatTokenLogprob = Schema.Struct({
  token: Schema.String,
  logprob: Schema.Number,
  bytes: Schema.Array(Schema.Int),
  /** Alternatives are not computed: always empty. */
  top_logprobs: Schema.Array(Schema.Unknown),
})

export const ChatLogprobs = Schema.Struct({ content: Schema.Array(ChatTokenLogprob), refusal: Schema.Null })

export const ChatCompletionChoice = Schema.Struct({
  index: Schema.Int,
  message: Schema.Struct({ role: Schema.Literal("assistant"), content: Schema.String, refusal: Schema.Null }),
  logprobs: Schema.NullOr(ChatLogprobs),
  finish_reason: FinishReason,
})

export const ChatCompletionResponse = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("chat.completion"),
  created: Schema.Int,
  model: Schema.String,
  choices: Schema.Array(ChatCompletionChoice),
  usage: Usage,
  early_exit: Schema.optionalWith(EarlyExitFigures, { exact: true }),
})
export type ChatCompletionResponse = typeof ChatCompletionResponse.Type

export const ChatCompletionChunkChoice = Schema.Struct({
  index: Schema.Int,
  delta: Schema.Struct({
    role: Schema.optionalWith(Schema.Literal("assistant"), { exact: true }),
    content: Schema.optionalWith(Schema.String, { exact: true }),
  }),
  logprobs: Schema.NullOr(ChatLogprobs),
  finish_reason: Schema.NullOr(FinishReason),
})

export const ChatCompletionChunk = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("chat.completion.chunk"),
  created: Schema.Int,
  model: Schema.String,
  choices: Schema.Array(ChatCompletionChunkChoice),
  usage: Schema.optionalWith(Schema.NullOr(Usage), { exact: true }),
  early_exit: Schema.optionalWith(EarlyExitFigures, { exact: true }),
})
export type ChatCompletionChunk = typeof ChatCompletionChunk.Type

export const ModelObject = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("model"),
  created: Schema.Int,
  owned_by: Schema.String,
  /** The model's context length (vLLM's extension). */
  max_model_len: Schema.Int,
})

export const ModelList = Schema.Struct({ object: Schema.Literal("list"), data: Schema.Array(ModelObject) })

export const ErrorBody = Schema.Struct({
  error: Schema.Struct({
    message: Schema.String,
    type: Schema.String,
    param: Schema.NullOr(Schema.String),
    code: Schema.NullOr(Schema.String),
  }),
})
