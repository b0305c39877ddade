/**
 * The OpenAiServer service: what the router's handlers share — the engine and tokenizer, the served model's name,
 * the chat template, limits, the optional API key, metrics, and the shutdown state.
 */
import { Engine, type EngineShape } from "@offramp/core/Engine"
import { ModelLoadError, type TokenizerError } from "@offramp/core/Errors"
import { Tokenizer, type TokenizerShape } from "@offramp/core/Tokenizer"
import { Context, type Duration, Effect, Either, Layer, type Scope } from "effect"
import { type ChatRenderer, type ChatTemplateConfig, makeChatRenderer, readChatTemplate } from "./ChatTemplate.js"
import { DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUED_SEQUENCES } from "./Defaults.js"
import { ServerMetrics } from "./Metrics.js"
import type { ServerState } from "./ServerState.js"

export interface OpenAiServerOptions {
  /** The model id clients send and `/v1/models` lists (default: the name in model.json). */
  readonly model?: string
  /** The chat template and special tokens (default: none, the transcript fallback). */
  readonly chatTemplate?: ChatTemplateConfig
  /** Largest request body in bytes (default 1 MiB); larger ones get 413. */
  readonly maxBodyBytes?: number
  /**
   * Most sequences (prompts × n, summed over requests) waiting for their first token (default 256); a request that
   * would exceed it gets 429, and one that asks for more than a quarter of it on its own gets 400.
   */
  readonly maxQueuedSequences?: number
  /** When set, /v1 routes need `Authorization: Bearer <apiKey>`. */
  readonly apiKey?: string
  /**
   * Host names (without port) accepted in the Host header of requests on loopback connections besides the loopback
   * names, e.g. a reverse proxy's public name; "*" accepts any (see `checkHost`). Default none.
   */
  readonly allowedHosts?: ReadonlyArray<string>
}

export { DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUED_SEQUENCES }

export interface OpenAiServerShape {
  readonly engine: EngineShape
  readonly tokenizer: TokenizerShape
  readonly model: string
  /** Unix seconds when the server started (the model's `created`). */
  readonly created: number
  readonly chat: ChatRenderer
  /** Whether the tokenizer adds BOS itself, so a template's leading BOS text must be dropped. */
  readonly addsBos: boolean
  readonly maxBodyBytes: number
  readonly maxQueuedSequences: number
  readonly apiKey: string | undefined
  /** Lower-cased. */
  readonly allowedHosts: ReadonlyArray<string>
  readonly metrics: ServerMetrics
  /** True once shutdown began: new generation requests get 503. */
  readonly isDraining: () => boolean
  /** `draining` once shutdown began, else the engine's state. */
  readonly state: Effect.Effect<ServerState>
  /**
   * Registers an in-flight response for the scope's lifetime: `abort` ends it (with an error event and `[DONE]`,
   * or a 503) when the shutdown grace is over.
   */
  readonly track: (abort: () => void) => Effect.Effect<void, never, Scope.Scope>
  /**
   * Graceful shutdown: refuse new generation requests, let in-flight ones finish for up to `grace`, then end the
   * rest cleanly (streams get an error event and `[DONE]`). Bounded by `grace` and a second for the last writes,
   * also when it runs in a finalizer.
   */
  readonly shutdown: (grace: Duration.DurationInput) => Effect.Effect<void>
}

const make = (options: OpenAiServerOptions) =>
  Effect.gen(function* () {
    const engine = yield* Engine
    const tokenizer = yield* Tokenizer
    const chat = yield* Either.match(makeChatRenderer(options.chatTemplate ?? {}), {
      onLeft: (message) => Effect.fail(new ModelLoadError({ path: "tokenizer_config.json", message })),
      onRight: Effect.succeed,
    })
    const empty = yield* tokenizer.encode("")
    const metrics = new ServerMetrics()
    let draining = false
    const inFlight = new Set<() => void>()
    const track = (abort: () => void) =>
      Effect.acquireRelease(
        Effect.sync(() => inFlight.add(abort)),
        () => Effect.sync(() => inFlight.delete(abort)),
      )
    // Interruptible, so that the timeouts around it fire in a finalizer too (finalizers are uninterruptible).
    const idle = Effect.interruptible(
      Effect.gen(function* () {
        while (metrics.active > 0) yield* Effect.sleep("10 millis")
      }),
    )
    const shutdown = (grace: Duration.DurationInput) =>
      Effect.gen(function* () {
        draining = true
        yield* Effect.timeoutOption(idle, grace)
        for (const abort of inFlight) abort()
        // Ended streams finish their last writes.
        yield* Effect.timeoutOption(idle, "1 second")
      })
    return {
      engine,
      tokenizer,
      model: options.model ?? engine.spec.name,
      created: Math.floor(Date.now() / 1000),
      chat,
      addsBos: empty.includes(engine.spec.tokens.bos),
      maxBodyBytes: options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES,
      maxQueuedSequences: options.maxQueuedSequences ?? DEFAULT_MAX_QUEUED_SEQUENCES,
      apiKey: options.apiKey,
      allowedHosts: (options.allowedHosts ?? []).map((host) => host.toLowerCase()),
      metrics,
      isDraining: () => draining,
      state: Effect.map(engine.status, (status): ServerState => (draining ? "draining" : status.state)),
      track,
      shutdown,
    } satisfies OpenAiServerShape
  })

export class OpenAiServer extends Context.Tag("@offramp/server/OpenAiServer")<OpenAiServer, OpenAiServerShape>() {
  static readonly layer = (
    options: OpenAiServerOptions = {},
  ): Layer.Layer<OpenAiServer, ModelLoadError | TokenizerError, Engine | Tokenizer> =>
    Layer.effect(OpenAiServer, make(options))

  /** The service with the chat template of a model directory's tokenizer_config.json. */
  static readonly fromModelDirectory = (
    modelDir: string,
    options: Omit<OpenAiServerOptions, "chatTemplate"> = {},
  ): Layer.Layer<OpenAiServer, ModelLoadError | TokenizerError, Engine | Tokenizer> =>
    Layer.unwrapEffect(
      Effect.map(readChatTemplate(modelDir), (chatTemplate) => OpenAiServer.layer({ ...options, chatTemplate })),
    )
}
