/**
 * `offramp inspect DIR`: the model's spec and files (handlers/inspect.ts, imported when it runs).
 */
import { Args, Command, Options } from "@effect/cli"
import { Effect } from "effect"

const dir = Args.directory({ name: "model-dir" }).pipe(Args.withDescription("a staged model directory"))
const load = Options.boolean("load").pipe(
  Options.withDescription("also load the model and report what its weights and K/V pools take in memory"),
)

export const inspect = Command.make("inspect", { dir, load }, ({ dir, load }) =>
  Effect.flatMap(
    Effect.promise(() => import("../handlers/inspect.js")),
    (handler) => handler.handle(dir, load),
  ),
).pipe(Command.withDescription("print a staged model's spec"))
