/**
 * The embedded default model (models/default, trained by tools/train), used when a command gets no --model.
 */
import { fileURLToPath } from "node:url"
import { Options } from "@effect/cli"
import { Option } from "effect"

export const DEFAULT_MODEL_DIR = fileURLToPath(new URL("../../../models/default", import.meta.url))

/** `--model DIR`, defaulting to the embedded model. */
export const modelOption = Options.directory("model").pipe(
  Options.withDescription("a staged model directory (default: the embedded model, models/default)"),
  Options.optional,
  Options.map(Option.getOrElse(() => DEFAULT_MODEL_DIR)),
)
