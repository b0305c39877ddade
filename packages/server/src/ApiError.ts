/**
 * Errors as OpenAI sends them: `{ error: { message, type, param, code } }` with the matching HTTP status.
 * Every failure a handler can meet becomes one of these; nothing else (no stack, no cause) reaches the client.
 */
import * as HttpServerResponse from "@effect/platform/HttpServerResponse"
import type { GenerationError } from "@offramp/core/Errors"
import { Schema } from "effect"

export class ApiError extends Schema.TaggedError<ApiError>()("ApiError", {
  status: Schema.Int,
  message: Schema.String,
  /** OpenAI's error type, e.g. "invalid_request_error". */
  type: Schema.String,
  param: Schema.NullOr(Schema.String),
  code: Schema.NullOr(Schema.String),
}) {}

const make = (status: number, type: string, message: string, code: string | null = null, param: string | null = null) =>
  new ApiError({ status, type, message, code, param })

export const badRequest = (message: string, param: string | null = null, code: string | null = null) =>
  make(400, "invalid_request_error", message, code, param)

export const unauthorized = (message: string) => make(401, "invalid_request_error", message, "invalid_api_key")

export const forbiddenHost = (message: string) => make(403, "invalid_request_error", message, "host_not_allowed")

export const notFound = (message: string, code = "not_found", param: string | null = null) =>
  make(404, "invalid_request_error", message, code, param)

export const tooLarge = (limit: number) =>
  make(413, "invalid_request_error", `the request body is larger than the limit of ${limit} bytes`, "request_too_large")

export const unsupportedMediaType = (message: string) =>
  make(415, "invalid_request_error", message, "unsupported_media_type")

export const queueFull = (limit: number) =>
  make(
    429,
    "rate_limit_error",
    `the server already has up to ${limit} sequences (prompts × n) waiting for the engine; retry later`,
    "queue_full",
  )

export const unavailable = (message: string) => make(503, "server_error", message, "engine_unavailable")

export const internal = () => make(500, "server_error", "internal server error", null)

/** Engine failures: a request it can never serve is the client's (400); a stopped engine is 503; others 500. */
export const fromGenerationError = (error: GenerationError): ApiError => {
  switch (error._tag) {
    case "InvalidRequestError":
      return badRequest(error.message)
    case "EngineStoppedError":
      return unavailable(error.message)
    case "TokenizerError":
      return badRequest(error.message)
    case "RunnerError":
      return make(500, "server_error", `the model failed while generating (${error.stage})`, "engine_error")
  }
}

export const errorBody = (error: ApiError) => ({
  error: { message: error.message, type: error.type, param: error.param, code: error.code },
})

/** Headers by status: when to retry a full queue or an engine that restarts, or an oversized body's connection. */
const headersFor = (status: number): Record<string, string> | undefined => {
  switch (status) {
    // A queue slot frees when a request gets its first token, and a worker restarts in about a second (while the
    // server drains, a retry goes to its replacement through the load balancer).
    case 429:
    case 503:
      return { "retry-after": "1" }
    // The rest of an oversized body was drained, not kept: close the connection once the answer is out.
    case 413:
      return { connection: "close" }
    default:
      return undefined
  }
}

export const errorResponse = (error: ApiError): HttpServerResponse.HttpServerResponse => {
  const headers = headersFor(error.status)
  return HttpServerResponse.unsafeJson(errorBody(error), { status: error.status, ...(headers ? { headers } : {}) })
}
