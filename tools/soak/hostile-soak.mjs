#!/usr/bin/env node
/**
 * A soak of `offramp serve` with hostile clients mixed in among well-behaved ones.
 *
 * Starts the real server (the CLI's bin run by node directly, as a supervisor would) on a free port and runs, for
 * `--minutes`:
 *   - a baseline phase (the first third): `--clients` well-behaved clients only, each a closed loop of streaming
 *     completions through the official `openai` client;
 *   - a hostile phase (the rest): the same clients, plus hostile ones: hogs looping requests of 64 sequences (4 prompts
 *     × n = 16, and now and then 16 prompts × n = 16, which the server refuses),
 *     clients that disconnect mid-stream, 900 KB prompts (over the context), malformed and out-of-range requests,
 *     and slow readers that stop reading their stream for seconds.
 * The server's resident memory is sampled every 2 s (from /proc), and at the end, once idle, its KV blocks in use.
 * Prints a JSON summary: well-behaved requests, errors, tokens/s and time to first token per phase; hostile outcomes
 * by kind; RSS; KV. Exits non-zero if a well-behaved request failed or KV blocks stay in use.
 *
 *   node tools/soak/hostile-soak.mjs --minutes 3 --clients 8 [--model DIR]
 */
import { spawn } from "node:child_process"
import { readFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { parseArgs } from "node:util"
import OpenAI from "openai"

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..")
const { values: args } = parseArgs({
  options: {
    minutes: { type: "string", default: "3" },
    clients: { type: "string", default: "8" },
    "max-tokens": { type: "string", default: "32" },
    model: { type: "string" },
  },
})
const minutes = Number(args.minutes)
const clients = Number(args.clients)
const maxTokens = Number(args["max-tokens"])
const PROMPTS = ["And the king said", "In the beginning", "The people of the United States", "Then Jesus said"]

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const quantile = (xs, q) => {
  if (xs.length === 0) return null
  const sorted = [...xs].sort((a, b) => a - b)
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]
}

const startServer = () =>
  new Promise((resolve, reject) => {
    const serveArgs = [join(root, "apps/cli/bin/offramp.js"), "serve", "--port", "0"]
    if (args.model) serveArgs.push("--model", args.model)
    const child = spawn(process.execPath, serveArgs, { stdio: ["ignore", "ignore", "pipe"] })
    let stderr = ""
    child.stderr.on("data", (chunk) => {
      stderr += chunk
      const match = /serving \S+ at (http:\/\/\S+)/.exec(stderr)
      if (match) resolve({ child, url: match[1].replace("0.0.0.0", "127.0.0.1") })
    })
    child.on("exit", (code) => reject(new Error(`the server exited (${code}) before listening:\n${stderr}`)))
  })

const rssMb = (pid) => {
  const line = readFileSync(`/proc/${pid}/status`, "utf8")
    .split("\n")
    .find((l) => l.startsWith("VmRSS:"))
  return Number(line.split(/\s+/)[1]) / 1024
}

const metric = async (url, name) => {
  const text = await (await fetch(`${url}/metrics`)).text()
  const line = text.split("\n").find((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `))
  return line === undefined ? null : Number(line.split(" ").at(-1))
}

const main = async () => {
  const { child, url } = await startServer()
  const openai = new OpenAI({ baseURL: `${url}/v1`, apiKey: "unused", maxRetries: 0 })
  const model = (await openai.models.list()).data[0].id
  const started = performance.now()
  const endAt = started + minutes * 60_000
  const hostileFrom = started + (minutes * 60_000) / 3
  const phaseOf = (t) => (t < hostileFrom ? "baseline" : "hostile")
  const good = { baseline: newPhase(), hostile: newPhase() }
  const hostile = {}
  const note = (kind, outcome) => {
    hostile[kind] ??= {}
    hostile[kind][outcome] = (hostile[kind][outcome] ?? 0) + 1
  }
  const rss = []
  const sampler = setInterval(() => rss.push({ s: (performance.now() - started) / 1000, mb: rssMb(child.pid) }), 2000)

  const wellBehaved = async (i) => {
    while (performance.now() < endAt) {
      const t0 = performance.now()
      const phase = good[phaseOf(t0)]
      try {
        const stream = await openai.completions.create({
          model,
          prompt: PROMPTS[i % PROMPTS.length],
          max_tokens: maxTokens,
          temperature: 0.8,
          stream: true,
        })
        let first
        let tokens = 0
        for await (const chunk of stream) {
          if (chunk.choices[0]?.text) {
            first ??= performance.now()
            tokens++
          }
        }
        phase.requests++
        phase.tokens += tokens
        phase.ttftMs.push(first - t0)
      } catch (error) {
        phase.errors++
        phase.errorMessages.add(String(error?.message ?? error).slice(0, 200))
      }
    }
  }

  const post = (body, init = {}) =>
    fetch(`${url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: typeof body === "string" ? body : JSON.stringify(body),
      ...init,
    })

  const hostileLoop = async (kind, once) => {
    while (performance.now() < hostileFrom) await sleep(100)
    while (performance.now() < endAt) {
      try {
        note(kind, await once())
      } catch (error) {
        note(kind, `threw: ${String(error?.cause?.code ?? error?.name ?? error)}`)
      }
    }
  }

  const hog = async () => {
    // The largest request the server takes (a quarter of its 256-sequence queue: 64 sequences), or, every fourth
    // time, one it refuses (16 prompts × n = 16).
    const big = Math.random() < 0.25
    const response = await post({
      model,
      prompt: Array.from({ length: big ? 16 : 4 }, (_, i) => PROMPTS[i % PROMPTS.length]),
      n: 16,
      max_tokens: 100,
      temperature: 1,
    })
    await response.arrayBuffer()
    if (response.status !== 200) await sleep(200)
    return `status ${response.status}`
  }
  const disconnector = async () => {
    const controller = new AbortController()
    const response = await post(
      { model, prompt: PROMPTS[0], max_tokens: 200, stream: true },
      { signal: controller.signal },
    )
    const reader = response.body.getReader()
    await reader.read()
    await sleep(20 + Math.random() * 200)
    controller.abort()
    return `status ${response.status}, aborted`
  }
  const bigPrompt = async () => {
    const response = await post({ model, prompt: "word ".repeat(180_000), max_tokens: 4 })
    await response.arrayBuffer()
    await sleep(500)
    return `status ${response.status}`
  }
  const garbage = async () => {
    const bodies = [
      "{",
      "[]",
      JSON.stringify({ model, prompt: 5 }),
      JSON.stringify({ model, prompt: "x", n: 1000 }),
      JSON.stringify({ model, prompt: "x", max_tokens: -3 }),
      JSON.stringify({ model, prompt: "x", temperature: "hot" }),
    ]
    const response = await post(bodies[Math.floor(Math.random() * bodies.length)])
    await response.arrayBuffer()
    await sleep(50)
    return `status ${response.status}`
  }
  const slowReader = async () => {
    const response = await post({ model, prompt: PROMPTS[1], max_tokens: 200, stream: true })
    const reader = response.body.getReader()
    for (;;) {
      const { done } = await reader.read()
      if (done) break
      await sleep(3000)
      if (performance.now() > endAt) {
        await reader.cancel()
        return `status ${response.status}, cancelled at the end`
      }
    }
    return `status ${response.status}, read to the end`
  }

  await Promise.all([
    ...Array.from({ length: clients }, (_, i) => wellBehaved(i)),
    hostileLoop("hog (4 or 16 prompts × n = 16)", hog),
    hostileLoop("hog (4 or 16 prompts × n = 16)", hog),
    hostileLoop("disconnects mid-stream", disconnector),
    hostileLoop("disconnects mid-stream", disconnector),
    hostileLoop("900 KB prompt", bigPrompt),
    hostileLoop("malformed or out-of-range request", garbage),
    hostileLoop("slow reader", slowReader),
  ])
  clearInterval(sampler)
  // Idle: the hostile requests' sequences were cancelled or finished.
  let kvUsed = null
  for (let i = 0; i < 200; i++) {
    kvUsed = await metric(url, "offramp_kv_blocks_used")
    if (kvUsed === 0) break
    await sleep(100)
  }
  child.kill("SIGTERM")
  const summarize = (p) => ({
    requests: p.requests,
    errors: p.errors,
    errorMessages: [...p.errorMessages],
    tokensPerSecond: Math.round(p.tokens / (p.seconds || 1)),
    ttftMsP50: Math.round(quantile(p.ttftMs, 0.5) ?? 0),
    ttftMsP95: Math.round(quantile(p.ttftMs, 0.95) ?? 0),
  })
  good.baseline.seconds = (hostileFrom - started) / 1000
  good.hostile.seconds = (endAt - hostileFrom) / 1000
  const settled = rss.filter((r) => r.s > 20)
  const summary = {
    minutes,
    clients,
    maxTokens,
    wellBehaved: { baseline: summarize(good.baseline), hostile: summarize(good.hostile) },
    hostile,
    rssMb: {
      first: settled[0]?.mb.toFixed(1),
      last: settled.at(-1)?.mb.toFixed(1),
      max: Math.max(...settled.map((r) => r.mb)).toFixed(1),
      // The largest sample of each 30 s: a leak climbs from one to the next, settling heaps level off.
      byHalfMinute: settled.reduce((out, r) => {
        const i = Math.floor((r.s - settled[0].s) / 30)
        out[i] = Math.max(out[i] ?? 0, Number(r.mb.toFixed(1)))
        return out
      }, []),
    },
    kvBlocksUsedWhenIdle: kvUsed,
  }
  console.log(JSON.stringify(summary, null, 2))
  const failed = good.baseline.errors + good.hostile.errors > 0 || kvUsed !== 0
  process.exit(failed ? 1 : 0)
}

function newPhase() {
  return { requests: 0, errors: 0, tokens: 0, ttftMs: [], errorMessages: new Set(), seconds: 0 }
}

main().catch((error) => {
  console.error(error)
  process.exit(2)
})
