/**
 * The server's metrics and their Prometheus text exposition (format 0.0.4).
 *
 * Counters and histograms are plain per-server objects rather than Effect's global metric registry, so that two
 * servers in one process (tests, a host app mounting the router twice) never mix their figures. Engine figures
 * (KV blocks, exits, queue) are read from `engine.stats` at scrape time.
 */
import type { EngineStats } from "@offramp/core/Engine"
import { ServerState } from "./ServerState.js"

export class Histogram {
  private readonly counts: Array<number>
  private sum = 0
  private count = 0

  constructor(readonly bounds: ReadonlyArray<number>) {
    this.counts = bounds.map(() => 0)
  }

  observe(value: number) {
    this.sum += value
    this.count++
    const i = this.bounds.findIndex((b) => value <= b)
    if (i >= 0) this.counts[i]!++
  }

  /** Cumulative bucket counts, the sum and the count, as Prometheus wants them. */
  snapshot() {
    let running = 0
    const buckets = this.bounds.map((le, i) => {
      running += this.counts[i]!
      return { le, count: running }
    })
    return { buckets, sum: this.sum, count: this.count }
  }
}

export interface RequestLabels {
  readonly route: string
  readonly status: number
}

/** What the HTTP layer counts itself. */
export class ServerMetrics {
  readonly requests = new Map<string, { labels: RequestLabels; count: number }>()
  promptTokens = 0
  generationTokens = 0
  /** Sequences (prompts × n) of accepted requests waiting for their first token (the server-side queue). */
  queued = 0
  /** Generation requests in flight (queued or streaming). */
  active = 0
  readonly timeToFirstToken = new Histogram([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])
  readonly interTokenLatency = new Histogram([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5])
  readonly requestDuration = new Histogram([0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120])

  countRequest(route: string, status: number) {
    const key = `${route} ${status}`
    const entry = this.requests.get(key)
    if (entry) entry.count++
    else this.requests.set(key, { labels: { route, status }, count: 1 })
  }
}

const escapeLabel = (value: string) => value.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"')

const labelText = (labels: Record<string, string | number>) => {
  const entries = Object.entries(labels)
  return entries.length === 0 ? "" : `{${entries.map(([k, v]) => `${k}="${escapeLabel(String(v))}"`).join(",")}}`
}

const num = (value: number) =>
  Number.isFinite(value) ? String(value) : value > 0 ? "+Inf" : value < 0 ? "-Inf" : "NaN"

class Exposition {
  private readonly lines: Array<string> = []
  constructor(private readonly base: Record<string, string>) {}

  private header(name: string, type: string, help: string) {
    this.lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`)
  }

  private sample(name: string, value: number, labels: Record<string, string | number> = {}) {
    this.lines.push(`${name}${labelText({ ...this.base, ...labels })} ${num(value)}`)
  }

  metric(
    type: "counter" | "gauge",
    name: string,
    help: string,
    samples: ReadonlyArray<{ labels?: Record<string, string | number>; value: number }>,
  ) {
    this.header(name, type, help)
    for (const s of samples) this.sample(name, s.value, s.labels)
  }

  histogram(name: string, help: string, snapshot: ReturnType<Histogram["snapshot"]>) {
    this.header(name, "histogram", help)
    for (const b of snapshot.buckets) this.sample(`${name}_bucket`, b.count, { le: num(b.le) })
    this.sample(`${name}_bucket`, snapshot.count, { le: "+Inf" })
    this.sample(`${name}_sum`, snapshot.sum)
    this.sample(`${name}_count`, snapshot.count)
  }

  text() {
    return `${this.lines.join("\n")}\n`
  }
}

/** The exit-layer histogram of the engine as a Prometheus histogram with one bucket per layer count. */
const exitSnapshot = (stats: EngineStats, layers: number) => {
  let running = 0
  let sum = 0
  const buckets = Array.from({ length: layers }, (_, i) => {
    const n = stats.exitHistogram[i + 1] ?? 0
    running += n
    sum += n * (i + 1)
    return { le: i + 1, count: running }
  })
  return { buckets, sum, count: running }
}

export const renderMetrics = (
  model: string,
  layers: number,
  server: ServerMetrics,
  stats: EngineStats,
  engine: { readonly state: ServerState; readonly restarts: number },
): string => {
  const out = new Exposition({ model_name: model })
  const one = (value: number) => [{ value }]
  out.metric(
    "gauge",
    "offramp_engine_state",
    "1 for the server's state (what /health reports), 0 for the others.",
    ServerState.literals.map((state) => ({ labels: { state }, value: state === engine.state ? 1 : 0 })),
  )
  out.metric(
    "counter",
    "offramp_engine_restarts_total",
    "Engine workers replaced after they died or missed the step deadline.",
    one(engine.restarts),
  )
  out.metric(
    "counter",
    "offramp_http_requests_total",
    "HTTP requests by route and status.",
    [...server.requests.values()].map(({ labels, count }) => ({
      labels: { route: labels.route, status: labels.status },
      value: count,
    })),
  )
  out.metric(
    "counter",
    "offramp_prompt_tokens_total",
    "Prompt tokens of generation requests.",
    one(server.promptTokens),
  )
  out.metric(
    "counter",
    "offramp_generation_tokens_total",
    "Tokens generated for clients.",
    one(server.generationTokens),
  )
  out.histogram(
    "offramp_time_to_first_token_seconds",
    "Time from the request to its first generated token.",
    server.timeToFirstToken.snapshot(),
  )
  out.histogram(
    "offramp_inter_token_latency_seconds",
    "Time between consecutive tokens of a request.",
    server.interTokenLatency.snapshot(),
  )
  out.histogram(
    "offramp_request_duration_seconds",
    "Time from a generation request to its last token.",
    server.requestDuration.snapshot(),
  )
  out.histogram(
    "offramp_exit_layer",
    "Generated tokens by the layer count of the exit that produced them (all engine requests).",
    exitSnapshot(stats, layers),
  )
  out.metric("gauge", "offramp_mean_exit_depth", "Mean layers run per generated token.", one(stats.meanExitDepth))
  out.metric("counter", "offramp_layers_skipped_total", "Layers skipped by early exits.", one(stats.layersSkipped))
  out.metric("gauge", "offramp_kv_blocks_used", "KV cache blocks held by sequences.", one(stats.kv.usedBlocks))
  out.metric("gauge", "offramp_kv_blocks_free", "KV cache blocks on the free list.", one(stats.kv.freeBlocks))
  out.metric(
    "gauge",
    "offramp_kv_blocks_cached",
    "KV cache blocks held only by the prefix cache (evictable).",
    one(stats.kv.cachedBlocks),
  )
  out.metric("gauge", "offramp_kv_blocks_total", "KV cache blocks in the pool.", one(stats.kv.totalBlocks))
  out.metric(
    "gauge",
    "offramp_kv_cache_bytes",
    "Bytes of the K/V pools (every block, used or not).",
    one(stats.kv.totalBlocks * stats.kv.bytesPerBlock),
  )
  out.metric(
    "gauge",
    "offramp_model_weight_bytes",
    "The model's weights: in its graph files (stored) and in memory once loaded (resident).",
    [
      { labels: { kind: "stored" }, value: stats.weights.storedBytes },
      { labels: { kind: "resident" }, value: stats.weights.residentBytes },
    ],
  )
  out.metric(
    "counter",
    "offramp_prefix_cache_queries_total",
    "Full prompt blocks looked up in the prefix cache.",
    one(stats.kv.prefixQueries),
  )
  out.metric(
    "counter",
    "offramp_prefix_cache_hits_total",
    "Prompt blocks found in the prefix cache.",
    one(stats.kv.prefixHits),
  )
  out.metric(
    "gauge",
    "offramp_sequences_queued",
    "Sequences (prompts × n) of requests accepted by the server and waiting for their first token.",
    one(server.queued),
  )
  out.metric("gauge", "offramp_requests_active", "Generation requests in flight.", one(server.active))
  out.metric("gauge", "offramp_sequences_waiting", "Sequences waiting in the engine's queue.", one(stats.waiting))
  out.metric("gauge", "offramp_sequences_running", "Sequences running in the engine.", one(stats.running))
  out.metric("counter", "offramp_engine_steps_total", "Engine steps.", one(stats.steps))
  out.metric(
    "counter",
    "offramp_preemptions_total",
    "Sequences preempted for lack of KV blocks.",
    one(stats.preemptions),
  )
  return out.text()
}

/** Parses a Prometheus text exposition into `name{labels}` → value (for tests and tools). */
export const parseMetrics = (text: string): Map<string, number> => {
  const values = new Map<string, number>()
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue
    const space = line.lastIndexOf(" ")
    values.set(line.slice(0, space), Number(line.slice(space + 1)))
  }
  return values
}
