/**
 * Admission of a generation request: validation against the model and the KV cache, the early-exit settings over the
 * engine's defaults, and the request's sequences (sample 0, and the forks that start samples 1..n-1 once the prompt
 * is computed).
 */
import { Effect, Schema } from "effect"
import { type EarlyExitParams, FULL_DEPTH, resolveEarlyExit } from "../EarlyExit.js"
import type { GenerationSink } from "../Engine.js"
import { describeParseError, type GenerationError, InvalidRequestError } from "../Errors.js"
import { GenerationRequest } from "../Generation.js"
import type { KvCacheShape } from "../KvCache.js"
import type { ModelSpec } from "../ModelSpec.js"
import { resolveSampling, type SamplerShape } from "../Sampler.js"
import type { SchedulerShape } from "../Scheduler.js"
import type { TokenizerShape } from "../Tokenizer.js"
import type { RequestState, Sequence } from "./Sequence.js"

export const makeAdmission = (deps: {
  readonly spec: ModelSpec
  readonly tokenizer: TokenizerShape
  readonly kv: KvCacheShape
  readonly sampler: SamplerShape
  readonly scheduler: SchedulerShape<Sequence>
  readonly defaults: EarlyExitParams
  /** The live sequences by id; admission adds each sequence it starts. */
  readonly sequences: Map<number, Sequence>
}) => {
  const { spec, tokenizer, kv, sampler, scheduler, defaults, sequences } = deps
  const { dims } = spec
  let nextId = 0
  /** Requests without a group of their own get negative groups (callers' groups are non-negative). */
  let lastOwnGroup = 0

  const newSequence = (
    request: RequestState,
    tokens: Array<number>,
    sample: number,
    prompt: ReadonlyArray<number>,
  ): Sequence => {
    const seq: Sequence = {
      id: nextId++,
      group: request.group,
      tokens,
      computed: 0,
      blocks: undefined,
      cancelled: false,
      lookahead: request.speculative?.maxDraft ?? 0,
      request,
      sample,
      rng: sampler.makeRng(request.sampling.seed, (request.sampling.stream ?? 0) + sample),
      detokenizer: tokenizer.detokenizer(prompt),
      generated: 0,
      exitHistogram: {},
      exitStates: new Map(),
      exact: 0,
    }
    sequences.set(seq.id, seq)
    return seq
  }

  /** A prompt given as token ids, refused at its first id outside the model's vocabulary. */
  const checkPromptIds = (ids: ReadonlyArray<number>): Effect.Effect<ReadonlyArray<number>, InvalidRequestError> => {
    const outside = ids.findIndex((id) => id >= dims.vocab)
    return outside < 0
      ? Effect.succeed(ids)
      : new InvalidRequestError({
          message: `prompt: token id ${ids[outside]} (at index ${outside}) is not below the model's vocabulary size ${dims.vocab}; pass ids from this model's tokenizer`,
        })
  }

  /** Validates `request` and returns its first sequence, ready for the scheduler (its request is `seq.request`). */
  const admit = (request: GenerationRequest, sink: GenerationSink): Effect.Effect<Sequence, GenerationError> =>
    Effect.gen(function* () {
      const req = yield* Schema.decodeUnknown(GenerationRequest)(request).pipe(
        Effect.mapError((e) => new InvalidRequestError({ message: describeParseError(e) })),
      )
      const prompt =
        typeof req.prompt === "string"
          ? yield* tokenizer.encode(req.prompt, { parseSpecialTokens: req.parseSpecialTokens ?? true })
          : yield* checkPromptIds(req.prompt)
      if (prompt.length >= dims.contextLength) {
        return yield* new InvalidRequestError({
          message: `the prompt is ${prompt.length} tokens but the model's context is ${dims.contextLength}; shorten the prompt`,
        })
      }
      if (kv.blocksFor(prompt.length + 1) > kv.numBlocks) {
        return yield* new InvalidRequestError({
          message: `the prompt is ${prompt.length} tokens but the KV cache holds ${kv.numBlocks * kv.blockSize}; shorten the prompt or raise the KV cache budget`,
        })
      }
      // A request that sets its own threshold means it for every exit: the defaults' per-exit thresholds
      // (calibration) apply only where the request keeps the default threshold too.
      const ownThreshold = req.earlyExit?.threshold !== undefined && req.earlyExit.thresholds === undefined
      const { thresholds: _calibrated, ...base } = defaults
      const exitParams = { ...(ownThreshold ? base : defaults), ...req.earlyExit }
      if (exitParams.measure === "classifier" && !spec.exits.some((e) => e.classifier)) {
        return yield* new InvalidRequestError({
          message:
            "the classifier measure needs exit classifiers, and this model has none; use softmax, margin, entropy or saturation",
        })
      }
      const speculative = req.speculative
      const draftExit = speculative && spec.exits.findIndex((e) => e.layer === speculative.exit)
      if (speculative && (draftExit === undefined || draftExit < 0 || draftExit === spec.exits.length - 1)) {
        return yield* new InvalidRequestError({
          message: `speculative.exit must be one of the model's early exits (${spec.exits
            .slice(0, -1)
            .map((e) => e.layer)
            .join(", ")}), got ${speculative.exit}`,
        })
      }
      if (speculative && (req.earlyExit !== undefined || req.forcedTokens !== undefined)) {
        return yield* new InvalidRequestError({
          message:
            "speculative decoding gives the full model's output; it does not combine with early exit or forced tokens",
        })
      }
      const n = req.n ?? 1
      const forcedTokens = req.forcedTokens
      if (forcedTokens?.some((id) => id >= dims.vocab)) {
        return yield* new InvalidRequestError({
          message: `forced tokens must be ids below the vocabulary size ${dims.vocab}`,
        })
      }
      const sampling = resolveSampling(req.sampling)
      const state: RequestState = {
        maxTokens: forcedTokens ? Math.min(req.maxTokens, forcedTokens.length) : req.maxTokens,
        forcedTokens,
        sampling,
        usesLogits: sampling.temperature > 0 || forcedTokens !== undefined,
        exit: resolveEarlyExit(spec, speculative ? FULL_DEPTH : exitParams),
        speculative:
          speculative && draftExit !== undefined
            ? { exitIndex: draftExit, maxDraft: speculative.maxDraft, threshold: speculative.threshold ?? 0 }
            : undefined,
        sink,
        closed: false,
        group: req.group ?? -++lastOwnGroup,
        forks: [],
        live: n,
      }
      const first = newSequence(state, [...prompt], 0, prompt)
      for (let sample = 1; sample < n; sample++) {
        state.forks.push(() => {
          const seq = newSequence(state, [...first.tokens], sample, prompt)
          if (!scheduler.adopt(first, seq)) return undefined
          seq.exact = first.exact
          return seq
        })
      }
      return first
    })

  return { admit }
}
