/**
 * `--model DIR`, defaulting to the embedded model (models/default) when a command gets none.
 */
import { Options } from "@effect/cli"
import { modelDir as DEFAULT_MODEL_DIR } from "@offramp/default-model"
import { Option } from "effect"

export const modelOption = Options.directory("model").pipe(
  Options.withDescription("a staged model directory (default: the embedded model, models/default)"),
  Options.optional,
  Options.map(Option.getOrElse(() => DEFAULT_MODEL_DIR)),
)
