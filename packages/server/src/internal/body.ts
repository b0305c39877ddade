/**
 * Reading and decoding a JSON request body, with each way it can be wrong mapped to its status: 413 over the size
 * limit, 400 for invalid UTF-8, invalid JSON, a non-object, or a field of the wrong type.
 */
import { createHash, timingSafeEqual } from "node:crypto"
import { IncomingMessage } from "node:http"
import * as HttpIncomingMessage from "@effect/platform/HttpIncomingMessage"
import * as HttpServerRequest from "@effect/platform/HttpServerRequest"
import * as NodeHttpServerRequest from "@effect/platform-node/NodeHttpServerRequest"
import { Effect, Option, ParseResult, Schema } from "effect"
import { type ApiError, badRequest, tooLarge, unauthorized } from "../ApiError.js"

const utf8 = new TextDecoder("utf-8", { fatal: true })

const isTooLarge = (error: { readonly cause?: unknown }) =>
  error.cause instanceof Error && error.cause.message.includes("maxBytes")

/**
 * Reads a node:http body up to `maxBytes`. Past the limit it stops keeping data but lets the rest drain, so the
 * 413 still reaches the client (the platform's reader destroys the socket instead, and the answer is lost).
 */
const readNodeBody = (source: IncomingMessage, maxBytes: number) =>
  Effect.async<Uint8Array, ApiError>((resume) => {
    const chunks: Array<Buffer> = []
    let size = 0
    const detach = () => {
      source.off("data", onData)
      source.off("end", onEnd)
      source.off("error", onError)
    }
    const onData = (chunk: Buffer) => {
      size += chunk.length
      if (size <= maxBytes) return void chunks.push(chunk)
      detach()
      source.resume()
      resume(Effect.fail(tooLarge(maxBytes)))
    }
    const onEnd = () => {
      detach()
      resume(Effect.succeed(Buffer.concat(chunks)))
    }
    const onError = () => {
      detach()
      resume(Effect.fail(badRequest("cannot read the request body")))
    }
    source.on("data", onData)
    source.on("end", onEnd)
    source.on("error", onError)
    return Effect.sync(detach)
  })

/** The body as a JSON value; the size limit is checked on Content-Length first, then while reading. */
export const readJson = (maxBytes: number): Effect.Effect<unknown, ApiError, HttpServerRequest.HttpServerRequest> =>
  Effect.gen(function* () {
    const request = yield* HttpServerRequest.HttpServerRequest
    const length = Number(request.headers["content-length"] ?? Number.NaN)
    if (length > maxBytes) return yield* tooLarge(maxBytes)
    const source = NodeHttpServerRequest.toIncomingMessage(request)
    const bytes = yield* source instanceof IncomingMessage
      ? readNodeBody(source, maxBytes)
      : request.arrayBuffer.pipe(
          HttpIncomingMessage.withMaxBodySize(Option.some(maxBytes)),
          Effect.mapError((error) =>
            isTooLarge(error) ? tooLarge(maxBytes) : badRequest("cannot read the request body"),
          ),
          Effect.map((buffer) => new Uint8Array(buffer)),
        )
    const text = yield* Effect.try({
      try: () => utf8.decode(bytes),
      catch: () => badRequest("the request body is not valid UTF-8", null, "invalid_encoding"),
    })
    if (text.trim() === "")
      return yield* badRequest("the request body is empty; send a JSON object", null, "invalid_json")
    const json = yield* Effect.try({
      try: () => JSON.parse(text) as unknown,
      catch: (error) =>
        badRequest(
          `the request body is not valid JSON${error instanceof Error ? ` (${error.message})` : ""}`,
          null,
          "invalid_json",
        ),
    })
    if (typeof json !== "object" || json === null || Array.isArray(json)) {
      return yield* badRequest("the request body must be a JSON object", null, "invalid_json")
    }
    return json
  })

/** Decodes a body against a request schema; the first problem becomes the message, its field the `param`. */
export const decodeBody = <A, I>(schema: Schema.Schema<A, I>, body: unknown): Effect.Effect<A, ApiError> =>
  Schema.decodeUnknown(schema)(body).pipe(
    Effect.mapError((error) => {
      const [issue] = ParseResult.ArrayFormatter.formatErrorSync(error)
      if (issue === undefined) return badRequest("the request body does not match the API")
      const param = issue.path.length > 0 ? issue.path.join(".") : null
      return badRequest(param === null ? issue.message : `${param}: ${issue.message}`, param)
    }),
  )

const digest = (text: string) => createHash("sha256").update(text).digest()

/** `Authorization: Bearer <key>`, compared in constant time; nothing to check when no key is configured. */
export const checkApiKey = (
  apiKey: string | undefined,
): Effect.Effect<void, ApiError, HttpServerRequest.HttpServerRequest> =>
  apiKey === undefined
    ? Effect.void
    : Effect.gen(function* () {
        const request = yield* HttpServerRequest.HttpServerRequest
        const header = request.headers.authorization
        const match = header === undefined ? null : /^Bearer\s+(.+)$/i.exec(header.trim())
        if (match === null) {
          return yield* unauthorized(
            "You didn't provide an API key. Send it in the Authorization header: 'Authorization: Bearer YOUR_KEY'.",
          )
        }
        if (!timingSafeEqual(digest(match[1]!), digest(apiKey))) {
          return yield* unauthorized("Incorrect API key provided.")
        }
      })
