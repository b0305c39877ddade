/**
 * The `offramp` command end to end on stories260K: convert, then generate the reference continuation of run.c.
 */
import { cpSync, readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { beforeAll, describe, expect, it } from "vitest"
import { expectCleanFailure, jsonLines, runCli } from "./support/cli.js"
import {
  REFERENCE_CONTINUATION,
  REFERENCE_IDS,
  STORIES_CHECKPOINT,
  STORIES_TOKENIZER,
  tempDir,
} from "./support/stories.js"

let modelDir = ""

/** `offramp convert llama2c` of stories260K into `out`, with extra flags. */
const convertStoriesCli = (out: string, ...flags: Array<string>) =>
  runCli([
    "convert",
    "llama2c",
    "--checkpoint",
    STORIES_CHECKPOINT,
    "--tokenizer",
    STORIES_TOKENIZER,
    "--out",
    out,
    ...flags,
  ])

beforeAll(async () => {
  modelDir = join(tempDir("cli"), "stories260K")
  const result = await convertStoriesCli(modelDir)
  expect(result.stderr).toContain("exits after 1, 2, 3, 4, 5")
  expect(result.code).toBe(0)
})

const generate = (...args: Array<string>) => runCli(["generate", "--model", modelDir, ...args])

describe("offramp convert + generate (stories260K)", () => {
  it("greedy generation prints exactly run.c's continuation", async () => {
    const result = await generate("--prompt", "Once upon a time", "--max-tokens", "60", "--temperature", "0")
    expect(result.code).toBe(0)
    expect(result.stdout).toBe(`${REFERENCE_CONTINUATION}\n`)
  })

  it("--json prints one token object per line, then a done line", async () => {
    const result = await generate("--prompt", "Once upon a time", "--max-tokens", "60", "--temperature", "0", "--json")
    expect(result.code).toBe(0)
    const lines = jsonLines(result.stdout)
    const tokens = lines.filter((l) => l.type === "token")
    expect(tokens.map((t) => t.id)).toEqual(REFERENCE_IDS.slice(5))
    expect(tokens.map((t) => t.text).join("")).toBe(REFERENCE_CONTINUATION)
    for (const t of tokens) {
      expect(t.exitLayer).toBe(5)
      expect(t.confidence).toBeGreaterThan(0)
      expect(t.confidence).toBeLessThanOrEqual(1)
    }
    const done = lines.at(-1)
    expect(done).toMatchObject({ type: "done", tokens: 60, finishReason: "length" })
    expect(done.tokensPerSecond).toBeGreaterThan(0)
  })

  it("sampling with a seed is reproducible, and another seed gives another text", async () => {
    const sample = (seed: string) =>
      generate("--prompt", "Once upon a time", "--max-tokens", "40", "--temperature", "1", "--seed", seed, "--json")
    const ids = (out: string) =>
      out
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l))
        .filter((l) => l.type === "token")
        .map((l) => l.id)
    // The same prompt twice in one run: each prompt draws its own stream of the seed, the first as when alone.
    const twice = generate(
      ...["--prompt", "Once upon a time", "--prompt", "Once upon a time"],
      ...["--max-tokens", "40", "--temperature", "1", "--seed", "7", "--json"],
    )
    const [a, b, c, d] = await Promise.all([sample("7"), sample("7"), sample("8"), twice])
    expect(ids(a.stdout)).toEqual(ids(b.stdout))
    expect(ids(a.stdout)).not.toEqual(ids(c.stdout))
    const byRequest = (r: number) =>
      jsonLines(d.stdout)
        .filter((l) => l.type === "token" && l.request === r)
        .map((l) => l.id)
    expect(byRequest(0)).toEqual(ids(a.stdout))
    expect(byRequest(1)).not.toEqual(byRequest(0))
  })

  it("several prompts run concurrently; --json lines carry their request index", async () => {
    const prompts = ["Once upon a time", "Tom and his dog went to the park", "The sun was shining"]
    const result = await generate(
      ...prompts.flatMap((p) => ["--prompt", p]),
      "--max-tokens",
      "60",
      "--temperature",
      "0",
      "--json",
    )
    expect(result.code).toBe(0)
    const lines = jsonLines(result.stdout)
    const ofRequest = (i: number) => lines.filter((l) => l.type === "token" && l.request === i)
    expect(ofRequest(0).map((t) => t.id)).toEqual(REFERENCE_IDS.slice(5))
    for (const i of [1, 2]) {
      const alone = await generate("--prompt", prompts[i]!, "--max-tokens", "60", "--temperature", "0", "--json")
      const aloneIds = jsonLines(alone.stdout)
        .filter((l) => l.type === "token")
        .map((l) => l.id)
      expect(ofRequest(i).map((t) => t.id)).toEqual(aloneIds)
    }
    expect(
      lines
        .filter((l) => l.type === "done")
        .map((l) => l.request)
        .sort(),
    ).toEqual([0, 1, 2])
  })

  it("bench --json reports decode throughput per stream count", async () => {
    const result = await runCli([
      "bench",
      "--model",
      modelDir,
      "--streams",
      "1,3",
      "--max-tokens",
      "8",
      "--repeats",
      "1",
      "--calls",
      "--json",
    ])
    expect(result.code).toBe(0)
    const doc = JSON.parse(result.stdout)
    expect(doc.runs.map((r: { streams: number }) => r.streams)).toEqual([1, 3])
    for (const run of doc.runs) {
      expect(run.decodeTokensPerSecond).toBeGreaterThan(0)
      expect(run.runs[0].tokens).toBe(run.streams * 8)
    }
    // --calls: each runner call timed per stream count, and the speedup those costs allow each early exit: above 1,
    // and lower for a deeper exit (stories260K is converted with an exit after each of its 5 layers).
    expect(doc.command).toContain("--calls")
    expect(doc.calls.map((c: { streams: number }) => c.streams)).toEqual([1, 3])
    for (const c of doc.calls) {
      expect(c.segmentUs).toHaveLength(5)
      expect(c.kvFillUs).toHaveLength(4)
      const bounds = c.forcedExitBound as Array<{ layer: number; speedup: number; withFill: number }>
      expect(bounds.map((b) => b.layer)).toEqual([1, 2, 3, 4])
      for (const [i, b] of bounds.entries()) {
        expect(b.speedup).toBeGreaterThan(1)
        expect(b.withFill).toBeLessThan(b.speedup)
        if (i > 0) expect(b.speedup).toBeLessThan(bounds[i - 1]!.speedup)
      }
    }
  })

  it("bench --thresholds compares full depth with early exit, with quality figures and a chart", async () => {
    const chart = join(tempDir("chart"), "chart.svg")
    const result = await runCli([
      "bench",
      "--model",
      modelDir,
      "--streams",
      "2",
      "--max-tokens",
      "8",
      "--repeats",
      "1",
      "--thresholds",
      "0,2",
      "--policies",
      "per-sequence,all",
      "--kv",
      "fill",
      "--chart",
      chart,
      "--json",
    ])
    expect(result.code).toBe(0)
    const { runs } = JSON.parse(result.stdout)
    expect(
      runs.map((r: { mode: string; policy: string; threshold: number }) => [r.mode, r.policy, r.threshold]),
    ).toEqual([
      ["full", null, null],
      ["early", "per-sequence", 0],
      ["early", "per-sequence", 2],
      ["early", "all", 0],
      ["early", "all", 2],
    ])
    const [full, eager, never] = runs
    expect(full.meanExitDepth).toBe(5)
    expect(never.meanExitDepth).toBe(5)
    expect(never.perplexity).toBe(full.perplexity)
    expect(never.agreement).toEqual({ tokenMatch: 1, rougeL: 1 })
    expect(eager.meanExitDepth).toBe(1)
    expect(eager.idealSpeedup).toBe(5)
    expect(eager.kv).toBe("fill")
    expect(eager.perplexity).toBeGreaterThan(full.perplexity)
    expect(readFileSync(chart, "utf8")).toMatch(/^<svg[\s\S]*per-sequence\/fill @ 2 streams[\s\S]*<\/svg>$/)
  })

  it("generate's early-exit flags reach the engine", async () => {
    const result = await generate(
      "--prompt",
      "Once upon a time",
      "--max-tokens",
      "10",
      "--temperature",
      "0",
      "--threshold",
      "0",
      "--min-exit-layer",
      "2",
      "--kv",
      "recompute",
      "--json",
    )
    expect(result.code).toBe(0)
    const lines = jsonLines(result.stdout)
    expect(lines.filter((l) => l.type === "token").map((l) => l.exitLayer)).toEqual([5, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    expect(lines.at(-1)).toMatchObject({ type: "done", meanExitDepth: 2.3, layersSkipped: 27 })
    const bad = await generate("--prompt", "hi", "--policy", "sideways")
    expect(bad.code).not.toBe(0)
    expect(bad.stdout + bad.stderr).toContain("Expected one of the following cases: per-sequence, all")
  })

  it("inspect prints the spec", async () => {
    const result = await runCli(["inspect", modelDir])
    expect(result.code).toBe(0)
    expect(result.stdout).toMatch(/layers\s+5\s+hidden 64/)
    expect(result.stdout).toMatch(/8 query \/ 4 kv/)
    expect(result.stdout).toContain("exits        after layers 1, 2, 3, 4, 5 (shared head)")
    expect(result.stdout).not.toContain("memory")
    // --load: what the weights take once loaded, and the K/V pools (as many blocks as fit in 64 MiB by default).
    const loaded = await runCli(["inspect", modelDir, "--load"])
    expect(loaded.code).toBe(0)
    const weights = loaded.stdout.match(/memory +weights ([\d.]+) MiB resident \(([\d.]+) MiB in the graph files\)/)
    expect(weights, loaded.stdout).not.toBeNull()
    expect(Number(weights![1])).toBeGreaterThan(0)
    expect(Number(weights![2])).toBeGreaterThan(0)
    expect(loaded.stdout).toMatch(/K\/V pools 6[34]\.\d\d MiB: \d+ blocks of 16 tokens/)
  })
})

describe("bad input gets a typed, actionable error and a non-zero exit", () => {
  const clean = { failed: true, mentions: true, stackFree: true }

  it("a missing model directory", async () => {
    const result = await runCli(["generate", "--model", join(tempDir("none"), "nope"), "--prompt", "hi"])
    expect(expectCleanFailure(result, /does not exist|no model directory/)).toEqual(clean)
  })

  it("a directory without model.json", async () => {
    const result = await runCli(["generate", "--model", tempDir("empty"), "--prompt", "hi"])
    expect(expectCleanFailure(result, "model.json is missing")).toEqual(clean)
  })

  it("a model.json that fails its schema", async () => {
    const dir = join(tempDir("schema"), "m")
    cpSync(modelDir, dir, { recursive: true })
    const spec = JSON.parse(readFileSync(join(dir, "model.json"), "utf8"))
    spec.dims.layers = "five"
    writeFileSync(join(dir, "model.json"), JSON.stringify(spec))
    const result = await runCli(["generate", "--model", dir, "--prompt", "hi"])
    expect(expectCleanFailure(result, "does not match the model format")).toEqual(clean)
    expect(result.stderr).toContain("layers")
  })

  it("a corrupt ONNX file", async () => {
    const dir = join(tempDir("corrupt"), "m")
    cpSync(modelDir, dir, { recursive: true })
    writeFileSync(join(dir, "segment_2.onnx"), "this is not a protobuf")
    const result = await runCli(["generate", "--model", dir, "--prompt", "hi"])
    expect(expectCleanFailure(result, "cannot load segment_2.onnx")).toEqual(clean)
  })

  it("a checkpoint whose size disagrees with its header", async () => {
    const dir = tempDir("trunc")
    const truncated = join(dir, "stories260K.bin")
    writeFileSync(truncated, readFileSync(STORIES_CHECKPOINT).subarray(0, 500_000))
    const result = await runCli([
      "convert",
      "llama2c",
      "--checkpoint",
      truncated,
      "--tokenizer",
      STORIES_TOKENIZER,
      "--out",
      join(dir, "out"),
    ])
    expect(expectCleanFailure(result, "disagrees with its header")).toEqual(clean)
  })

  it("exit layers outside the model", async () => {
    const result = await convertStoriesCli(join(tempDir("exits"), "out"), "--exits", "2,9")
    expect(expectCleanFailure(result, "exit layers must be integers in 1..5")).toEqual(clean)
  })

  it("a prompt longer than the context", async () => {
    const result = await generate("--prompt", "Once upon a time ".repeat(200))
    expect(expectCleanFailure(result, /the prompt is \d+ tokens but the model's context is 512/)).toEqual(clean)
  })

  it("--max-tokens 0 and negative", async () => {
    for (const n of ["0", "-3"]) {
      const result = await generate("--prompt", "hi", "--max-tokens", n)
      expect(expectCleanFailure(result, "max tokens must be a positive integer")).toEqual(clean)
    }
  })

  it("an unknown flag", async () => {
    const result = await generate("--prompt", "hi", "--bogus", "1")
    expect(result.code).not.toBe(0)
    expect(result.stdout + result.stderr).toContain("--bogus")
  })
})
