/**
 * The embedded default model of the repository (models/default, trained by tools/train; see models/README.md).
 */
import { fileURLToPath } from "node:url"

export const DEFAULT_MODEL_DIR = fileURLToPath(new URL("../../../models/default", import.meta.url))
