// Where the default model's files are: inside this package once packed (`npm pack` copies them in), and in the
// repository's models/ folder, where the training tools write them, before that.
import { existsSync } from "node:fs"
import { fileURLToPath } from "node:url"

const packed = fileURLToPath(new URL("./model", import.meta.url))
const inRepository = existsSync(packed) ? undefined : fileURLToPath(new URL("../../models", import.meta.url))

/** The staged model directory (model.json, graphs, tokenizer, exit classifiers, calibration). */
export const modelDir = inRepository === undefined ? packed : `${inRepository}/default`

/** Held-out text of the model's corpus (never trained or calibrated on): the text its quality figures are measured on. */
export const heldoutText =
  inRepository === undefined ? `${packed}/heldout-sample.txt` : `${inRepository}/heldout-sample.txt`
