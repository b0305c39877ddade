/**
 * Turns failures into one actionable line on stderr and a non-zero exit code, never a stack dump.
 */
import { ValidationError } from "@effect/cli"
import { Cause, Console, Effect } from "effect"

const describe = (error: unknown): string => {
  if (typeof error === "object" && error !== null && "_tag" in error) {
    const e = error as { _tag: string; message?: string; path?: string; stage?: string }
    const where = e.path ? ` (${e.path})` : e.stage ? ` (${e.stage})` : ""
    return `${e._tag}${where}: ${e.message ?? ""}`
  }
  return String(error)
}

export const reportFailure = <A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<A | undefined, never, R> =>
  self.pipe(
    Effect.catchAllCause((cause) => {
      const failure = Cause.failureOption(cause)
      // @effect/cli has already printed its own message (unknown flag, missing option) with the help.
      if (failure._tag === "Some" && ValidationError.isValidationError(failure.value)) {
        return Effect.sync(() => {
          process.exitCode = 2
          return undefined
        })
      }
      const message =
        failure._tag === "Some" ? describe(failure.value) : `internal error: ${Cause.pretty(cause).split("\n")[0]}`
      return Console.error(`offramp: ${message}`).pipe(
        Effect.andThen(() => {
          process.exitCode = 1
          return undefined
        }),
      )
    }),
  )
