/**
 * The OpenAI-compatible API as an HttpRouter: mount `OpenAiRouter` into any @effect/platform app that provides
 * the OpenAiServer service, or serve `OpenAiApp` (the router with OpenAI-shaped 404s) on its own.
 *
 * Streaming responses are Server-Sent Events: one `data: {json}` chunk per token (per choice), then `data: [DONE]`.
 * The engine streams live in the request's scope, so a client that disconnects interrupts the response, the scope
 * closes and the engine cancels the sequences (their KV blocks return at its next step).
 */
import { randomUUID } from "node:crypto"
import * as HttpRouter from "@effect/platform/HttpRouter"
import type { HttpServerRequest } from "@effect/platform/HttpServerRequest"
import * as HttpServerResponse from "@effect/platform/HttpServerResponse"
import { Chunk, Effect, Either, Option, type Scope, Stream } from "effect"
import { type ApiError, badRequest, errorBody, errorResponse, internal, notFound } from "./ApiError.js"
import { type ChatTurn, transcript } from "./ChatTemplate.js"
import { checkApiKey, checkHost, decodeBody, readJson } from "./internal/body.js"
import { type Choice, type ChoiceDelta, exitFigures } from "./internal/choice.js"
import {
  checkModel,
  choicesOf,
  countTokens,
  type EventPull,
  type Plan,
  plan,
  start,
  usageOf,
} from "./internal/generate.js"
import { renderMetrics } from "./Metrics.js"
import { OpenAiServer, type OpenAiServerShape } from "./OpenAiServer.js"
import { ChatCompletionRequest, type ChatMessage, CompletionRequest } from "./Protocol.js"

type Handler = Effect.Effect<
  HttpServerResponse.HttpServerResponse,
  ApiError,
  OpenAiServer | HttpServerRequest | HttpRouter.RouteContext | Scope.Scope
>

/**
 * Every failure becomes an OpenAI error body (a defect is logged, the client sees only "internal server error").
 * Every route checks the Host header first (DNS rebinding).
 */
const respond = (route: string, handler: Handler) =>
  Effect.gen(function* () {
    const server = yield* OpenAiServer
    const response = yield* Effect.zipRight(checkHost(server.allowedHosts), handler).pipe(
      Effect.catchTag("ApiError", (error) => Effect.succeed(errorResponse(error))),
      Effect.catchAllDefect((defect) =>
        Effect.logError("offramp server: internal error", defect).pipe(Effect.as(errorResponse(internal()))),
      ),
    )
    server.metrics.countRequest(route, response.status)
    return response
  })

const encoder = new TextEncoder()
const sse = (data: unknown) => `data: ${JSON.stringify(data)}\n\n`
const DONE = "data: [DONE]\n\n"

const sseResponse = (body: Stream.Stream<Uint8Array>) =>
  HttpServerResponse.stream(body, {
    contentType: "text/event-stream",
    headers: { "cache-control": "no-cache", "x-accel-buffering": "no" },
  })

const now = () => Math.floor(Date.now() / 1000)

const utf8Bytes = (text: string) => [...encoder.encode(text)]

/**
 * The SSE body: `head` first, then each chunk of events fed to the choices and rendered as one write (`render`
 * returns the SSE text of one delta, "" for nothing), then `final()` and `[DONE]` after the event that finished the
 * last choice. A failure after the headers went out becomes OpenAI's error event, then `[DONE]`. One Stream stage
 * over the pull: per-chunk stages are what a token costs the main thread (see EventPull).
 */
const streamChoices = (
  pull: EventPull,
  choices: ReadonlyArray<Choice>,
  head: string,
  render: (delta: ChoiceDelta, last: boolean) => string,
  final: () => string,
): Stream.Stream<Uint8Array> => {
  const done = () => choices.every((c) => c.done)
  let text = head
  let ended = false
  const emit = () => {
    const out = text
    text = ""
    return out === "" ? Chunk.empty<Uint8Array>() : Chunk.of(encoder.encode(out))
  }
  const end = (tail: string) => {
    ended = true
    text += tail + DONE
    return emit()
  }
  const step = Effect.suspend(() =>
    ended
      ? Effect.fail(Option.none())
      : Effect.matchEffect(pull, {
          onSuccess: (events) => {
            for (const { choice, event } of events) {
              const delta = choices[choice]?.push(event)
              if (delta === undefined) continue
              const last = done()
              text += render(delta, last)
              if (last) return Effect.succeed(end(final()))
            }
            return Effect.succeed(emit())
          },
          onFailure: Option.match({
            onNone: () => Effect.succeed(end(final())),
            onSome: (error) => Effect.succeed(end(sse(errorBody(error)))),
          }),
        }),
  )
  return Stream.repeatEffectChunkOption(step)
}

/** Runs the events to the end of the last choice (non-streaming responses). */
const collectChoices = (pull: EventPull, choices: ReadonlyArray<Choice>) =>
  Effect.gen(function* () {
    while (!choices.every((c) => c.done)) {
      const events = yield* pull.pipe(
        Effect.catchAll(Option.match({ onNone: () => Effect.succeed(undefined), onSome: Effect.fail })),
      )
      if (events === undefined) return
      for (const { choice, event } of events) choices[choice]?.push(event)
    }
  })

const figures = (server: OpenAiServerShape, choices: ReadonlyArray<Choice>) =>
  exitFigures(choices, server.engine.spec.dims.layers)

// --- POST /v1/completions ---

const completionLogprobs = (logprobs: ChoiceDelta["logprobs"], shift: number) => ({
  tokens: logprobs.map((l) => l.token),
  token_logprobs: logprobs.map((l) => l.logprob),
  top_logprobs: null,
  text_offset: logprobs.map((l) => l.offset + shift),
})

const completions: Handler = Effect.gen(function* () {
  const server = yield* OpenAiServer
  yield* checkApiKey(server.apiKey)
  const body = yield* decodeBody(CompletionRequest, yield* readJson(server.maxBodyBytes))
  yield* checkModel(server, body.model)
  const texts = typeof body.prompt === "string" ? [body.prompt] : body.prompt
  // OpenAI's default for this endpoint is 16 tokens. The prompt is the user's text: its "</s>" is not EOS.
  const p = yield* plan(
    server,
    body,
    texts,
    { maxTokens: body.max_tokens ?? undefined, param: "max_tokens", promptParam: "prompt", parseSpecialTokens: false },
    16,
  )
  const choices = choicesOf(p)
  const events = yield* start(server, p)
  yield* Effect.addFinalizer(() => countTokens(server, p, choices))
  const echo = body.echo === true
  const wantLogprobs = body.logprobs !== undefined && body.logprobs !== null
  const promptOf = (index: number) => p.prompts[Math.floor(index / p.n)]!.text
  const id = `cmpl-${randomUUID().replaceAll("-", "")}`
  const created = now()
  const base = { id, object: "text_completion" as const, created, model: server.model }

  if (body.stream === true) {
    const withUsage = body.stream_options?.include_usage === true
    const chunk = (delta: ChoiceDelta, extra: object = {}) =>
      sse({
        ...base,
        choices: [
          {
            index: delta.index,
            text: delta.text,
            logprobs: wantLogprobs ? completionLogprobs(delta.logprobs, 0) : null,
            finish_reason: delta.finishReason,
          },
        ],
        ...(withUsage ? { usage: null } : {}),
        ...extra,
      })
    const echoed = echo
      ? choices
          .map((c) => chunk({ index: c.index, text: promptOf(c.index), logprobs: [], finishReason: null }))
          .join("")
      : ""
    const stream = streamChoices(
      events,
      choices,
      echoed,
      (delta, last) =>
        delta.text === "" && delta.logprobs.length === 0 && delta.finishReason === null
          ? ""
          : chunk(delta, last && !withUsage ? { early_exit: figures(server, choices) } : {}),
      () =>
        withUsage
          ? sse({ ...base, choices: [], usage: usageOf(p, choices), early_exit: figures(server, choices) })
          : "",
    )
    return sseResponse(stream)
  }

  yield* collectChoices(events, choices)
  return HttpServerResponse.unsafeJson({
    ...base,
    choices: choices.map((c) => {
      const shift = echo ? promptOf(c.index).length : 0
      return {
        index: c.index,
        text: echo ? promptOf(c.index) + c.text : c.text,
        logprobs: wantLogprobs ? completionLogprobs(c.logprobs, shift) : null,
        finish_reason: c.finishReason ?? "length",
      }
    }),
    usage: usageOf(p, choices),
    early_exit: figures(server, choices),
  })
})

// --- POST /v1/chat/completions ---

const contentText = (content: ChatMessage["content"]): string =>
  content === undefined || content === null
    ? ""
    : typeof content === "string"
      ? content
      : content.map((part) => part.text).join("")

/** The conversation as the model's prompt: its template, or the transcript fallback. */
const chatPrompt = (server: OpenAiServerShape, messages: ReadonlyArray<ChatMessage>) => {
  const turns: Array<ChatTurn> = messages.map((m) => ({
    role: m.role,
    content: contentText(m.content),
    ...(m.name !== undefined && m.name !== null ? { name: m.name } : {}),
  }))
  if (!server.chat.templated) return Effect.succeed(transcript(turns))
  return Either.match(server.chat.render(turns), {
    onLeft: (message) => Effect.fail(badRequest(message, "messages")),
    // The engine's tokenizer adds BOS itself; a template that writes it too would double it.
    onRight: (text) => {
      const bos = server.chat.bosToken
      return Effect.succeed(server.addsBos && bos && text.startsWith(bos) ? text.slice(bos.length) : text)
    },
  })
}

const chatLogprobs = (logprobs: ChoiceDelta["logprobs"]) => ({
  content: logprobs.map((l) => ({ token: l.token, logprob: l.logprob, bytes: utf8Bytes(l.token), top_logprobs: [] })),
  refusal: null,
})

/** OpenAI's fields for function calling and structured output: refused, since the output is plain text. */
const checkUnsupported = (body: ChatCompletionRequest): Effect.Effect<void, ApiError> => {
  const unsupported = (param: string, what: string) =>
    badRequest(`${param} is not supported: ${what}; remove it`, param, "unsupported_parameter")
  if (body.tools && body.tools.length > 0) return unsupported("tools", "this server does not call tools")
  if (body.tool_choice !== undefined && body.tool_choice !== null && body.tool_choice !== "none") {
    return unsupported("tool_choice", "this server does not call tools")
  }
  if (body.response_format && body.response_format.type !== "text") {
    return unsupported("response_format", 'the output is not constrained to a format (only {"type": "text"})')
  }
  return Effect.void
}

const chatCompletions: Handler = Effect.gen(function* () {
  const server = yield* OpenAiServer
  yield* checkApiKey(server.apiKey)
  const body = yield* decodeBody(ChatCompletionRequest, yield* readJson(server.maxBodyBytes))
  yield* checkModel(server, body.model)
  yield* checkUnsupported(body)
  const prompt = yield* chatPrompt(server, body.messages)
  const requested = body.max_completion_tokens ?? body.max_tokens ?? undefined
  const param = body.max_completion_tokens !== undefined ? "max_completion_tokens" : "max_tokens"
  const p: Plan = yield* plan(
    server,
    body,
    [prompt],
    // The template's special tokens must be special; the messages' special-token text is too (see the README).
    { maxTokens: requested, param, promptParam: "messages", parseSpecialTokens: true },
    undefined,
  )
  const choices = choicesOf(p)
  const events = yield* start(server, p)
  yield* Effect.addFinalizer(() => countTokens(server, p, choices))
  const wantLogprobs = body.logprobs === true
  const id = `chatcmpl-${randomUUID().replaceAll("-", "")}`
  const created = now()
  const base = { id, created, model: server.model }

  if (body.stream === true) {
    const withUsage = body.stream_options?.include_usage === true
    const chunk = (choice: object, extra: object = {}) =>
      sse({
        ...base,
        object: "chat.completion.chunk",
        choices: [choice],
        ...(withUsage ? { usage: null } : {}),
        ...extra,
      })
    // OpenAI opens every choice with its role.
    const roles = choices
      .map((c) =>
        chunk({ index: c.index, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }),
      )
      .join("")
    const render = (delta: ChoiceDelta, last: boolean) => {
      let out = ""
      if (delta.text !== "" || (wantLogprobs && delta.logprobs.length > 0)) {
        out += chunk({
          index: delta.index,
          delta: { content: delta.text },
          logprobs: wantLogprobs ? chatLogprobs(delta.logprobs) : null,
          finish_reason: null,
        })
      }
      if (delta.finishReason !== null) {
        out += chunk(
          { index: delta.index, delta: {}, logprobs: null, finish_reason: delta.finishReason },
          last && !withUsage ? { early_exit: figures(server, choices) } : {},
        )
      }
      return out
    }
    const final = () =>
      withUsage
        ? sse({
            ...base,
            object: "chat.completion.chunk",
            choices: [],
            usage: usageOf(p, choices),
            early_exit: figures(server, choices),
          })
        : ""
    return sseResponse(streamChoices(events, choices, roles, render, final))
  }

  yield* collectChoices(events, choices)
  return HttpServerResponse.unsafeJson({
    ...base,
    object: "chat.completion",
    choices: choices.map((c) => ({
      index: c.index,
      message: { role: "assistant", content: c.text, refusal: null },
      logprobs: wantLogprobs ? chatLogprobs(c.logprobs) : null,
      finish_reason: c.finishReason ?? "length",
    })),
    usage: usageOf(p, choices),
    early_exit: figures(server, choices),
  })
})

// --- models, health, metrics ---

const modelObject = (server: OpenAiServerShape) => ({
  id: server.model,
  object: "model",
  created: server.created,
  owned_by: "offramp",
  max_model_len: server.engine.spec.dims.contextLength,
})

const models: Handler = Effect.gen(function* () {
  const server = yield* OpenAiServer
  yield* checkApiKey(server.apiKey)
  return HttpServerResponse.unsafeJson({ object: "list", data: [modelObject(server)] })
})

const model: Handler = Effect.gen(function* () {
  const server = yield* OpenAiServer
  yield* checkApiKey(server.apiKey)
  const { params } = yield* HttpRouter.RouteContext
  if (params.model !== server.model) {
    return yield* notFound(`The model \`${params.model}\` does not exist.`, "model_not_found", "model")
  }
  return HttpServerResponse.unsafeJson(modelObject(server))
})

/** 200 only while the engine takes requests; 503 while it restarts, after it stopped, and while draining. */
const health: Handler = Effect.gen(function* () {
  const server = yield* OpenAiServer
  const state = yield* server.state
  return HttpServerResponse.unsafeJson(
    { status: state, model: server.model },
    { status: state === "ready" ? 200 : 503 },
  )
})

/** Answers whatever the engine's state: the engine's figures are the last known while its worker is away. */
const metrics: Handler = Effect.gen(function* () {
  const server = yield* OpenAiServer
  const stats = yield* server.engine.stats
  const state = yield* server.state
  const { restarts } = yield* server.engine.status
  return HttpServerResponse.text(
    renderMetrics(server.model, server.engine.spec.dims.layers, server.metrics, stats, { state, restarts }),
    { contentType: "text/plain; version=0.0.4; charset=utf-8" },
  )
})

/** The API's routes; needs the OpenAiServer service. Mount it with HttpRouter.mount or concat. */
export const OpenAiRouter: HttpRouter.HttpRouter<never, OpenAiServer> = HttpRouter.empty.pipe(
  HttpRouter.post("/v1/completions", respond("/v1/completions", completions)),
  HttpRouter.post("/v1/chat/completions", respond("/v1/chat/completions", chatCompletions)),
  HttpRouter.get("/v1/models", respond("/v1/models", models)),
  HttpRouter.get("/v1/models/:model", respond("/v1/models/:model", model)),
  HttpRouter.get("/health", respond("/health", health)),
  HttpRouter.get("/metrics", respond("/metrics", metrics)),
)

/** The router as a whole app: an unknown route is OpenAI's 404 body instead of an empty response. */
export const OpenAiApp = OpenAiRouter.pipe(
  Effect.catchTag("RouteNotFound", (error) =>
    Effect.gen(function* () {
      const server = yield* OpenAiServer
      server.metrics.countRequest("unmatched", 404)
      return errorResponse(notFound(`no route for ${error.request.method} ${error.request.url}`))
    }),
  ),
)
