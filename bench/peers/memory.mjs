// Resident memory of each engine × model format, each in a fresh Node.js process, one at a time.
//   node memory.mjs [--offramp-model DIR[,DIR2]] [--gguf FILE[,FILE2]] [--tjs DIR] [--max-tokens 16]
//                   [--prompt TEXT] [--context N] [--no-mmap] [--repeat 1] [--offramp-root ../..]
//                   [--out results/memory.json]
// Per model, a child process loads the engine's library, then the model (as run.mjs does: 1 thread; Offramp's default
// K/V pool of 256 MiB; llama.cpp one context of min(512, the model's context) tokens, created before the "load"
// reading; transformers.js fp32 on the CPU), generates --max-tokens greedy tokens from the same prompt ids, and
// reports its resident set size (RSS): after load, and the peak (process.resourceUsage().maxRSS) after the
// generation. A baseline child per engine loads the same library and no model; "net" is a reading minus the
// baseline's RSS. Every reading is taken after a full garbage collection (node --expose-gc), so collected JavaScript
// garbage does not count; the peak includes whatever was transient during load.
// Linux: /proc/self/status's RssAnon (allocated) and RssFile (file pages, e.g. llama.cpp's mmap of the GGUF) too.
// --no-mmap: llama.cpp reads the GGUF into allocated memory instead of mapping it (node-llama-cpp's useMmap false).
import { spawnSync } from "node:child_process"
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs"
import { basename, dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { argv } from "./lib/checkpoint.mjs"
import {
  llamacpp,
  llamacppLibrary,
  offramp,
  offrampLibrary,
  transformersjs,
  transformersjsLibrary,
} from "./lib/engines.mjs"

const args = argv(process.argv.slice(2))
const root = resolve(args["offramp-root"] ?? process.env.OFFRAMP_ROOT ?? "../..")
const MiB = 1024 * 1024

/** RSS now, with the kernel's split where there is one. Bytes. */
const reading = async () => {
  // V8 frees the backing stores of collected ArrayBuffers (model files read into memory) on a background thread:
  // collect, give it time, collect again.
  globalThis.gc?.()
  await new Promise((r) => setTimeout(r, 200))
  globalThis.gc?.()
  const out = { rss: process.memoryUsage.rss() }
  try {
    const status = readFileSync("/proc/self/status", "utf8")
    for (const [key, name] of [
      ["RssAnon", "rssAnon"],
      ["RssFile", "rssFile"],
    ]) {
      const m = status.match(new RegExp(`^${key}:\\s+(\\d+) kB`, "m"))
      if (m) out[name] = Number(m[1]) * 1024
    }
  } catch {}
  out.maxRss = process.resourceUsage().maxRSS * 1024 // maxRSS is in KiB
  return out
}

// ---- child: one engine, one model (or none: --baseline); prints one JSON line ----
const child = async () => {
  const engine = args.child
  const maxTokens = Number(args["max-tokens"] ?? 16)
  const ids = String(args["prompt-ids"]).split(",").map(Number)
  const start = await reading()
  const t0 = performance.now()
  if (args.baseline) {
    if (engine === "offramp") await offrampLibrary(root)
    else if (engine === "llama.cpp") await llamacppLibrary(1)
    else await transformersjsLibrary()
    const library = await reading()
    process.stdout.write(`${JSON.stringify({ engine, baseline: true, start, library })}\n`)
    return
  }
  let e
  if (engine === "offramp") e = await offramp({ model: args.model, root, threads: 1 })
  else if (engine === "llama.cpp") {
    const useMmap = args["no-mmap"] ? false : undefined
    e = await llamacpp({ model: args.model, contextSize: Number(args.context), threads: 1, useMmap })
    await e.prepare(1)
  } else e = await transformersjs({ model: args.model, threads: 1 })
  const loadMs = performance.now() - t0
  const load = await reading()
  const t1 = performance.now()
  const tokens = Array.from(await e.generate(ids, maxTokens), Number)
  const generateMs = performance.now() - t1
  const generated = await reading()
  const stats = e.stats ? await e.stats() : undefined
  process.stdout.write(
    `${JSON.stringify({ engine, model: args.model, start, load, generated, loadMs, generateMs, tokens, weights: stats?.weights })}\n`,
  )
  // No close: the process exits, and a dispose could only add to the figures already taken.
  process.exit(0)
}

// ---- parent ----
const runChild = (engine, extra) => {
  const r = spawnSync(
    process.execPath,
    [
      "--expose-gc",
      fileURLToPath(import.meta.url),
      "--child",
      engine,
      "--offramp-root",
      root,
      ...extra.flatMap(([k, v]) => (v === true ? [`--${k}`] : [`--${k}`, String(v)])),
    ],
    { encoding: "utf8", maxBuffer: 64 * MiB },
  )
  const line = r.stdout
    .trim()
    .split("\n")
    .reverse()
    .find((l) => l.startsWith("{"))
  if (r.status !== 0 || !line)
    throw new Error(`${engine} ${JSON.stringify(extra)}: exit ${r.status}\n${r.stderr.slice(-4000)}`)
  return JSON.parse(line)
}

const sizeOf = (p) => {
  const s = statSync(p)
  if (!s.isDirectory()) return s.size
  return readdirSync(p).reduce((n, f) => n + sizeOf(join(p, f)), 0)
}

/** `offramp inspect --load DIR`'s weights line: resident and stored MiB (another fresh process, the CLI's defaults). */
const inspect = (dir) => {
  const r = spawnSync(process.execPath, [join(root, "apps/cli/bin/offramp.js"), "inspect", "--load", dir], {
    encoding: "utf8",
  })
  const m = r.stdout.match(/weights ([\d.]+) MiB resident \(([\d.]+) MiB in the graph files\)/)
  const kv = r.stdout.match(/K\/V pools ([\d.]+) MiB/)
  return m
    ? { residentMiB: Number(m[1]), storedMiB: Number(m[2]), kvPoolsMiB: kv ? Number(kv[1]) : undefined }
    : { error: (r.stderr || r.stdout).slice(-500) }
}

const parent = async () => {
  const list = (v) => (v ? String(v).split(",") : [])
  const offrampModels = list(args["offramp-model"])
  const ggufs = list(args.gguf)
  const tjsModels = list(args.tjs)
  const maxTokens = Number(args["max-tokens"] ?? 16)
  const log = (...m) => console.error(new Date().toISOString().slice(11, 19), ...m)

  // Prompt ids from a tokenizer.json (with its BOS template), as verify.mjs; every engine gets the same ids.
  const tokDir =
    args.tokenizer ??
    [...tjsModels, ...offrampModels].find((d) => existsSync(join(d, "tokenizer.json"))) ??
    (() => {
      throw new Error("no tokenizer: pass --tokenizer DIR (a folder with tokenizer.json and tokenizer_config.json)")
    })()
  const { AutoTokenizer, env } = await import("@huggingface/transformers")
  env.allowRemoteModels = false
  const tokenizer = await AutoTokenizer.from_pretrained(resolve(tokDir), { local_files_only: true })
  const promptText = args.prompt ?? "Once upon a time"
  const promptIds = Array.from(tokenizer.encode(promptText), Number)
  // run.mjs's llama.cpp context: min(512, the model's context).
  const modelContext = offrampModels.length
    ? JSON.parse(readFileSync(join(offrampModels[0], "model.json"), "utf8")).dims.contextLength
    : 512
  const context = Number(args.context ?? Math.min(512, modelContext))

  const jobs = [
    ...offrampModels.map((m) => ["offramp", m]),
    ...ggufs.map((m) => ["llama.cpp", m]),
    ...tjsModels.map((m) => ["transformers.js", m]),
  ]
  const common = [
    ["prompt-ids", promptIds.join(",")],
    ["max-tokens", maxTokens],
    ["context", context],
    ...(args["no-mmap"] ? [["no-mmap", true]] : []),
  ]
  // --repeat N: N rounds, each a baseline per engine and then every model (interleaved, as run.mjs's rounds); the
  // figures are the medians over the rounds, every child's readings stay in `samples`.
  const repeat = Number(args.repeat ?? 1)
  const median = (xs) => {
    const v = [...xs].sort((a, b) => a - b)
    return v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2
  }
  const engines = [...new Set(jobs.map(([e]) => e))]
  const baselines = Object.fromEntries(engines.map((e) => [e, { samples: [] }]))
  const runs = jobs.map(([engine, model]) => ({
    engine,
    model,
    format:
      engine === "llama.cpp"
        ? `${basename(model).replace(/\.gguf$/, "")}${args["no-mmap"] ? " (no mmap)" : ""}`
        : basename(model),
    modelBytes: sizeOf(model),
    samples: [],
  }))
  for (let round = 1; round <= repeat; round++) {
    for (const engine of engines) {
      log(`round ${round}/${repeat}`, "baseline", engine)
      baselines[engine].samples.push(runChild(engine, [...common, ["baseline", true]]))
    }
    for (const r of runs) {
      log(`round ${round}/${repeat}`, "load + generate", r.engine, r.model)
      r.samples.push(runChild(r.engine, [...common, ["model", r.model]]))
    }
  }
  for (const b of Object.values(baselines)) b.rss = median(b.samples.map((x) => x.library.rss))
  for (const r of runs) {
    const base = baselines[r.engine].rss
    const load = r.samples.map((x) => x.load.rss)
    const peak = r.samples.map((x) => x.generated.maxRss)
    const range = (xs) => [Math.min(...xs), Math.max(...xs)]
    r.rss = { load: median(load), peak: median(peak), loadRange: range(load), peakRange: range(peak) }
    r.net = { load: r.rss.load - base, peak: r.rss.peak - base }
    r.tokens = r.samples[0].tokens
    // Offramp's own figures (EngineStats.weights, measured by its runner in the same child around the sessions'
    // creation): the median resident bytes over the rounds; `inspect` is `offramp inspect --load` run once.
    if (r.samples[0].weights)
      r.weights = {
        storedBytes: r.samples[0].weights.storedBytes,
        residentBytes: median(r.samples.map((x) => x.weights.residentBytes)),
      }
    if (r.engine === "offramp") r.inspect = inspect(r.model)
  }

  const versions = (p) => JSON.parse(readFileSync(new URL(`./node_modules/${p}/package.json`, import.meta.url))).version
  const doc = {
    date: new Date().toISOString(),
    command: `node ${process.argv.slice(1).join(" ")}`,
    node: process.version,
    platform: `${process.platform} ${process.arch}`,
    versions: {
      "node-llama-cpp": versions("node-llama-cpp"),
      "@huggingface/transformers": versions("@huggingface/transformers"),
      "onnxruntime-node (transformers.js)": versions("onnxruntime-node"),
    },
    offrampRoot: root,
    // glibc's allocator settings, when set: they change what freed load-time buffers leave resident (see README).
    env: Object.fromEntries(Object.entries(process.env).filter(([k]) => /^(MALLOC_|GLIBC_TUNABLES)/.test(k))),
    offrampCommit: spawnSync("git", ["-C", root, "rev-parse", "--short", "HEAD"], { encoding: "utf8" }).stdout?.trim(),
    threads: 1,
    maxTokens,
    repeat,
    prompt: promptText,
    promptIds,
    llamaContext: context,
    baselines,
    runs,
  }
  if (args.out) {
    mkdirSync(dirname(resolve(args.out)), { recursive: true })
    writeFileSync(args.out, `${JSON.stringify(doc, null, 1)}\n`)
  }
  console.log(table(doc))
}

/** The Markdown table of a memory.mjs report (also: node memory.mjs --table results/memory.json). */
export const table = (doc) => {
  const mib = (b) => (b === undefined ? "" : (b / MiB).toFixed(1))
  // With rounds: the lowest and highest reading, when they are more than 2% apart.
  const spread = (range) =>
    doc.repeat > 1 && range && range[1] > range[0] * 1.02
      ? ` (${(range[0] / MiB).toFixed(0)}–${(range[1] / MiB).toFixed(0)})`
      : ""
  const lines = [
    "| engine | format | model on disk MiB | RSS after load | peak RSS | net after load | net peak | Offramp weights resident / stored MiB |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for (const r of doc.runs) {
    const w = r.weights ? `${mib(r.weights.residentBytes)} / ${mib(r.weights.storedBytes)}` : ""
    lines.push(
      `| ${r.engine} | ${r.format} | ${mib(r.modelBytes)} | ${mib(r.rss.load)}${spread(r.rss.loadRange)} | ${mib(r.rss.peak)}${spread(r.rss.peakRange)} | ${mib(r.net.load)} | ${mib(r.net.peak)} | ${w} |`,
    )
  }
  const base = Object.entries(doc.baselines)
    .map(([e, b]) => `${e} ${mib(b.rss)}`)
    .join(", ")
  const of = doc.repeat > 1 ? `, medians of ${doc.repeat} rounds` : ""
  const env = Object.entries(doc.env ?? {})
    .map(([k, v]) => `${k}=${v}`)
    .join(" ")
  lines.push("", `MiB${of}. Baseline RSS (library loaded, no model): ${base}.${env ? ` Environment: ${env}.` : ""}`)
  return lines.join("\n")
}

if (args.child) await child()
else if (args.table) console.log(table(JSON.parse(readFileSync(args.table, "utf8"))))
else await parent()
