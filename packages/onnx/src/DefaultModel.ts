/**
 * The embedded default model of the repository (models/default, trained by tools/train; see models/README.md).
 */
import { fileURLToPath } from "node:url"

export const DEFAULT_MODEL_DIR = fileURLToPath(new URL("../../../models/default", import.meta.url))

/** Held-out text of the default model's corpus (never trained on, never calibrated on): its quality figures' text. */
export const DEFAULT_MODEL_HELDOUT = fileURLToPath(new URL("../../../models/heldout-sample.txt", import.meta.url))
