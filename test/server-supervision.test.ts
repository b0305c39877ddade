/**
 * The server over a supervised worker engine, with faults injected into the worker (WorkerEngine's test-only
 * TestFault): a worker that exits, throws or hangs is replaced; the requests it carried end cleanly (an SSE error
 * event and [DONE], or a 5xx JSON error without internals); /health reports restarting and then ready; /metrics
 * answers throughout; and the server serves again.
 */
import { modelDir as DEFAULT_MODEL_DIR } from "@offramp/default-model"
import * as WorkerEngine from "@offramp/onnx/WorkerEngine"
import { describe, expect, it } from "vitest"
import { json, metric, postJson, readSse, startServer, type TestServer } from "../packages/server/test/support.js"

const MODEL = "model"
const long = { model: MODEL, prompt: "Once upon a time", max_tokens: 200, temperature: 0.8 }

const pause = (ms: number) => new Promise((r) => setTimeout(r, ms))

/**
 * Polls /health and /metrics until stopped (in two loops: /metrics may wait up to a second for a hung worker's
 * figures): every /health state seen, in order, and every /metrics status.
 */
const watch = (server: TestServer) => {
  const states: Array<string> = []
  const metricsStatuses = new Set<number>()
  let running = true
  let seen = 0
  const healthLoop = (async () => {
    while (running) {
      const health = await fetch(`${server.url}/health`)
      const { status } = await json(health)
      expect(health.status).toBe(status === "ready" ? 200 : 503)
      if (states.at(-1) !== status) states.push(status)
      await pause(5)
    }
  })()
  const metricsLoop = (async () => {
    while (running) {
      const metrics = await fetch(`${server.url}/metrics`)
      metricsStatuses.add(metrics.status)
      await metrics.text()
      await pause(20)
    }
  })()
  return {
    states,
    metricsStatuses,
    /** Waits until /health has said `state` after the state the previous call waited for. */
    until: async (state: string, timeoutMs = 20_000) => {
      const deadline = Date.now() + timeoutMs
      for (;;) {
        const at = states.indexOf(state, seen)
        if (at >= 0) {
          seen = at + 1
          return
        }
        if (Date.now() > deadline) throw new Error(`/health never said ${state}: ${states.join(" → ")}`)
        await pause(10)
      }
    },
    stop: async () => {
      running = false
      await Promise.all([healthLoop, metricsLoop])
    },
  }
}

const serves = async (server: TestServer) => {
  const response = await server.client.completions.create({ ...long, max_tokens: 8 })
  expect(response.choices[0]!.text.length).toBeGreaterThan(0)
}

/** No internals in what a client reads: no worker or parse errors, no stack frames. */
const expectClean = (text: string) => {
  expect(text).not.toMatch(/WorkerError|Expected never|ParseError|\bat .+:\d+:\d+/)
}

describe("a worker that dies", () => {
  it("killed mid-stream (process.exit): the stream ends with an error event and [DONE], /health goes restarting → ready, and the server serves again", async () => {
    const server = await startServer(
      WorkerEngine.layer(DEFAULT_MODEL_DIR, {}, { testFault: { kind: "exit", afterBatches: 5 } }),
    )
    const health = watch(server)
    try {
      await health.until("ready")
      const response = await postJson(`${server.url}/v1/completions`, { ...long, stream: true })
      expect(response.status).toBe(200)
      const { chunks, done, text } = await readSse(response)
      expect(done).toBe(true)
      expect(chunks.at(-1).error.code).toBe("engine_unavailable")
      expect(chunks.at(-1).error.message).toMatch(/engine worker failed .*retry/)
      expect(chunks.filter((c) => c.choices !== undefined).length).toBeGreaterThan(0)
      expectClean(text)

      // Refused cleanly while the new worker starts (if the request lands then), then served.
      const during = await postJson(`${server.url}/v1/completions`, { ...long, max_tokens: 4 })
      if (during.status !== 200) {
        expect(during.status).toBe(503)
        const body = await during.text()
        expectClean(body)
        expect(JSON.parse(body).error.message).toMatch(/restarting/)
      }
      await health.until("restarting")
      await health.until("ready")
      await serves(server)
      await health.stop()
      expect(health.states).toEqual(["ready", "restarting", "ready"])
      expect([...health.metricsStatuses]).toEqual([200])
      const m = await server.metrics()
      expect(metric(m, MODEL, "offramp_engine_restarts_total")).toBe(1)
      expect(metric(m, MODEL, "offramp_engine_state", 'state="ready"')).toBe(1)
      expect(metric(m, MODEL, "offramp_engine_state", 'state="restarting"')).toBe(0)
    } finally {
      await health.stop()
      await server.close()
    }
  })

  it("an uncaught exception in the worker ends an in-flight non-streaming request with a clean 503", async () => {
    const server = await startServer(
      WorkerEngine.layer(DEFAULT_MODEL_DIR, {}, { testFault: { kind: "throw", afterBatches: 5 } }),
    )
    const health = watch(server)
    try {
      const response = await postJson(`${server.url}/v1/completions`, long)
      expect(response.status).toBe(503)
      const body = await response.text()
      expectClean(body)
      expect(JSON.parse(body).error).toMatchObject({ type: "server_error", code: "engine_unavailable" })
      await health.until("restarting")
      await health.until("ready")
      await serves(server)
      expect(metric(await server.metrics(), MODEL, "offramp_engine_restarts_total")).toBe(1)
    } finally {
      await health.stop()
      await server.close()
    }
  })
})

describe("a worker that hangs", () => {
  it("misses its step deadline and is replaced: the stalled stream ends with an error event, /metrics answers meanwhile", async () => {
    const deadlineMs = 1000
    const server = await startServer(
      WorkerEngine.layer(
        DEFAULT_MODEL_DIR,
        {},
        { stepDeadline: `${deadlineMs} millis`, testFault: { kind: "hang", afterBatches: 5 } },
      ),
    )
    const health = watch(server)
    try {
      const response = await postJson(`${server.url}/v1/completions`, { ...long, stream: true })
      expect(response.status).toBe(200)
      const reader = response.body!.getReader()
      await reader.read()
      // The worker hangs within a few steps of the first token; from then on the stream stalls.
      const stalled = Date.now()
      let text = ""
      for (;;) {
        const { done, value } = await reader.read()
        if (done) break
        text += new TextDecoder().decode(value)
      }
      const ended = Date.now() - stalled
      // The deadline, the ping interval (a quarter of it) and the close of the hung thread, with room for a busy CI.
      expect(ended).toBeLessThan(deadlineMs * 1.25 + 500 + 1500)
      expect(text.endsWith("data: [DONE]\n\n")).toBe(true)
      const events = text.split("\n\n").filter((b) => b.startsWith("data: {"))
      const last = JSON.parse(events.at(-1)!.slice("data: ".length))
      expect(last.error.message).toMatch(/stopped responding .*retry/)
      expectClean(text)

      await health.until("restarting")
      await health.until("ready")
      await serves(server)
      await health.stop()
      expect(health.states).toEqual(["ready", "restarting", "ready"])
      expect([...health.metricsStatuses]).toEqual([200])
      expect(metric(await server.metrics(), MODEL, "offramp_engine_restarts_total")).toBe(1)
    } finally {
      await health.stop()
      await server.close()
    }
  })
})
