/**
 * Typed errors of Offramp. Every message says what went wrong and what the user can do about it.
 */
import { ParseResult, Schema } from "effect"

/** A model directory is missing, incomplete or unreadable. */
export class ModelLoadError extends Schema.TaggedError<ModelLoadError>()("ModelLoadError", {
  path: Schema.String,
  message: Schema.String,
}) {}

/** A checkpoint or tokenizer file does not match its format (size, header, tensor shapes). */
export class CheckpointError extends Schema.TaggedError<CheckpointError>()("CheckpointError", {
  path: Schema.String,
  message: Schema.String,
}) {}

/** The tokenizer could not be loaded or could not encode/decode. */
export class TokenizerError extends Schema.TaggedError<TokenizerError>()("TokenizerError", {
  message: Schema.String,
}) {}

/** A request that can never be served as asked (bad parameters, prompt longer than the context). */
export class InvalidRequestError extends Schema.TaggedError<InvalidRequestError>()("InvalidRequestError", {
  message: Schema.String,
}) {}

/** onnxruntime failed while running a graph. */
export class RunnerError extends Schema.TaggedError<RunnerError>()("RunnerError", {
  stage: Schema.String,
  message: Schema.String,
}) {}

/** The engine stopped (shut down or crashed) while the request was in flight. */
export class EngineStoppedError extends Schema.TaggedError<EngineStoppedError>()("EngineStoppedError", {
  message: Schema.String,
}) {}

/** What a generation stream can fail with. */
export type GenerationError = InvalidRequestError | TokenizerError | RunnerError | EngineStoppedError

/** A value quoted in an error message, cut to `max` characters: an error never echoes a large input back. */
export const truncateForMessage = (text: string, max = 100): string =>
  text.length > max ? `${text.slice(0, max)}… (${text.length} characters)` : text

/** A schema failure as short "path: problem" lines, instead of the whole type tree. */
export const describeParseError = (error: ParseResult.ParseError): string =>
  ParseResult.ArrayFormatter.formatErrorSync(error)
    .map((issue) => (issue.path.length > 0 ? `${issue.path.join(".")}: ${issue.message}` : issue.message))
    .join("; ")
