/**
 * What /health and /metrics report: the engine's state (`ready`, `restarting` while a new engine worker replaces one
 * that died or hung, `stopped`), or `draining` once shutdown began. Only `ready` takes requests.
 */
import { EngineState } from "@offramp/core/Engine"
import { Schema } from "effect"

export const ServerState = Schema.Literal(...EngineState.literals, "draining")
export type ServerState = typeof ServerState.Type
