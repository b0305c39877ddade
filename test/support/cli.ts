/**
 * Runs the real `offramp` command in a child process.
 */
import { execFile } from "node:child_process"
import { join } from "node:path"
import { REPO_ROOT } from "./stories.js"

export interface CliResult {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
}

const BIN = join(REPO_ROOT, "apps/cli/bin/offramp.js")

export const runCli = (args: ReadonlyArray<string>): Promise<CliResult> =>
  new Promise((resolve) => {
    execFile(
      process.execPath,
      [BIN, ...args],
      { cwd: REPO_ROOT, maxBuffer: 64 * 1024 * 1024 },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === "number" ? error.code : 1) : 0
        resolve({ code, stdout, stderr })
      },
    )
  })

/** A failure a user can act on: non-zero exit, one `offramp:` line, no JavaScript stack frames. */
export const expectCleanFailure = (result: CliResult, fragment: string | RegExp) => ({
  failed: result.code !== 0,
  mentions: typeof fragment === "string" ? result.stderr.includes(fragment) : fragment.test(result.stderr),
  stackFree: !/^\s+at .+:\d+:\d+\)?$/m.test(result.stderr),
})

/** The JSON objects of a `--json` output, one per line. */
// biome-ignore lint/suspicious/noExplicitAny: test output is inspected field by field
export const jsonLines = (stdout: string): Array<any> =>
  stdout
    .trim()
    .split("\n")
    .map((line) => JSON.parse(line))
