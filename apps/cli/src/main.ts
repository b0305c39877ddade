/**
 * The `offramp` command.
 */
import { Command } from "@effect/cli"
import * as NodeContext from "@effect/platform-node/NodeContext"
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import { Effect } from "effect"
import { bench } from "./commands/bench.js"
import { benchHttp } from "./commands/bench-http.js"
import { calibrate } from "./commands/calibrate.js"
import { convert } from "./commands/convert.js"
import { evaluate } from "./commands/evaluate.js"
import { generate } from "./commands/generate.js"
import { inspect } from "./commands/inspect.js"
import { serve } from "./commands/serve.js"
import { reportFailure } from "./report.js"

const offramp = Command.make("offramp").pipe(
  Command.withDescription("an inference engine for early-exit language models"),
  Command.withSubcommands([convert, generate, inspect, bench, benchHttp, calibrate, evaluate, serve]),
)

const cli = Command.run(offramp, { name: "offramp", version: "0.1.0" })

cli(process.argv).pipe(
  reportFailure,
  Effect.provide(NodeContext.layer),
  NodeRuntime.runMain({ disableErrorReporting: true }),
)
