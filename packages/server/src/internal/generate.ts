/**
 * From a decoded request to engine generations and back: request parameters → GenerationRequests (one per prompt,
 * with the engine's `n`), admission (queue limit, shutdown), the first pull before any byte is sent (so that an
 * engine refusal is still an HTTP status), and metrics on the way.
 */
import type { EarlyExitRequest } from "@offramp/core/EarlyExit"
import { type GenerationError, truncateForMessage } from "@offramp/core/Errors"
import type { SpeculativeRequest, TokenEvent } from "@offramp/core/Generation"
import type { SamplingParams } from "@offramp/core/Sampler"
import { speculativeDefaults } from "@offramp/core/Speculation"
import { Chunk, Effect, Exit, Mailbox, Option, type Scope } from "effect"
import { ApiError, badRequest, fromGenerationError, queueFull, unavailable } from "../ApiError.js"
import type { OpenAiServerShape } from "../OpenAiServer.js"
import type { EarlyExitExtension, SpeculativeExtension } from "../Protocol.js"
import { Choice } from "./choice.js"

/** The fields completions and chat share, as decoded. */
export interface CommonParams {
  readonly model?: string | null
  readonly temperature?: number | null
  readonly top_p?: number | null
  readonly top_k?: number | null
  readonly seed?: number | null
  readonly stop?: string | ReadonlyArray<string> | null
  readonly n?: number | null
  readonly early_exit?: EarlyExitExtension | null
  readonly speculative?: SpeculativeExtension | null
}

export interface Prompt {
  readonly text: string
  /** The prompt's token ids, from its one tokenization: what the engine is given, and the usage's prompt tokens. */
  readonly ids: ReadonlyArray<number>
}

export interface Plan {
  readonly prompts: ReadonlyArray<Prompt>
  readonly n: number
  readonly maxTokens: number
  readonly sampling: SamplingParams
  readonly earlyExit: EarlyExitRequest | undefined
  readonly speculative: SpeculativeRequest | undefined
  readonly stops: ReadonlyArray<string>
}

/** A token event with the response choice it belongs to (prompt index × n + sample). */
export interface ChoiceEvent {
  readonly choice: number
  readonly event: TokenEvent
}

const given = <A>(value: A | null | undefined): value is A => value !== null && value !== undefined

export const checkModel = (server: OpenAiServerShape, model: string | null | undefined) =>
  given(model) && model !== server.model
    ? Effect.fail(
        new ApiError({
          status: 404,
          type: "invalid_request_error",
          message: `The model \`${model}\` does not exist; this server serves \`${server.model}\`.`,
          param: "model",
          code: "model_not_found",
        }),
      )
    : Effect.void

/** Per-exit thresholds must name the model's exits: a threshold for a layer without one would be ignored. */
const checkExitLayers = (
  server: OpenAiServerShape,
  ext: EarlyExitExtension | null | undefined,
): Effect.Effect<void, ApiError> => {
  const layers = server.engine.spec.exits.map((exit) => String(exit.layer))
  const unknown = Object.keys(given(ext) && given(ext.thresholds) ? ext.thresholds : {}).filter(
    (key) => !layers.includes(key),
  )
  return unknown.length === 0
    ? Effect.void
    : badRequest(
        `early_exit.thresholds: ${JSON.stringify(truncateForMessage(unknown[0]!))} is not an exit layer of this model; its exits are after layers ${layers.join(", ")}`,
        "early_exit.thresholds",
      )
}

const earlyExitOf = (ext: EarlyExitExtension | null | undefined): EarlyExitRequest | undefined => {
  if (!given(ext)) return undefined
  const out = {
    ...(given(ext.threshold) ? { threshold: ext.threshold } : {}),
    ...(given(ext.thresholds) ? { thresholds: ext.thresholds } : {}),
    ...(given(ext.measure) ? { measure: ext.measure } : {}),
    ...(given(ext.policy) ? { policy: ext.policy } : {}),
    ...(given(ext.kv) ? { kv: ext.kv } : {}),
    ...(given(ext.min_exit_layer) ? { minExitLayer: ext.min_exit_layer } : {}),
    ...(given(ext.confirm) ? { confirm: ext.confirm } : {}),
    ...(given(ext.decay_tau) ? { decayTau: ext.decay_tau } : {}),
  } satisfies EarlyExitRequest
  return Object.keys(out).length > 0 ? out : undefined
}

const speculativeOf = (
  server: OpenAiServerShape,
  ext: SpeculativeExtension | null | undefined,
): Effect.Effect<SpeculativeRequest | undefined, ApiError> => {
  if (!given(ext)) return Effect.succeed(undefined)
  const speculative = speculativeDefaults(server.engine.spec, {
    ...(given(ext.exit) ? { exit: ext.exit } : {}),
    ...(given(ext.max_draft) ? { maxDraft: ext.max_draft } : {}),
    ...(given(ext.threshold) ? { threshold: ext.threshold } : {}),
  })
  return speculative
    ? Effect.succeed(speculative)
    : badRequest("this model has no early exit to draft with; remove speculative", "speculative")
}

/**
 * What a request asked for: its max_tokens (when given) and the parameters an error points at; and whether its
 * prompts' special-token text is special (a chat template's) or plain text (a user's).
 */
interface Requested {
  readonly maxTokens: number | undefined
  readonly param: string
  readonly promptParam: string
  readonly parseSpecialTokens: boolean
}

/**
 * The context check as OpenAI words it, on a prompt's token count (or, with `atLeast`, on a lower bound of it):
 * prompt + max_tokens must fit. Returns max_tokens, which for the longest prompt is the request's. `defaultMaxTokens`
 * is OpenAI's default for the endpoint (undefined: whatever room the context leaves).
 */
const fitContext = (
  context: number,
  promptTokens: number,
  atLeast: boolean,
  requested: Requested,
  defaultMaxTokens: number | undefined,
): Effect.Effect<number, ApiError> => {
  const promptIs = atLeast ? `at least ${promptTokens}` : `${promptTokens}`
  if (promptTokens >= context) {
    return badRequest(
      `This model's maximum context length is ${context} tokens. However, your prompt is ${promptIs} tokens ` +
        "(one more is needed to generate). Please reduce the length of the prompt.",
      requested.promptParam,
      "context_length_exceeded",
    )
  }
  const maxTokens = requested.maxTokens ?? Math.min(defaultMaxTokens ?? context, context - promptTokens)
  if (promptTokens + maxTokens > context) {
    return badRequest(
      `This model's maximum context length is ${context} tokens. However, you requested ` +
        `${atLeast ? "at least " : ""}${promptTokens + maxTokens} tokens (${promptIs} in the prompt, ${maxTokens} ` +
        "for the completion). Please reduce the length of the prompt or the completion.",
      requested.param,
      "context_length_exceeded",
    )
  }
  return Effect.succeed(maxTokens)
}

/** Lets the event loop run (other streams' writes, after pending I/O) between two prompts' tokenizations. */
const yieldToEventLoop = Effect.async<void>((resume) => {
  const immediate = setImmediate(() => resume(Effect.void))
  return Effect.sync(() => clearImmediate(immediate))
})

/**
 * Tokenizes the prompts and checks them against the context as OpenAI does: prompt + max_tokens must fit. The engine
 * is given these token ids, so a prompt is tokenized once.
 * Tokenizing runs on the main thread, so a prompt too long for the context by the tokenizer's bytes-per-token bound
 * is refused before it is tokenized, and the event loop runs between prompts: one request's tokenization holds up
 * other streams for at most one prompt that could fit (a few kilobytes of text).
 */
export const plan = (
  server: OpenAiServerShape,
  params: CommonParams,
  texts: ReadonlyArray<string>,
  requested: Requested,
  defaultMaxTokens: number | undefined,
): Effect.Effect<Plan, ApiError> =>
  Effect.gen(function* () {
    const context = server.engine.spec.dims.contextLength
    const bytesPerToken = server.tokenizer.maxTokenBytes
    if (bytesPerToken !== undefined) {
      const fewest = Math.max(...texts.map((text) => Math.ceil(Buffer.byteLength(text, "utf8") / bytesPerToken)))
      yield* fitContext(context, fewest, true, requested, defaultMaxTokens)
    }
    // Each prompt is checked as soon as it is tokenized, so a request fails at its first prompt that cannot fit.
    const prompts = yield* Effect.forEach(texts, (text, i) =>
      (i > 0 ? yieldToEventLoop : Effect.void).pipe(
        Effect.zipRight(server.tokenizer.encode(text, { parseSpecialTokens: requested.parseSpecialTokens })),
        Effect.mapError(fromGenerationError),
        Effect.tap((ids) => fitContext(context, ids.length, false, requested, defaultMaxTokens)),
        Effect.map((ids) => ({ text, ids })),
      ),
    )
    const longest = Math.max(...prompts.map((p) => p.ids.length))
    const maxTokens = yield* fitContext(context, longest, false, requested, defaultMaxTokens)
    // top_p = 0 keeps only the most likely token: greedy, which the engine spells temperature 0.
    const topP = params.top_p ?? 1
    const sampling: SamplingParams = {
      temperature: topP === 0 ? 0 : (params.temperature ?? 1),
      topK: params.top_k ?? 0,
      topP: topP === 0 ? 1 : topP,
      ...(given(params.seed) ? { seed: params.seed } : {}),
    }
    const stop = params.stop
    const stops = (typeof stop === "string" ? [stop] : (stop ?? [])).filter((s) => s !== "")
    return {
      prompts,
      n: params.n ?? 1,
      maxTokens,
      sampling,
      earlyExit: yield* Effect.as(checkExitLayers(server, params.early_exit), earlyExitOf(params.early_exit)),
      speculative: yield* speculativeOf(server, params.speculative),
      stops,
    }
  })

export const choicesOf = (p: Plan) =>
  Array.from({ length: p.prompts.length * p.n }, (_, index) => new Choice(index, p.stops))

const toApiError = (error: GenerationError | ApiError): ApiError =>
  error._tag === "ApiError" ? error : fromGenerationError(error)

/**
 * The events of a response, a chunk at a time: each call returns what arrived since the last (one engine step's
 * tokens, usually), and fails with None after the last. A pull rather than a Stream because a streaming response
 * renders each chunk in one step: every Stream stage costs a few microseconds per chunk, and with one token per
 * stream per engine step the stages, not the work, were the main thread's cost.
 */
export type EventPull = Effect.Effect<ReadonlyArray<ChoiceEvent>, Option.Option<ApiError>>

/**
 * Submits the plan's generations and waits for the first event, so that admission failures (queue full, engine
 * refusal, shutdown) fail here, before a response is chosen. The generations belong to the caller's scope: closing
 * it (the request ends, or the client went away) cancels the sequences.
 */
/** Scheduler groups of requests (unique within the process; the engine needs them distinct, nothing more). */
let nextGroup = 0

export const start = (server: OpenAiServerShape, p: Plan): Effect.Effect<EventPull, ApiError, Scope.Scope> =>
  Effect.gen(function* () {
    const { metrics } = server
    if (server.isDraining()) return yield* unavailable("the server is shutting down; retry on another instance")
    // Limits count sequences, not requests: one request of many prompts and a large n is that many sequences.
    // One request may hold a quarter of the queue, so that a few large requests cannot fill it for everyone.
    const sequences = p.prompts.length * p.n
    const perRequest = Math.max(1, Math.floor(server.maxQueuedSequences / 4))
    if (sequences > perRequest)
      return yield* badRequest(
        `this request asks for ${sequences} sequences (${p.prompts.length} prompts × n = ${p.n}) but one request may queue at most ${perRequest} (a quarter of the server's ${server.maxQueuedSequences}); send fewer prompts or a smaller n`,
        p.prompts.length > 1 ? "prompt" : "n",
        "too_many_sequences",
      )
    if (metrics.queued + sequences > server.maxQueuedSequences) return yield* queueFull(server.maxQueuedSequences)
    const started = performance.now()
    // All prompts and samples of one request share a scheduler group: together they take a bounded share of the batch.
    const group = nextGroup++
    let queued = true
    const dequeue = () => {
      if (!queued) return
      queued = false
      metrics.queued -= sequences
    }
    metrics.queued += sequences
    metrics.active++
    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        dequeue()
        metrics.active--
        metrics.requestDuration.observe((performance.now() - started) / 1000)
      }),
    )
    // The engine's callbacks feed one mailbox for the whole response: one take per pull, with no Stream stage (or
    // fiber) per prompt between the engine and the socket.
    const events = yield* Mailbox.make<ChoiceEvent, ApiError>()
    let generating = p.prompts.length
    for (const [i, prompt] of p.prompts.entries()) {
      const cancel = yield* server.engine
        .submit(
          {
            prompt: prompt.ids,
            maxTokens: p.maxTokens,
            // Each choice (prompt × n + sample) draws from its own stream of the seed.
            sampling: { ...p.sampling, stream: i * p.n },
            ...(p.earlyExit ? { earlyExit: p.earlyExit } : {}),
            ...(p.speculative ? { speculative: p.speculative } : {}),
            ...(p.n > 1 ? { n: p.n } : {}),
            group,
          },
          {
            onEvent: (event) => events.unsafeOffer({ choice: i * p.n + event.sample, event }),
            onEnd: (exit) => {
              if (Exit.isFailure(exit)) events.unsafeDone(Exit.mapError(exit, toApiError))
              else if (--generating === 0) events.unsafeDone(Exit.void)
            },
          },
        )
        .pipe(Effect.mapError(toApiError))
      // The response's scope closes when it ends or the client goes away: what is still generating is cancelled.
      yield* Effect.addFinalizer(() => cancel)
    }
    // At the end of the shutdown grace the response ends (even one waiting on an engine that has stopped stepping).
    yield* server.track(() =>
      events.unsafeDone(Exit.fail(unavailable("the server shut down while the request was in flight"))),
    )
    const last = new Map<number, number>()
    let finished = false
    const pull: EventPull = Effect.suspend(() => {
      if (finished) return Effect.fail(Option.none())
      return events.takeAll.pipe(
        Effect.mapError(Option.some),
        Effect.flatMap(([chunk, done]) => {
          finished = done
          if (Chunk.isEmpty(chunk)) return Effect.fail(Option.none())
          // Each choice's inter-token latency, in one pass over the chunk.
          const at = performance.now()
          for (const { choice } of chunk) {
            const previous = last.get(choice)
            if (previous !== undefined) metrics.interTokenLatency.observe((at - previous) / 1000)
            last.set(choice, at)
          }
          return Effect.succeed(Chunk.toReadonlyArray(chunk))
        }),
      )
    })
    const first = yield* pull.pipe(
      Effect.catchAll(Option.match({ onNone: () => Effect.succeed([]), onSome: Effect.fail })),
      Effect.ensuring(Effect.sync(dequeue)),
    )
    metrics.timeToFirstToken.observe((performance.now() - started) / 1000)
    let pending: ReadonlyArray<ChoiceEvent> | undefined = first
    return Effect.suspend(() => {
      if (pending === undefined) return pull
      const chunk = pending
      pending = undefined
      return Effect.succeed(chunk)
    })
  })

/** Counts a finished (or abandoned) response's tokens. */
export const countTokens = (server: OpenAiServerShape, p: Plan, choices: ReadonlyArray<Choice>) =>
  Effect.sync(() => {
    server.metrics.promptTokens += p.prompts.reduce((sum, prompt) => sum + prompt.ids.length, 0)
    server.metrics.generationTokens += choices.reduce((sum, c) => sum + c.tokens, 0)
  })

export const usageOf = (p: Plan, choices: ReadonlyArray<Choice>) => {
  const prompt = p.prompts.reduce((sum, x) => sum + x.ids.length, 0)
  const completion = choices.reduce((sum, c) => sum + c.tokens, 0)
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion }
}
