/**
 * Typed errors of the checkpoint readers, beyond core's CheckpointError. Each message names the file or tensor at
 * fault and what the user can do.
 */
import { Schema } from "effect"

/** A safetensors file or shard index is unreadable: truncated, a malformed header, a missing shard. */
export class SafetensorsError extends Schema.TaggedError<SafetensorsError>()("SafetensorsError", {
  path: Schema.String,
  reason: Schema.Literal("truncated", "header", "missing-shard", "dtype", "io"),
  message: Schema.String,
}) {}

/** config.json describes a model family the converter does not handle. */
export class UnsupportedArchitectureError extends Schema.TaggedError<UnsupportedArchitectureError>()(
  "UnsupportedArchitectureError",
  {
    path: Schema.String,
    architecture: Schema.String,
    message: Schema.String,
  },
) {}

/** A tensor the config requires is not in the checkpoint. */
export class MissingTensorError extends Schema.TaggedError<MissingTensorError>()("MissingTensorError", {
  path: Schema.String,
  tensor: Schema.String,
  message: Schema.String,
}) {}

/** A tensor's shape disagrees with config.json. */
export class TensorShapeError extends Schema.TaggedError<TensorShapeError>()("TensorShapeError", {
  path: Schema.String,
  tensor: Schema.String,
  expected: Schema.Array(Schema.Number),
  actual: Schema.Array(Schema.Number),
  message: Schema.String,
}) {}
