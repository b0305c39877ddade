/**
 * `offramp inspect DIR`, implemented (commands/inspect.ts defines its argument): the model's spec and files.
 */
import { ModelRunner } from "@offramp/core/ModelRunner"
import { openModelDirectory } from "@offramp/onnx/ModelDirectory"
import { OnnxModelRunner } from "@offramp/onnx/OnnxModelRunner"
import { Console, Effect } from "effect"

const mib = (bytes: number) => `${(bytes / 1024 / 1024).toFixed(2)} MiB`

/** What the loaded model takes in memory: its weights (stored and resident) and the K/V pools at the defaults. */
const memory = (dir: string) =>
  Effect.gen(function* () {
    const runner = yield* ModelRunner
    const { storedBytes, residentBytes } = runner.weights
    return [
      `memory       weights ${mib(residentBytes)} resident (${mib(storedBytes)} in the graph files)`,
      `             K/V pools ${mib(runner.numBlocks * runner.bytesPerBlock)}: ${runner.numBlocks} blocks of ${runner.blockSize} tokens`,
    ]
  }).pipe(Effect.provide(OnnxModelRunner.layer(dir)))

export const handle = (dir: string, load = false) =>
  Effect.gen(function* () {
    const model = yield* openModelDirectory(dir)
    const { spec } = model
    const d = spec.dims
    const total = model.files.reduce((n, f) => n + f.bytes, 0)
    const lines = [
      `model        ${spec.name} (${spec.architecture}, ${spec.dtype})`,
      `source       ${spec.source ?? "unknown"}`,
      `layers       ${d.layers}   hidden ${d.hidden}   intermediate ${d.intermediate}`,
      `heads        ${d.heads} query / ${d.kvHeads} kv, head dim ${d.headDim}`,
      `vocab        ${d.vocab}   context ${d.contextLength}   rope theta ${spec.rope.theta}   norm eps ${spec.normEps}`,
      `weights      ${spec.weights ? `${spec.weights.matmul} matmuls, ${spec.weights.embedding} embedding` : "fp32"}`,
      `exits        after layers ${spec.exits.map((e) => e.layer).join(", ")} (${spec.headKind} head)`,
      `segments     ${spec.segments.map((s) => `[${s.firstLayer},${s.endLayer})`).join(" ")}`,
      `tokens       bos ${spec.tokens.bos}   eos ${spec.tokens.eos}   stop ${spec.tokens.stop.join(",")}`,
      `files        ${model.files.length}, ${mib(total)}`,
      ...model.files.map((f) => `  ${f.name.padEnd(22)} ${mib(f.bytes).padStart(10)}`),
      ...(load ? yield* memory(dir) : []),
    ]
    yield* Console.log(lines.join("\n"))
  })
