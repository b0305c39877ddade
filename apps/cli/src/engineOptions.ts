/**
 * Engine flags shared by the commands that run the engine.
 */
import { Options } from "@effect/cli"
import { InvalidRequestError } from "@offramp/core/Errors"
import type { OnnxEngineConfig } from "@offramp/onnx/OnnxEngine"
import { Effect, Option } from "effect"

export const kvCacheMb = Options.integer("kv-cache-mb").pipe(
  Options.withDescription("memory for the paged KV cache, in MiB (default 64)"),
  Options.optional,
)
export const threads = Options.integer("threads").pipe(
  Options.withDescription("onnxruntime intra-op threads per session (default 1, measured best for staged models)"),
  Options.optional,
)

export const engineConfig = (flags: {
  readonly kvCacheMb: Option.Option<number>
  readonly threads: Option.Option<number>
}): Effect.Effect<OnnxEngineConfig, InvalidRequestError> => {
  const bad = (flag: string, value: number) =>
    Effect.fail(new InvalidRequestError({ message: `--${flag} must be a positive integer, got ${value}` }))
  if (Option.isSome(flags.kvCacheMb) && flags.kvCacheMb.value < 1) return bad("kv-cache-mb", flags.kvCacheMb.value)
  if (Option.isSome(flags.threads) && flags.threads.value < 1) return bad("threads", flags.threads.value)
  return Effect.succeed({
    runner: {
      ...(Option.isSome(flags.kvCacheMb) ? { kvCacheBytes: flags.kvCacheMb.value * 1024 * 1024 } : {}),
      ...(Option.isSome(flags.threads) ? { threads: flags.threads.value } : {}),
    },
  })
}
