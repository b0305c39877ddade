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

/**
 * The sampling parameters as a request writes them, with the messages a user sees for each wrong value (the engine's
 * one check of them). Every field is optional: what is left out is greedy decoding (temperature 0, top-k and top-p
 * off), as `Sampler.greedyParams`, which `Sampler.resolveSampling` fills in.
 */
export const SamplingParamsSchema = Schema.Struct({
  /**
   * Softmax temperature of the logits. 0 (the default) is greedy: the most likely token, lowest id on a tie; so is
   * anything below GREEDY_TEMPERATURE.
   */
  temperature: Schema.optionalWith(
    Schema.transform(
      checked((t) => Number.isFinite(t) && t >= 0, "temperature must be a finite number >= 0"),
      Schema.Number,
      { strict: true, decode: (t) => (t < GREEDY_TEMPERATURE ? 0 : t), encode: (t) => t },
    ),
    { exact: true },
  ),
  /** Sample only from the k most likely tokens; 0 (the default) is off. */
  topK: Schema.optionalWith(
    checked((k) => Number.isInteger(k) && k >= 0, "top_k must be an integer >= 0 (0 = off)"),
    {
      exact: true,
    },
  ),
  /**
   * Nucleus sampling: sample only from the smallest set of most likely tokens whose probabilities sum to at least
   * topP; 1 (the default) is off.
   */
  topP: Schema.optionalWith(
    checked((p) => p > 0 && p <= 1, "top_p must be in (0, 1] (1 = off)"),
    { exact: true },
  ),
  /** Seed of the random draws, for a reproducible output; a random seed when absent. */
  seed: Schema.optionalWith(
    checked((n) => Number.isSafeInteger(n), "seed must be an integer"),
    { exact: true },
  ),
  /** The seed's first stream (default 0): sample i of the request draws from stream `stream + i`. */
  stream: Schema.optionalWith(
    checked((n) => Number.isSafeInteger(n) && n >= 0, "stream must be an integer >= 0"),
    { exact: true },
  ),
})
/** Sampling parameters as a request writes them: any field left out is greedy's. */
export type SamplingRequest = typeof SamplingParamsSchema.Type

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

/**
 * A prompt as token ids: integers >= 0, at least one. The engine checks them against the model's vocabulary; they are
 * the model's input as they are (no BOS is added).
 */
export const PromptTokens = Schema.Array(Schema.Int.pipe(Schema.nonNegative())).pipe(Schema.minItems(1))

/**
 * What to generate. Only `prompt` and `maxTokens` are required: the rest defaults to one greedy sample under the
 * engine's early-exit settings, e.g. `{ prompt: "Once upon a time", maxTokens: 64 }`.
 */
export const GenerationRequest = Schema.Struct({
  /**
   * The prompt: text, which the engine tokenizes (adding the model's BOS), or token ids, which it takes as they are
   * (e.g. ids a caller already tokenized for a length check, so that a prompt is tokenized once). Ids must be below
   * the model's vocabulary size; an empty array is refused.
   */
  prompt: Schema.Union(Schema.String, PromptTokens).annotations({
    message: () => ({ message: "must be a string or a non-empty array of token ids (integers >= 0)", override: true }),
  }),
  /**
   * Whether the text of the tokenizer's special tokens in a text prompt (e.g. "</s>") becomes their ids: true (the
   * default) for a prompt a chat template wrote, false for text a user wrote, whose "</s>" is four characters.
   * Token-id prompts are not tokenized, so it does not apply to them.
   */
  parseSpecialTokens: Schema.optionalWith(Schema.Boolean, { exact: true }),
  /** Most tokens to generate per sample (fewer when a stop token comes first or the context is full). */
  maxTokens: Schema.Int.pipe(Schema.positive({ message: () => "max tokens must be a positive integer (at least 1)" })),
  /**
   * How each token is chosen: `temperature` (default 0: greedy), `topK` (default 0: off), `topP` (default 1: off),
   * `seed` and `stream`. Absent, or any field left out: greedy's value (`Sampler.greedyParams`).
   */
  sampling: Schema.optionalWith(SamplingParamsSchema, { exact: true }),
  /**
   * Early-exit settings over the engine's defaults (each field optional):
   * - `measure`: the confidence measure at an exit: "softmax" (max probability), "margin" (top-1 − top-2),
   *   "entropy", "saturation" (the hidden state stopped changing) or "classifier" (the model's exit classifiers);
   * - `threshold`: exit when the confidence reaches it (above 1: never exit early);
   * - `thresholds`: per-exit thresholds by exit layer, e.g. `{ "2": 0.9 }`; unlisted exits use `threshold` (a request
   *   that sets `threshold` alone sets it for every exit, over calibrated per-exit defaults);
   * - `policy`: "per-sequence" (a confident row exits alone) or "all" (rows exit together when all are confident);
   * - `kv`: the K/V of skipped layers, "fill" (from the exit's hidden state) or "recompute" (the next step pushes the
   *   token through them);
   * - `minExitLayer`: no exit before this many layers;
   * - `confirm`: for classifier and saturation, a token exits only if the head's max probability also reaches this;
   * - `decayTau`: CALM's decaying threshold schedule over the generation (absent: constant).
   */
  earlyExit: Schema.optionalWith(EarlyExitRequest, { exact: true }),
  /**
   * Lossless self-speculative decoding instead of early exit: draft up to `maxDraft` tokens at the early exit `exit`,
   * then verify them with the full model, so the output is the full model's. The engine's early-exit defaults do not
   * apply, and it does not combine with `earlyExit` or `forcedTokens`.
   */
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
  /**
   * Independent samples of the prompt (default 1); they share the prompt's KV blocks (a sample that waits for room
   * computes them from the prefix cache). Each event says which sample it belongs to.
   */
  n: Schema.optionalWith(Schema.Int.pipe(Schema.between(1, 64, { message: () => "n must be an integer in 1..64" })), {
    exact: true,
  }),
})
export type GenerationRequest = typeof GenerationRequest.Type

export const FinishReason = Schema.Literal("stop", "length")
export type FinishReason = typeof FinishReason.Type

/** What one sample's generation cost: where its tokens exited, against the model's depth. */
export const GenerationSummary = Schema.Struct({
  /** Tokens the sample generated (its events). */
  tokens: Schema.Int,
  /** Its tokens by the layer count of the exit that produced them (keys are layer counts; the counts sum to tokens). */
  exitHistogram: Schema.Record({ key: Schema.String, value: Schema.Int }),
  /** Mean layers run per token: Σ exitLayer / tokens. */
  meanExitDepth: Schema.Number,
  /** Layers its tokens skipped by exiting early: Σ (layers − exitLayer). */
  layersSkipped: Schema.Int,
  /** The model's depth (layers). */
  layers: Schema.Int,
})
export type GenerationSummary = typeof GenerationSummary.Type

/** One generated token. Each sample's last event carries the finish reason and the sample's summary. */
export const TokenEvent = Schema.Struct({
  /** Which of the request's n samples this token belongs to (0 when n = 1). */
  sample: Schema.Int,
  /** 0-based index of the token in its sample's continuation. */
  index: Schema.Int,
  /** The token's id. */
  id: Schema.Int,
  /** The text this token completes (UTF-8 safe; a stop token contributes ""). */
  text: Schema.String,
  /** How many layers ran before the head that produced it (the full depth when it did not exit early). */
  exitLayer: Schema.Int,
  /** That head's confidence, by the request's confidence measure (max probability at full depth). */
  confidence: Schema.Number,
  /** Natural-log probability of the token under the head that produced it (before temperature and filters). */
  logprob: Schema.Number,
  /** Set on the sample's last event: why it ended ("stop": a stop token; "length": maxTokens or the context). */
  finishReason: Schema.NullOr(FinishReason),
  /** On the sample's last event (the one with a finish reason): the early-exit figures of the whole sample. */
  summary: Schema.optionalWith(GenerationSummary, { exact: true }),
})
export type TokenEvent = typeof TokenEvent.Type
