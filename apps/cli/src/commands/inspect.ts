/**
 * `offramp inspect DIR`: the model's spec and files (handlers/inspect.ts, imported when it runs).
 */
import { Args, Command } from "@effect/cli"
import { Effect } from "effect"

const dir = Args.directory({ name: "model-dir" }).pipe(Args.withDescription("a staged model directory"))

export const inspect = Command.make("inspect", { dir }, ({ dir }) =>
  Effect.flatMap(
    Effect.promise(() => import("../handlers/inspect.js")),
    (handler) => handler.handle(dir),
  ),
).pipe(Command.withDescription("print a staged model's spec"))
