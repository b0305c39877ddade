/**
 * Full-depth decode on a model directory, in process, as `offramp bench` runs it but with a CPU profile around the
 * measured rounds: the fixed-cost-per-token figures of BENCHMARKS.md ("Fixed cost per token").
 * Usage (from the repository root, on sources):
 *   node --conditions=source --import tsx tools/bench/decode-profile.ts MODEL_DIR STREAMS [ROUNDS] [PROFILE.cpuprofile]
 * Prints tok/s, µs per token and the segment calls' µs per token (EngineStats.decodeSegmentMs); each stream
 * generates 200 greedy tokens per round, after two warm-up rounds.
 */
import { writeFileSync } from "node:fs"
import { Session } from "node:inspector/promises"
import { Engine } from "@offramp/core/Engine"
import { greedyParams } from "@offramp/core/Sampler"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { Effect, Stream } from "effect"

const [model, streamsArg, roundsArg, profilePath] = process.argv.slice(2)
if (!model || !streamsArg) throw new Error("usage: decode-profile.ts MODEL_DIR STREAMS [ROUNDS] [PROFILE]")
const streams = Number(streamsArg)
const rounds = Number(roundsArg ?? 4)
const PROMPTS = ["And the king said", "Once upon a time", "The people of"]

const program = Effect.gen(function* () {
  const engine = yield* Engine
  const round = () =>
    Effect.forEach(
      Array.from({ length: streams }, (_, i) => i),
      (i) =>
        engine
          .generate({
            prompt: PROMPTS[i % PROMPTS.length]!,
            maxTokens: 200,
            sampling: greedyParams,
            earlyExit: { threshold: 2 },
          })
          .pipe(Stream.runCount),
      { concurrency: "unbounded" },
    )
  yield* round()
  yield* round()
  const session = new Session()
  session.connect()
  if (profilePath) {
    yield* Effect.promise(() => session.post("Profiler.enable"))
    yield* Effect.promise(() => session.post("Profiler.start"))
  }
  const before = yield* engine.stats
  const started = performance.now()
  let tokens = 0
  for (let r = 0; r < rounds; r++) tokens += (yield* round()).reduce((a, b) => a + b, 0)
  const ms = performance.now() - started
  if (profilePath) {
    const { profile } = yield* Effect.promise(() => session.post("Profiler.stop"))
    writeFileSync(profilePath, JSON.stringify(profile))
  }
  const after = yield* engine.stats
  const segmentUs =
    ((after.decodeSegmentMs - before.decodeSegmentMs) * 1000) / (after.decodeTokens - before.decodeTokens)
  console.log(
    `${streams} stream(s): ${((tokens * 1000) / ms).toFixed(0)} tok/s, ${((ms * 1000) / tokens).toFixed(0)} µs/token, ` +
      `segment calls ${segmentUs.toFixed(0)} µs/token`,
  )
})

Effect.runPromise(program.pipe(Effect.provide(onnxEngineLayer(model)))).catch((e) => {
  console.error(e)
  process.exit(1)
})
