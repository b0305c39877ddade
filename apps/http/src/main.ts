/**
 * `offramp-http`: the standalone OpenAI-compatible server.
 */
import { Command, ValidationError } from "@effect/cli"
import * as NodeContext from "@effect/platform-node/NodeContext"
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import { Cause, Console, Effect } from "effect"
import { serveCommand } from "./command.js"

const cli = Command.run(serveCommand("offramp-http"), { name: "offramp-http", version: "0.1.0" })

/** One actionable line on stderr and exit code 1 (2 for a malformed command line), never a stack dump. */
const describe = (error: unknown) =>
  typeof error === "object" && error !== null && "_tag" in error && "message" in error
    ? `${String(error._tag)}: ${String(error.message)}`
    : String(error)

cli(process.argv).pipe(
  Effect.catchAllCause((cause) => {
    const failure = Cause.failureOption(cause)
    if (failure._tag === "Some" && ValidationError.isValidationError(failure.value)) {
      return Effect.sync(() => {
        process.exitCode = 2
      })
    }
    const message =
      failure._tag === "Some" ? describe(failure.value) : `internal error: ${Cause.pretty(cause).split("\n")[0]}`
    return Console.error(`offramp-http: ${message}`).pipe(
      Effect.andThen(() => {
        process.exitCode = 1
      }),
    )
  }),
  Effect.provide(NodeContext.layer),
  NodeRuntime.runMain({ disableErrorReporting: true }),
)
