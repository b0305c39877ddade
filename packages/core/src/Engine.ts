/**
 * The Engine service: `generate(request)` returns a Stream of token events.
 *
 * This version serves one sequence at a time (a permit per stream) over the paged K/V pools of the runner;
 * a sequence's blocks belong to its stream's scope, so a finished, failed or interrupted stream returns them.
 */
import { Context, Effect, Layer, Option, Schema, Stream } from "effect"
import { describeParseError, type GenerationError, InvalidRequestError } from "./Errors.js"
import { GenerationRequest, type TokenEvent } from "./Generation.js"
import { type HeadOutput, ModelRunner } from "./ModelRunner.js"
import type { ModelSpec } from "./ModelSpec.js"
import { buildRowBatch } from "./RowBatch.js"
import { Sampler } from "./Sampler.js"
import { Tokenizer } from "./Tokenizer.js"

export interface EngineOptions {
  /** Most prompt tokens run in one prefill call (longer prompts are prefilled in chunks). */
  readonly prefillChunk?: number
}

export interface EngineShape {
  readonly spec: ModelSpec
  readonly generate: (request: GenerationRequest) => Stream.Stream<TokenEvent, GenerationError>
}

export class Engine extends Context.Tag("@offramp/core/Engine")<Engine, EngineShape>() {
  static readonly layer = (options: EngineOptions = {}) => Layer.effect(Engine, makeEngine(options))
}

/** A sequence's place in the paged cache. */
interface SequenceState {
  readonly blocks: Array<number>
  /** Positions whose K/V are in the cache. */
  cached: number
}

const makeEngine = (options: EngineOptions) =>
  Effect.gen(function* () {
    const runner = yield* ModelRunner
    const tokenizer = yield* Tokenizer
    const sampler = yield* Sampler
    const { spec } = runner
    const prefillChunk = options.prefillChunk ?? 256
    const finalExit = spec.exits.length - 1
    const permits = yield* Effect.makeSemaphore(1)
    const freeBlocks = Array.from({ length: runner.numBlocks }, (_, i) => runner.numBlocks - 1 - i)

    const ensureBlocks = (seq: SequenceState, positions: number) =>
      Effect.suspend(() => {
        const needed = Math.ceil(positions / runner.blockSize) - seq.blocks.length
        if (needed > freeBlocks.length) {
          return Effect.fail(
            new InvalidRequestError({
              message: `the KV cache has ${runner.numBlocks} blocks of ${runner.blockSize} tokens; this sequence needs more (raise the KV cache budget)`,
            }),
          )
        }
        for (let i = 0; i < needed; i++) seq.blocks.push(freeBlocks.pop()!)
        return Effect.void
      })

    /** Runs `tokens` through the full depth and returns the final head on the last one. */
    const forward = (seq: SequenceState, tokens: ReadonlyArray<number>): Effect.Effect<HeadOutput, GenerationError> =>
      Effect.gen(function* () {
        yield* ensureBlocks(seq, seq.cached + tokens.length)
        const batch = buildRowBatch(
          [{ cached: seq.cached, count: tokens.length, blocks: seq.blocks }],
          runner.blockSize,
        )
        let hidden = yield* runner.embed(BigInt64Array.from(tokens, BigInt), 1, tokens.length)
        for (let s = 0; s < spec.segments.length; s++) hidden = yield* runner.segment(s, hidden, batch)
        seq.cached += tokens.length
        const last = hidden.subarray((tokens.length - 1) * spec.dims.hidden, tokens.length * spec.dims.hidden)
        return yield* runner.head(finalExit, last, 1)
      })

    const prefill = (seq: SequenceState, prompt: ReadonlyArray<number>) =>
      Effect.gen(function* () {
        let head: HeadOutput | undefined
        for (let start = 0; start < prompt.length; start += prefillChunk) {
          head = yield* forward(seq, prompt.slice(start, start + prefillChunk))
        }
        return head!
      })

    const generate = (request: GenerationRequest): Stream.Stream<TokenEvent, GenerationError> =>
      Stream.unwrapScoped(
        Effect.gen(function* () {
          const req = yield* Schema.decodeUnknown(GenerationRequest)(request).pipe(
            Effect.mapError((e) => new InvalidRequestError({ message: describeParseError(e) })),
          )
          const sampling = yield* sampler.validate(req.sampling)
          const prompt = yield* tokenizer.encode(req.prompt)
          const context = spec.dims.contextLength
          if (prompt.length >= context) {
            return yield* new InvalidRequestError({
              message: `the prompt is ${prompt.length} tokens but the model's context is ${context}; shorten the prompt`,
            })
          }
          yield* Effect.acquireRelease(permits.take(1), () => permits.release(1))
          const seq: SequenceState = { blocks: [], cached: 0 }
          yield* Effect.addFinalizer(() => Effect.sync(() => freeBlocks.push(...seq.blocks.splice(0))))
          const rng = sampler.makeRng(sampling.seed)
          const detokenizer = tokenizer.detokenizer(prompt)
          const stopIds = new Set(spec.tokens.stop)
          const exitLayer = spec.exits[finalExit]!.layer

          let head = yield* prefill(seq, prompt)
          // The sampled token is emitted first and run through the model on the next pull, so a streaming client
          // sees each token as soon as it is sampled.
          let pending: number | undefined
          let done = false
          let index = 0
          const next: Effect.Effect<TokenEvent, Option.Option<GenerationError>> = Effect.gen(function* () {
            if (done) return yield* Effect.fail(Option.none())
            if (pending !== undefined) {
              head = yield* forward(seq, [pending]).pipe(Effect.mapError(Option.some))
              pending = undefined
            }
            const id = sampler.sample(head.logits, 0, spec.dims.vocab, sampling, rng)
            const stop = stopIds.has(id)
            const full = index + 1 >= req.maxTokens || seq.cached + 1 >= context
            const finishReason = stop ? "stop" : full ? "length" : null
            let text = stop ? "" : detokenizer.push(id)
            if (finishReason === null) pending = id
            else {
              text += detokenizer.flush()
              done = true
            }
            return { index: index++, id, text, exitLayer, confidence: head.maxProb[0]!, finishReason }
          })
          return Stream.repeatEffectOption(next)
        }),
      )

    return { spec, generate } satisfies EngineShape
  })
