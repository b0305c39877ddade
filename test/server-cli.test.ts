/**
 * The server as a process: `offramp serve` and the standalone `offramp-http` bind, answer the openai client, and
 * shut down cleanly on SIGTERM, within the shutdown grace even when a stream would outlive it, also as the README's
 * supervisor command and under npx; bad flags fail with one clean line.
 */
import { type ChildProcess, spawn } from "node:child_process"
import { createServer } from "node:net"
import { join } from "node:path"
import OpenAI from "openai"
import { beforeAll, describe, expect, it } from "vitest"
import { TEST_FAULT_ENV } from "../apps/http/src/index.js"
import { json, postJson } from "../packages/server/test/support.js"
import { expectCleanFailure, runCli } from "./support/cli.js"
import { convertStories, REPO_ROOT, tempDir } from "./support/stories.js"

let modelDir = ""
beforeAll(async () => {
  modelDir = tempDir("server-cli")
  await convertStories(modelDir)
})

const OFFRAMP = join(REPO_ROOT, "apps/cli/bin/offramp.js")
const OFFRAMP_HTTP = join(REPO_ROOT, "apps/http/bin/offramp-http.js")

interface Running {
  readonly child: ChildProcess
  readonly url: string
  readonly stderr: () => string
  readonly exit: Promise<number | null>
}

/**
 * Starts a server process (node with `args`, or `command`) and waits for its "serving … at URL" line. `exit` settles
 * when the process exits, `closed` when every process that holds its output (npm's children too) has.
 */
const launch = (
  args: ReadonlyArray<string>,
  env: Record<string, string> = {},
  options: { readonly command?: string; readonly detached?: boolean } = {},
): Promise<Running & { readonly closed: Promise<void> }> =>
  new Promise((resolve, reject) => {
    const child = spawn(options.command ?? process.execPath, args, {
      cwd: REPO_ROOT,
      env: { ...process.env, ...env },
      detached: options.detached ?? false,
    })
    let stderr = ""
    const exit = new Promise<number | null>((done) => child.on("exit", (code) => done(code)))
    const closed = new Promise<void>((done) => child.on("close", () => done()))
    const timer = setTimeout(() => reject(new Error(`no address within 60 s: ${stderr}`)), 60_000)
    child.stderr.on("data", (data: Buffer) => {
      stderr += data.toString()
      const match = /serving \S+ at (http:\/\/[^\s]+)/.exec(stderr)
      if (match) {
        clearTimeout(timer)
        resolve({ child, url: match[1]!, stderr: () => stderr, exit, closed })
      }
    })
    child.on("exit", (code) => {
      clearTimeout(timer)
      reject(new Error(`exited with ${code} before serving: ${stderr}`))
    })
  })

/** Whether the server's port can be bound again (nothing listens on it any more). */
const portIsFree = (url: string): Promise<boolean> =>
  new Promise((resolve) => {
    const probe = createServer()
    probe.once("error", () => resolve(false))
    probe.listen(Number(new URL(url).port), "127.0.0.1", () => probe.close(() => resolve(true)))
  })

describe("server processes", () => {
  it("`offramp serve` and `offramp-http` serve the openai client and stop cleanly on SIGTERM", async () => {
    const [cli, standalone] = await Promise.all([
      launch([OFFRAMP, "serve", "--model", modelDir, "--port", "0"]),
      launch([OFFRAMP_HTTP, "--model", modelDir, "--port", "0", "--served-model-name", "tiny"], {
        OFFRAMP_API_KEY: "sk-env",
      }),
    ])
    expect(cli.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/)
    const a = new OpenAI({ baseURL: `${cli.url}/v1`, apiKey: "unused", maxRetries: 0 })
    const b = new OpenAI({ baseURL: `${standalone.url}/v1`, apiKey: "sk-env", maxRetries: 0 })
    const [ra, rb] = await Promise.all([
      a.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 8, temperature: 0 }),
      b.completions.create({ model: "tiny", prompt: "Once upon a time", max_tokens: 8, temperature: 0 }),
    ])
    expect(rb.choices[0]!.text).toBe(ra.choices[0]!.text)
    expect(standalone.stderr()).toContain("API key required")
    const wrongKey = new OpenAI({ baseURL: `${standalone.url}/v1`, apiKey: "nope", maxRetries: 0 })
    await expect(wrongKey.models.list()).rejects.toBeInstanceOf(OpenAI.AuthenticationError)

    cli.child.kill("SIGTERM")
    standalone.child.kill("SIGTERM")
    expect(await cli.exit).toBe(0)
    expect(await standalone.exit).toBe(0)
    expect(cli.stderr()).toContain("shutting down")
  })

  it("SIGTERM with a stream that outlives the grace (its worker hung): 503 while draining, the stream ends with an error event and [DONE], the process exits within grace + 2 s", async () => {
    const grace = 1
    // The default model; its worker hangs after a few steps (the test-only fault), so the stream never ends itself.
    const server = await launch([OFFRAMP, "serve", "--port", "0", "--shutdown-grace", String(grace)], {
      [TEST_FAULT_ENV]: "hang:5",
    })
    const body = { model: "model", prompt: "Once upon a time", max_tokens: 200 }
    const response = await postJson(`${server.url}/v1/completions`, { ...body, stream: true })
    expect(response.status).toBe(200)
    const reader = response.body!.getReader()
    let text = new TextDecoder().decode((await reader.read()).value)
    const rest = (async () => {
      for (;;) {
        const { done, value } = await reader.read()
        if (done) return text
        text += new TextDecoder().decode(value)
      }
    })()

    const signalled = Date.now()
    server.child.kill("SIGTERM")
    const exited = server.exit.then((code) => ({ code, afterMs: Date.now() - signalled }))
    await new Promise((r) => setTimeout(r, 200))
    const health = await fetch(`${server.url}/health`)
    expect(health.status).toBe(503)
    expect((await json(health)).status).toBe("draining")
    const refused = await postJson(`${server.url}/v1/completions`, body)
    expect(refused.status).toBe(503)
    expect((await json(refused)).error.message).toMatch(/shutting down/)

    const streamed = await rest
    expect(streamed.endsWith("data: [DONE]\n\n")).toBe(true)
    const events = streamed.split("\n\n").filter((b) => b.startsWith("data: {"))
    expect(JSON.parse(events.at(-1)!.slice("data: ".length)).error.code).toBe("engine_unavailable")
    const { code, afterMs } = await exited
    expect(afterMs).toBeLessThan((grace + 2) * 1000)
    expect(code).toBe(0)
  })

  it("the README's supervisor command gets the SIGTERM itself: it drains, exits 0 and frees its port", async () => {
    const server = await launch(
      ["serve", "--model", modelDir, "--port", "0"],
      {},
      { command: "node_modules/.bin/offramp" },
    )
    server.child.kill("SIGTERM")
    expect(await server.exit).toBe(0)
    expect(server.stderr()).toContain("shutting down")
    expect(await portIsFree(server.url)).toBe(true)
  })

  it("under npx, a SIGTERM to npm (which npm does not pass on) still shuts the orphaned server down", async () => {
    // Its own process group, so that whatever is left can be ended by the group's id if the test fails.
    const server = await launch(
      ["--no-install", "offramp", "serve", "--model", modelDir, "--port", "0"],
      {},
      { command: "npx", detached: true },
    )
    try {
      server.child.kill("SIGTERM")
      const gone = await Promise.race([
        server.closed.then(() => true),
        new Promise<boolean>((done) => setTimeout(() => done(false), 10_000)),
      ])
      expect(gone).toBe(true)
      expect(server.stderr()).toContain("shutting down")
      expect(await portIsFree(server.url)).toBe(true)
    } finally {
      try {
        process.kill(-server.child.pid!, "SIGKILL")
      } catch {
        // The group is gone already.
      }
    }
  })

  it("bad flags fail with one clean line", async () => {
    const [result, missing] = await Promise.all([
      runCli(["serve", "--model", modelDir, "--max-queued", "0"]),
      runCli(["serve", "--model", join(modelDir, "nope")]),
    ])
    expect(expectCleanFailure(result, "--max-queued must be a positive integer")).toEqual({
      failed: true,
      mentions: true,
      stackFree: true,
    })
    expect(missing.code).not.toBe(0)
    expect(missing.stderr).not.toMatch(/^\s+at .+:\d+:\d+\)?$/m)
  })

  it("a port out of range or in use fails with one clean line that says so", async () => {
    const taken = createServer()
    await new Promise<void>((resolve) => taken.listen(0, "127.0.0.1", resolve))
    const address = taken.address()
    const port = typeof address === "object" && address !== null ? address.port : 0
    try {
      const [range, inUse] = await Promise.all([
        runCli(["serve", "--model", modelDir, "--port", "99999"]),
        runCli(["serve", "--model", modelDir, "--port", String(port)]),
      ])
      expect(expectCleanFailure(range, "--port must be in 0..65535, got 99999")).toEqual({
        failed: true,
        mentions: true,
        stackFree: true,
      })
      expect(expectCleanFailure(inUse, `port ${port} is in use on 127.0.0.1; choose another port`)).toEqual({
        failed: true,
        mentions: true,
        stackFree: true,
      })
      expect(inUse.stderr).toContain("--port")
    } finally {
      await new Promise((resolve) => taken.close(resolve))
    }
  })
})
