/**
 * `offramp bench`: aggregate decode throughput at several numbers of concurrent streams, measured in one run.
 */
import { Command, Options } from "@effect/cli"
import { Engine, InvalidRequestError } from "@offramp/core"
import { onnxEngineLayer } from "@offramp/onnx"
import { Console, Effect, Stream } from "effect"

/** Story openings in the register of TinyStories; a stream takes prompt i mod length. */
export const BENCH_PROMPTS = [
  "Once upon a time",
  "One day, a little girl named Lily",
  "Tom and his dog went to the park",
  "The sun was shining and the birds were singing",
  "There was a big red ball in the garden",
  "Sam wanted to bake a cake for his mom",
  "A small cat lived in a tall tree",
  "Anna found a shiny key under her bed",
]

const model = Options.directory("model").pipe(Options.withDescription("a staged model directory"))
const streams = Options.text("streams").pipe(
  Options.withDescription("comma-separated counts of concurrent streams"),
  Options.withDefault("1,4,16"),
)
const maxTokens = Options.integer("max-tokens").pipe(
  Options.withDescription("tokens generated per stream"),
  Options.withDefault(128),
)
const repeats = Options.integer("repeats").pipe(
  Options.withDescription("runs per stream count; the median is reported"),
  Options.withDefault(3),
)
const json = Options.boolean("json").pipe(Options.withDescription("print one JSON document"))

export interface BenchRun {
  readonly streams: number
  /** Median over repeats of Σ(tokens − 1) over streams ÷ seconds from the first token of any stream to the end. */
  readonly decodeTokensPerSecond: number
  /** Median over repeats of all generated tokens ÷ wall seconds from submission to the end. */
  readonly tokensPerSecond: number
  /** Median time to first token across all streams of all repeats, in ms. */
  readonly timeToFirstTokenMs: number
  readonly tokensPerStream: number
  readonly repeats: number
  readonly runs: ReadonlyArray<{
    readonly decodeTokensPerSecond: number
    readonly tokens: number
    readonly wallMs: number
  }>
}

const median = (values: ReadonlyArray<number>) => {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = sorted.length >> 1
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2
}

const parseCounts = (text: string) => {
  const counts = text.split(",").map((s) => Number(s.trim()))
  return counts.every((c) => Number.isInteger(c) && c > 0)
    ? Effect.succeed(counts)
    : Effect.fail(new InvalidRequestError({ message: `--streams takes positive integers like 1,4,16; got "${text}"` }))
}

/** One run: `count` greedy streams submitted at once. */
const measure = (count: number, maxTokens: number) =>
  Effect.gen(function* () {
    const engine = yield* Engine
    const started = performance.now()
    let firstToken = Number.POSITIVE_INFINITY
    const firsts: Array<number> = []
    const tokens = yield* Effect.forEach(
      Array.from({ length: count }, (_, i) => i),
      (i) =>
        engine
          .generate({
            prompt: BENCH_PROMPTS[i % BENCH_PROMPTS.length]!,
            maxTokens,
            sampling: { temperature: 0, topK: 0, topP: 1 },
          })
          .pipe(
            Stream.runFold(0, (n) => {
              if (n === 0) {
                const now = performance.now()
                firsts.push(now - started)
                firstToken = Math.min(firstToken, now)
              }
              return n + 1
            }),
          ),
      { concurrency: "unbounded" },
    )
    const ended = performance.now()
    const total = tokens.reduce((a, b) => a + b, 0)
    return {
      decodeTokensPerSecond: ((total - count) * 1000) / (ended - firstToken),
      tokensPerSecond: (total * 1000) / (ended - started),
      firsts,
      tokens: total,
      wallMs: ended - started,
    }
  })

export const bench = Command.make("bench", { model, streams, maxTokens, repeats, json }, (args) =>
  Effect.gen(function* () {
    const counts = yield* parseCounts(args.streams)
    yield* measure(2, 16) // warm-up: first-run allocations and onnxruntime's lazy initialisation
    const runs: Array<BenchRun> = []
    for (const count of counts) {
      const results = []
      for (let r = 0; r < args.repeats; r++) results.push(yield* measure(count, args.maxTokens))
      runs.push({
        streams: count,
        decodeTokensPerSecond: median(results.map((r) => r.decodeTokensPerSecond)),
        tokensPerSecond: median(results.map((r) => r.tokensPerSecond)),
        timeToFirstTokenMs: median(results.flatMap((r) => r.firsts)),
        tokensPerStream: args.maxTokens,
        repeats: args.repeats,
        runs: results.map(({ decodeTokensPerSecond, tokens, wallMs }) => ({ decodeTokensPerSecond, tokens, wallMs })),
      })
      if (!args.json) {
        const last = runs.at(-1)!
        yield* Console.log(
          `${String(count).padStart(3)} streams  ${last.decodeTokensPerSecond.toFixed(0).padStart(7)} decode tok/s  ` +
            `${last.tokensPerSecond.toFixed(0).padStart(7)} tok/s overall  TTFT ${last.timeToFirstTokenMs.toFixed(1)} ms`,
        )
      }
    }
    const engine = yield* Engine
    const document = {
      model: engine.spec.name,
      command: `offramp bench --model ${args.model} --streams ${args.streams} --max-tokens ${args.maxTokens} --repeats ${args.repeats}`,
      node: process.version,
      runs,
    }
    if (args.json) yield* Console.log(JSON.stringify(document, null, 2))
  }).pipe(Effect.provide(onnxEngineLayer(args.model))),
).pipe(Command.withDescription("measure decode throughput at several numbers of concurrent streams"))
