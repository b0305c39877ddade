/**
 * `offramp bench`: decode throughput at several numbers of concurrent streams, at full depth and, with
 * --thresholds, under early exit for each policy × KV strategy × threshold, with the quality cost of each point
 * (teacher-forced perplexity on held-out text, agreement of greedy continuations with full depth). The flags are
 * defined here; the implementation (handlers/bench.ts, which loads onnxruntime) is imported when it runs.
 */
import { Command, Options } from "@effect/cli"
import { ConfidenceMeasure } from "@offramp/core/EarlyExit"
import { DEFAULT_DRAFT_THRESHOLD, DEFAULT_MAX_DRAFT } from "@offramp/core/Speculation"
import { Effect } from "effect"
import { modelOption as model } from "../defaultModel.js"
import { kvCacheMb, threads } from "../engineOptions.js"

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

const streams = Options.text("streams").pipe(
  Options.withDescription("comma-separated counts of concurrent streams"),
  Options.withDefault("1,4,16"),
)
const maxTokens = Options.integer("max-tokens").pipe(
  Options.withDescription("tokens generated per stream"),
  Options.withDefault(128),
)
const repeats = Options.integer("repeats").pipe(
  Options.withDescription("throughput runs per point; the median is reported"),
  Options.withDefault(3),
)
const thresholds = Options.text("thresholds").pipe(
  Options.withDescription("early-exit thresholds to sweep, e.g. 0.5,0.7,0.9 (default: full depth only)"),
  Options.optional,
)
const policies = Options.text("policies").pipe(
  Options.withDescription("batch exit policies to sweep"),
  Options.withDefault("per-sequence,all"),
)
const kvStrategies = Options.text("kv").pipe(
  Options.withDescription("KV strategies to sweep"),
  Options.withDefault("fill,recompute"),
)
const measureOption = Options.choice("measure", ConfidenceMeasure.literals).pipe(
  Options.withDescription(
    "confidence measure of the --thresholds sweep (default: the model's calibrated measure, else softmax)",
  ),
  Options.optional,
)
const confirmOption = Options.text("confirm").pipe(
  Options.withDescription(
    "gated decisions: with a head-free measure (classifier, saturation), also sweep these head max-probability " +
      "confirmations, e.g. 0.2,0.4 (each threshold runs without and with each)",
  ),
  Options.optional,
)
const minExitLayer = Options.integer("min-exit-layer").pipe(
  Options.withDescription("no exit before this many layers"),
  Options.withDefault(1),
)
const heldout = Options.file("heldout", { exists: "yes" }).pipe(
  Options.withDescription(
    "held-out text for teacher-forced perplexity (default: the default model's own held-out sample for it, " +
      "models/heldout-sample.txt; the bundled stories for any other model)",
  ),
  Options.optional,
)
const chart = Options.file("chart").pipe(
  Options.withDescription("write an SVG chart of speedup against quality to this file"),
  Options.optional,
)
const calibratedOption = Options.boolean("calibrated").pipe(
  Options.withDescription(
    "also measure the model's calibrated defaults (calibration.json: its measure and thresholds)",
  ),
)
const speculateOption = Options.boolean("speculate").pipe(
  Options.withDescription(
    "add self-speculative runs (lossless: drafts from an early exit, verified by the rest), over --draft-exits × --max-drafts",
  ),
)
const draftExitsOption = Options.text("draft-exits").pipe(
  Options.withDescription("with --speculate: draft exits to sweep, by layer (default: the exit nearest half depth)"),
  Options.optional,
)
const maxDraftsOption = Options.text("max-drafts").pipe(
  Options.withDescription(`with --speculate: maximum draft lengths to sweep (default ${DEFAULT_MAX_DRAFT})`),
  Options.withDefault(String(DEFAULT_MAX_DRAFT)),
)
const draftThresholdOption = Options.float("draft-threshold").pipe(
  Options.withDescription(
    `with --speculate: drafting stops below this draft-head top probability (default ${DEFAULT_DRAFT_THRESHOLD})`,
  ),
  Options.withDefault(DEFAULT_DRAFT_THRESHOLD),
)
const callsOption = Options.boolean("calls").pipe(
  Options.withDescription(
    "also time each model runner call at every stream count, and the speedup those costs allow an exit at each early exit (the forced-exit bound)",
  ),
)
const json = Options.boolean("json").pipe(Options.withDescription("print one JSON document"))

const flags = {
  model,
  streams,
  maxTokens,
  repeats,
  thresholds,
  policies,
  kvStrategies,
  measure: measureOption,
  confirm: confirmOption,
  minExitLayer,
  heldout,
  chart,
  calibrated: calibratedOption,
  speculate: speculateOption,
  draftExits: draftExitsOption,
  maxDrafts: maxDraftsOption,
  draftThreshold: draftThresholdOption,
  calls: callsOption,
  json,
  kvCacheMb,
  threads,
}

export type BenchFlags = Command.Command.ParseConfig<typeof flags>

export const bench = Command.make("bench", flags, (args) =>
  Effect.flatMap(
    Effect.promise(() => import("../handlers/bench.js")),
    (handler) => handler.handle(args),
  ),
).pipe(
  Command.withDescription(
    "measure decode throughput at several stream counts, full depth against early exit, with its quality cost",
  ),
)
