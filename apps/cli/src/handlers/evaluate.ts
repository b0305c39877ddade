/**
 * `offramp evaluate`: the quality of every exit on a text, teacher-forced — the perplexity of each exit head and
 * its top-1 agreement with the full-depth head (the figures of models/README.md). Implemented here;
 * commands/evaluate.ts defines the flags and imports this when the command runs.
 */
import { exitQuality } from "@offramp/core/Calibration"
import { Console, Effect } from "effect"
import type { EvaluateFlags } from "../commands/evaluate.js"
import { textExitStatistics } from "./calibrate.js"

export const handle = (args: EvaluateFlags) =>
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
  })
