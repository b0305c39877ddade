/**
 * The domain schemas of a generation: what a request asks for and what its stream carries.
 */
import { Schema } from "effect"
import { EarlyExitRequest } from "./EarlyExit.js"

/** A number that passes `check`, failing with `problem` and the value (one message whichever way it is wrong). */
const checked = (check: (n: number) => boolean, problem: string) =>
  Schema.Number.pipe(Schema.filter(check, { message: (issue) => `${problem}, got ${String(issue.actual)}` }))

/**
 * Temperatures below this decode as 0 (greedy), as in vLLM: logits / T overflows to infinity for a tiny T (below
 * about 5.6e-309 1 / T itself does), and the distribution is the argmax's to within rounding long before that.
 */
export const GREEDY_TEMPERATURE = 1e-5

/** The sampling parameters, with the messages a user sees for each wrong value (the engine's one check of them). */
export const SamplingParamsSchema = Schema.Struct({
  /** 0 = greedy; so is anything below GREEDY_TEMPERATURE. */
  temperature: Schema.transform(
    checked((t) => Number.isFinite(t) && t >= 0, "temperature must be a finite number >= 0"),
    Schema.Number,
    { strict: true, decode: (t) => (t < GREEDY_TEMPERATURE ? 0 : t), encode: (t) => t },
  ),
  /** 0 = off. */
  topK: checked((k) => Number.isInteger(k) && k >= 0, "top_k must be an integer >= 0 (0 = off)"),
  /** 1 = off. */
  topP: checked((p) => p > 0 && p <= 1, "top_p must be in (0, 1] (1 = off)"),
  seed: Schema.optionalWith(
    checked((n) => Number.isSafeInteger(n), "seed must be an integer"),
    { exact: true },
  ),
  /** The seed's first stream: sample i draws from stream + i. */
  stream: Schema.optionalWith(
    checked((n) => Number.isSafeInteger(n) && n >= 0, "stream must be an integer >= 0"),
    { exact: true },
  ),
})

/**
 * Self-speculative decoding: draft tokens with the layers up to the early exit `exit` and its head, then verify
 * them in one pass through the remaining layers; only what the full model agrees with is kept, so the output is the
 * full model's (greedy: token for token; sampling: in distribution).
 */
export const SpeculativeRequest = Schema.Struct({
  /** The draft exit: the layer count of one of the model's early exits. */
  exit: Schema.Int.pipe(Schema.positive({ message: () => "speculative.exit must be a positive layer count" })),
  /** Most tokens drafted before a verification. */
  maxDraft: Schema.Int.pipe(
    Schema.between(1, 16, { message: () => "speculative.maxDraft must be an integer in 1..16" }),
  ),
  /** Drafting stops early when the draft head's top probability falls below this (default 0: always maxDraft). */
  threshold: Schema.optionalWith(
    Schema.Number.pipe(Schema.between(0, 1, { message: () => "speculative.threshold must be in [0, 1]" })),
    { exact: true },
  ),
})
export type SpeculativeRequest = typeof SpeculativeRequest.Type

export const GenerationRequest = Schema.Struct({
  prompt: Schema.String,
  /**
   * Whether the text of the tokenizer's special tokens in the prompt (e.g. "</s>") becomes their ids: true (the
   * default) for a prompt a chat template wrote, false for text a user wrote, whose "</s>" is four characters.
   */
  parseSpecialTokens: Schema.optionalWith(Schema.Boolean, { exact: true }),
  maxTokens: Schema.Int.pipe(Schema.positive({ message: () => "max tokens must be a positive integer (at least 1)" })),
  sampling: SamplingParamsSchema,
  /** Early-exit settings over the engine's defaults. */
  earlyExit: Schema.optionalWith(EarlyExitRequest, { exact: true }),
  /** Lossless self-speculative decoding instead of early exit (the engine's early-exit defaults do not apply). */
  speculative: Schema.optionalWith(SpeculativeRequest, { exact: true }),
  /**
   * Teacher forcing: emit these tokens in order instead of sampling (each event still reports the model's
   * log-probability of it, the exit it was scored at and that exit's confidence); used to score a text.
   */
  forcedTokens: Schema.optionalWith(Schema.Array(Schema.Int.pipe(Schema.nonNegative())), { exact: true }),
  /**
   * Requests with the same group share the scheduler's running cap per group, so that one client's many prompts and
   * samples take a bounded share of the batch (a server gives all prompts of one client request one group).
   * Default: a group of its own.
   */
  group: Schema.optionalWith(Schema.Int.pipe(Schema.nonNegative()), { exact: true }),
  /** Independent samples of the prompt; they share the prompt's KV blocks (a sample that waits for room computes them from the prefix cache). */
  n: Schema.optionalWith(Schema.Int.pipe(Schema.between(1, 64, { message: () => "n must be an integer in 1..64" })), {
    exact: true,
  }),
})
export type GenerationRequest = typeof GenerationRequest.Type

export const FinishReason = Schema.Literal("stop", "length")
export type FinishReason = typeof FinishReason.Type

/** One generated token. The last event of a stream carries the finish reason. */
export const TokenEvent = Schema.Struct({
  /** Which of the request's n samples this token belongs to (0 when n = 1). */
  sample: Schema.Int,
  /** 0-based index of the token in its sample's continuation. */
  index: Schema.Int,
  id: Schema.Int,
  /** The text this token completes (UTF-8 safe; a stop token contributes ""). */
  text: Schema.String,
  /** How many layers ran before the head that produced it (the full depth when it did not exit early). */
  exitLayer: Schema.Int,
  /** That head's confidence, by the request's confidence measure (max probability at full depth). */
  confidence: Schema.Number,
  /** Natural-log probability of the token under the head that produced it (before temperature and filters). */
  logprob: Schema.Number,
  finishReason: Schema.NullOr(FinishReason),
})
export type TokenEvent = typeof TokenEvent.Type
