/**
 * Reading and decoding a JSON request body, with each way it can be wrong mapped to its status: 415 when it is not
 * sent as JSON, 413 over the size limit, 400 for invalid UTF-8, invalid JSON, a non-object, or a field of the wrong
 * type. And the checks before it: the API key (401) and, on loopback connections, the Host header (403).
 */
import { createHash, timingSafeEqual } from "node:crypto"
import { IncomingMessage } from "node:http"
import * as HttpIncomingMessage from "@effect/platform/HttpIncomingMessage"
import * as HttpServerRequest from "@effect/platform/HttpServerRequest"
import * as NodeHttpServerRequest from "@effect/platform-node/NodeHttpServerRequest"
import { truncateForMessage } from "@offramp/core/Errors"
import { Effect, Option, ParseResult, Schema } from "effect"
import { type ApiError, badRequest, forbiddenHost, tooLarge, unauthorized, unsupportedMediaType } from "../ApiError.js"

const utf8 = new TextDecoder("utf-8", { fatal: true })

const isTooLarge = (error: { readonly cause?: unknown }) =>
  error.cause instanceof Error && error.cause.message.includes("maxBytes")

/** How much of an oversized body is read and discarded before the 413 (beyond that the client may see a reset). */
const DRAIN_BYTES = 64 * 1024 * 1024
const DRAIN_TIME = "5 seconds"

/**
 * Reads and discards the rest of a body, up to `DRAIN_BYTES` or `DRAIN_TIME`, before an early answer (413): the
 * connection closes after that answer, and closing a socket with unread data resets it, so a client still sending
 * would see a broken pipe instead of the answer.
 */
const drainNodeBody = (source: IncomingMessage) =>
  Effect.async<void>((resume) => {
    let left = DRAIN_BYTES
    const onData = (chunk: Buffer) => {
      left -= chunk.length
      if (left < 0) done()
    }
    const detach = () => {
      source.off("data", onData)
      source.off("end", done)
      source.off("error", done)
      source.off("close", done)
    }
    function done() {
      detach()
      resume(Effect.void)
    }
    if (source.readableEnded || source.destroyed) return resume(Effect.void)
    source.on("data", onData)
    source.on("end", done)
    source.on("error", done)
    source.on("close", done)
    source.resume()
    return Effect.sync(detach)
  }).pipe(Effect.timeoutOption(DRAIN_TIME), Effect.asVoid)

/**
 * Reads a node:http body up to `maxBytes`. Past the limit it stops keeping data and drains the rest, so the 413
 * still reaches the client (the platform's reader destroys the socket instead, and the answer is lost).
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
      resume(Effect.zipRight(drainNodeBody(source), tooLarge(maxBytes)))
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

/**
 * The body as a JSON value; the size limit is checked on Content-Length first (the body is then drained, not kept),
 * then while reading.
 */
export const readJson = (maxBytes: number): Effect.Effect<unknown, ApiError, HttpServerRequest.HttpServerRequest> =>
  Effect.gen(function* () {
    const request = yield* HttpServerRequest.HttpServerRequest
    // A web page can POST text/plain or a form to any address without asking first (CSRF); JSON needs a CORS
    // preflight, which this server does not grant.
    const mediaType = (request.headers["content-type"] ?? "").split(";")[0]!.trim().toLowerCase()
    if (mediaType !== "application/json") {
      return yield* unsupportedMediaType(
        `send the request body as JSON with 'Content-Type: application/json' (got ${
          mediaType === "" ? "no Content-Type" : JSON.stringify(truncateForMessage(mediaType))
        })`,
      )
    }
    const source = NodeHttpServerRequest.toIncomingMessage(request)
    const length = Number(request.headers["content-length"] ?? Number.NaN)
    if (length > maxBytes) {
      if (source instanceof IncomingMessage) yield* drainNodeBody(source)
      return yield* tooLarge(maxBytes)
    }
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

/**
 * Decodes a body against a request schema; the first problem becomes the message, its field the `param`. A message
 * that quotes the value ("actual …") is cut short: a field can be a megabyte.
 */
export const decodeBody = <A, I>(schema: Schema.Schema<A, I>, body: unknown): Effect.Effect<A, ApiError> =>
  Schema.decodeUnknown(schema)(body).pipe(
    Effect.mapError((error) => {
      const [issue] = ParseResult.ArrayFormatter.formatErrorSync(error)
      if (issue === undefined) return badRequest("the request body does not match the API")
      const param = issue.path.length > 0 ? issue.path.join(".") : null
      const message = truncateForMessage(issue.message, 200)
      return badRequest(param === null ? message : `${param}: ${message}`, param)
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

const isLoopbackAddress = (address: string) =>
  address === "::1" || /^(::ffff:)?127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(address)

/** A Host header's name without its port (an IPv6 literal without its brackets), lower-cased. */
const hostName = (header: string) => {
  const host = header.trim().toLowerCase()
  if (host.startsWith("[")) return host.slice(1, host.indexOf("]"))
  const colon = host.lastIndexOf(":")
  return colon >= 0 ? host.slice(0, colon) : host
}

/**
 * DNS rebinding: a web page whose name resolves to 127.0.0.1 reads a key-less local server as its own origin. On a
 * connection to a loopback address, the Host header must therefore name a loopback host (localhost, *.localhost,
 * 127.x.x.x, [::1], with any port) or one of `allowedHosts` ("*" allows any). Connections to other addresses, and
 * requests without a Host header (HTTP/1.0; browsers always send one), are not checked.
 */
export const checkHost = (
  allowedHosts: ReadonlyArray<string>,
): Effect.Effect<void, ApiError, HttpServerRequest.HttpServerRequest> =>
  allowedHosts.includes("*")
    ? Effect.void
    : Effect.gen(function* () {
        const request = yield* HttpServerRequest.HttpServerRequest
        const source = NodeHttpServerRequest.toIncomingMessage(request)
        const header = request.headers.host
        if (!(source instanceof IncomingMessage) || header === undefined) return
        if (!isLoopbackAddress(source.socket.localAddress ?? "")) return
        const name = hostName(header)
        if (name === "localhost" || name.endsWith(".localhost") || isLoopbackAddress(name)) return
        if (allowedHosts.includes(name)) return
        return yield* forbiddenHost(
          `the Host header ${JSON.stringify(truncateForMessage(header))} does not name this loopback server; requests ` +
            "from other sites are refused (DNS rebinding). Allow the name with --allowed-host (allowedHosts)",
        )
      })
