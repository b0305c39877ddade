/**
 * `offramp generate`: streams continuations of one or more prompts, run concurrently through the engine. The flags
 * are defined here; the implementation (handlers/generate.ts, which loads onnxruntime) is imported when it runs.
 */
import { Command, Options } from "@effect/cli"
import { ConfidenceMeasure } from "@offramp/core/EarlyExit"
import { DEFAULT_DRAFT_THRESHOLD, DEFAULT_MAX_DRAFT } from "@offramp/core/Speculation"
import { Effect } from "effect"
import { modelOption as model } from "../defaultModel.js"
import { kvCacheMb, threads } from "../engineOptions.js"

const prompt = Options.text("prompt").pipe(
  Options.withDescription("a text to continue; repeat the flag for several prompts, run concurrently"),
  Options.repeated,
)
const promptsFile = Options.file("prompts", { exists: "yes" }).pipe(
  Options.withDescription("a file with one prompt per line"),
  Options.optional,
)
const maxTokens = Options.integer("max-tokens").pipe(
  Options.withDescription("most tokens to generate"),
  Options.withDefault(256),
)
const temperature = Options.float("temperature").pipe(
  Options.withDescription("sampling temperature; 0 = greedy"),
  Options.withDefault(0.8),
)
const topP = Options.float("top-p").pipe(
  Options.withDescription("nucleus sampling; 1 = off"),
  Options.withDefault(0.95),
)
const topK = Options.integer("top-k").pipe(Options.withDescription("top-k sampling; 0 = off"), Options.withDefault(40))
const seed = Options.integer("seed").pipe(
  Options.withDescription("RNG seed, for reproducible sampling"),
  Options.optional,
)
const json = Options.boolean("json").pipe(Options.withDescription("print one JSON object per line"))
const threshold = Options.float("threshold").pipe(
  Options.withDescription("early exit when the exit head's confidence reaches this (above 1: never)"),
  Options.optional,
)
const measure = Options.choice("measure", ConfidenceMeasure.literals).pipe(
  Options.withDescription("confidence measure of the exit heads"),
  Options.optional,
)
const policy = Options.choice("policy", ["per-sequence", "all"]).pipe(
  Options.withDescription("batch exit policy: rows exit alone, or all together"),
  Options.optional,
)
const kv = Options.choice("kv", ["fill", "recompute"]).pipe(
  Options.withDescription("K/V of skipped layers: fill from the exit state, or recompute with the next token"),
  Options.optional,
)
const minExitLayer = Options.integer("min-exit-layer").pipe(
  Options.withDescription("no exit before this many layers"),
  Options.optional,
)
const confirm = Options.float("confirm").pipe(
  Options.withDescription(
    "gated decision: a row that passes a head-free measure (classifier, saturation) exits only if the exit head's " +
      "max probability also reaches this",
  ),
  Options.optional,
)

const speculate = Options.boolean("speculate").pipe(
  Options.withDescription(
    "lossless self-speculative decoding: draft with the layers up to an early exit, verify with the rest (the full model's output; early-exit flags do not apply)",
  ),
)
const draftExit = Options.integer("draft-exit").pipe(
  Options.withDescription("with --speculate: the early exit that drafts (default: the one nearest half the depth)"),
  Options.optional,
)
const maxDraft = Options.integer("max-draft").pipe(
  Options.withDescription(`with --speculate: most tokens drafted per verification (default ${DEFAULT_MAX_DRAFT})`),
  Options.optional,
)
const draftThreshold = Options.float("draft-threshold").pipe(
  Options.withDescription(
    `with --speculate: drafting stops when the draft head's top probability is below this (default ${DEFAULT_DRAFT_THRESHOLD})`,
  ),
  Options.optional,
)

const flags = {
  model,
  prompt,
  promptsFile,
  maxTokens,
  temperature,
  topP,
  topK,
  seed,
  json,
  threshold,
  measure,
  policy,
  kv,
  minExitLayer,
  confirm,
  speculate,
  draftExit,
  maxDraft,
  draftThreshold,
  kvCacheMb,
  threads,
}

export type GenerateFlags = Command.Command.ParseConfig<typeof flags>

export const generate = Command.make("generate", flags, (args) =>
  Effect.flatMap(
    Effect.promise(() => import("../handlers/generate.js")),
    (handler) => handler.handle(args),
  ),
).pipe(Command.withDescription("generate continuations of prompts"))
