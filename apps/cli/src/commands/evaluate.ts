/**
 * `offramp evaluate`: the quality of every exit on a text, teacher-forced — the perplexity of each exit head and
 * its top-1 agreement with the full-depth head (the figures of models/README.md). The flags are defined here; the
 * implementation (handlers/evaluate.ts, which loads onnxruntime) is imported when it runs.
 */
import { Command, Options } from "@effect/cli"
import { Effect } from "effect"

const model = Options.directory("model").pipe(Options.withDescription("a staged model directory"))
const text = Options.file("text").pipe(Options.withDescription("held-out text, scored teacher-forced"))
const maxTokens = Options.integer("max-tokens").pipe(
  Options.withDescription("most text tokens to use"),
  Options.withDefault(20000),
)
const json = Options.boolean("json").pipe(Options.withDescription("print one JSON document"))

const flags = { model, text, maxTokens, json }

export type EvaluateFlags = Command.Command.ParseConfig<typeof flags>

export const evaluate = Command.make("evaluate", flags, (args) =>
  Effect.flatMap(
    Effect.promise(() => import("../handlers/evaluate.js")),
    (handler) => handler.handle(args),
  ),
).pipe(Command.withDescription("perplexity and agreement with full depth of every exit, on a text"))
