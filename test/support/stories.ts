/**
 * Paths to the stories260K reference model in ../shared, and a converter into a temporary staged directory.
 */
import { mkdtempSync } from "node:fs"
import { tmpdir } from "node:os"
import { join, resolve } from "node:path"
import { readLlama2cCheckpoint } from "@offramp/convert/Llama2cCheckpoint"
import { readLlama2cTokenizer, toHuggingFaceTokenizerJson } from "@offramp/convert/Llama2cTokenizer"
import { writeStagedModel } from "@offramp/convert/StagedModelWriter"
import { Effect } from "effect"

export const REPO_ROOT = resolve(import.meta.dirname, "../..")
export const STORIES_DIR = resolve(REPO_ROOT, "../shared/models/stories260K")
export const STORIES_CHECKPOINT = join(STORIES_DIR, "stories260K.bin")
export const STORIES_TOKENIZER = join(STORIES_DIR, "tok512.bin")

/** The reference continuation of "Once upon a time" (run.c -t 0 -n 64): the 60 generated tokens' text. */
export const REFERENCE_CONTINUATION =
  ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. " +
  "She wanted to play with it, but it was too high.\nLily"

/** run.c's whole greedy output for "Once upon a time": the prompt and its continuation. */
export const REFERENCE_TEXT = `Once upon a time${REFERENCE_CONTINUATION}`

/** run.c's whole greedy sequence for "Once upon a time" (BOS, 4 prompt ids, 60 generated). */
export const REFERENCE_IDS = [
  1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419,
  292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352, 266, 268, 388, 426, 338, 391,
  266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270, 333, 415, 426, 13, 438, 310,
]

export const tempDir = (prefix: string) => mkdtempSync(join(tmpdir(), `offramp-${prefix}-`))

/** Converts stories260K into `outDir` with the library (the CLI test converts through the command). */
export const convertStories = (outDir: string, exits?: ReadonlyArray<number>) =>
  Effect.runPromise(
    Effect.gen(function* () {
      const weights = yield* readLlama2cCheckpoint(STORIES_CHECKPOINT)
      const vocab = yield* readLlama2cTokenizer(STORIES_TOKENIZER)
      return yield* writeStagedModel(weights, outDir, {
        name: "stories260K",
        source: "test",
        tokens: { bos: 1, eos: 2, stop: [1, 2] },
        tokenizer: toHuggingFaceTokenizerJson(vocab),
        ...(exits ? { exits } : {}),
      })
    }),
  )
