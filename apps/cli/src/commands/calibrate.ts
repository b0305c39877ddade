/**
 * `offramp calibrate`: finds per-exit thresholds that keep early-exit tokens in agreement with full depth at a
 * target rate on a text, and writes them to the model directory's calibration.json, which the engine reads as its
 * early-exit defaults (so `generate` and `serve` pick them up). The flags are defined here; the implementation
 * (handlers/calibrate.ts, which loads onnxruntime) is imported when it runs.
 */
import { Command, Options } from "@effect/cli"
import { ConfidenceMeasure } from "@offramp/core/EarlyExit"
import { Effect } from "effect"

const model = Options.directory("model").pipe(Options.withDescription("a staged model directory"))
const text = Options.file("text").pipe(
  Options.withDescription("a text in the model's domain; its tokens are run teacher-forced at full depth"),
)
const target = Options.float("target").pipe(
  Options.withDescription("agreement rate with full depth that early-exit tokens must keep, in (0, 1]"),
  Options.withDefault(0.99),
)
const measure = Options.choice("measure", ConfidenceMeasure.literals).pipe(
  Options.withDescription("the confidence measure the thresholds are for (classifier: the model's exit classifiers)"),
  Options.withDefault("softmax"),
)
const classifiers = Options.boolean("classifiers").pipe(
  Options.withDescription(
    "first fit an exit classifier per early exit on the text (written as classifier_<layer>.onnx, with " +
      "classifiers.json, into the model directory), then calibrate the classifier measure on the held-out positions",
  ),
)
const classifierKind = Options.choice("classifier-kind", ["auto", "logistic", "mlp"]).pipe(
  Options.withDescription("logistic regression, a one-hidden-layer MLP, or auto: the MLP where it measurably helps"),
  Options.withDefault("auto"),
)
const maxPerplexityIncrease = Options.float("max-perplexity-increase").pipe(
  Options.withDescription(
    "instead of --target: the thresholds of least mean depth whose teacher-forced perplexity on the text stays " +
      "within this fraction above full depth's (0.02 = 2%)",
  ),
  Options.optional,
)
const heldoutFraction = Options.float("heldout-fraction").pipe(
  Options.withDescription("with --classifiers: the last part of the text's positions, held out from fitting"),
  Options.withDefault(0.25),
)
const policy = Options.choice("policy", ["per-sequence", "all"]).pipe(
  Options.withDescription("batch exit policy written with the thresholds"),
  Options.withDefault("per-sequence"),
)
const kv = Options.choice("kv", ["fill", "recompute"]).pipe(
  Options.withDescription("KV strategy for skipped layers written with the thresholds"),
  Options.withDefault("fill"),
)
const maxTokens = Options.integer("max-tokens").pipe(
  Options.withDescription("most text tokens to use"),
  Options.withDefault(20000),
)

const flags = {
  model,
  text,
  target,
  maxPerplexityIncrease,
  measure,
  policy,
  kv,
  maxTokens,
  classifiers,
  classifierKind,
  heldoutFraction,
}

export type CalibrateFlags = Command.Command.ParseConfig<typeof flags>

export const calibrate = Command.make("calibrate", flags, (args) =>
  Effect.flatMap(
    Effect.promise(() => import("../handlers/calibrate.js")),
    (handler) => handler.handle(args),
  ),
).pipe(Command.withDescription("find per-exit thresholds that keep early-exit tokens in agreement with full depth"))
