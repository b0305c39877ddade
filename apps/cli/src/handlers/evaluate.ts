/**
 * `offramp evaluate`: the quality of every exit on a text, teacher-forced — the perplexity of each exit head and
 * its top-1 agreement with the full-depth head (the figures of models/README.md).
 */
import { Command, Options } from "@effect/cli"
import { exitQuality } from "@offramp/core/Calibration"
import { Console, Effect } from "effect"
import { textExitStatistics } from "./calibrate.js"

const model = Options.directory("model").pipe(Options.withDescription("a staged model directory"))
const text = Options.file("text").pipe(Options.withDescription("held-out text, scored teacher-forced"))
const maxTokens = Options.integer("max-tokens").pipe(
  Options.withDescription("most text tokens to use"),
  Options.withDefault(20000),
)
const json = Options.boolean("json").pipe(Options.withDescription("print one JSON document"))

export const evaluate = Command.make("evaluate", { model, text, maxTokens, json }, (args) =>
  Effect.gen(function* () {
    const { statistics, tokens } = yield* textExitStatistics(args.model, args.text, args.maxTokens, "softmax", true)
    const exits = statistics.map(exitQuality)
    if (args.json) return yield* Console.log(JSON.stringify({ tokens, exits }, null, 2))
    yield* Console.log(
      [
        `${tokens} tokens`,
        "layer  perplexity  top-1 agreement with full depth",
        ...exits.map(
          (e) =>
            `${String(e.layer).padStart(5)}  ${e.perplexity.toFixed(3).padStart(10)}  ${(100 * e.agreement).toFixed(1).padStart(6)} %`,
        ),
      ].join("\n"),
    )
  }),
).pipe(Command.withDescription("perplexity and agreement with full depth of every exit, on a text"))
