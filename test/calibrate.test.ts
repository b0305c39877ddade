/**
 * Threshold calibration: the threshold search on hand-made statistics, the exit statistics against the
 * plain-TypeScript reference, and `offramp calibrate` end to end on stories260K, read back by the engine.
 */
import { readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "@effect/vitest"
import {
  CLOSED_THRESHOLD,
  collectExitStatistics,
  type ExitStatistics,
  thresholdsForPerplexity,
  thresholdsForTarget,
} from "@offramp/core/Calibration"
import { ConfidenceEvaluator } from "@offramp/core/ConfidenceEvaluator"
import { Engine } from "@offramp/core/Engine"
import { ModelRunner } from "@offramp/core/ModelRunner"
import { CALIBRATION_FILE, CalibrationFile, onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { OnnxModelRunner } from "@offramp/onnx/OnnxModelRunner"
import { Effect, Layer, Schema } from "effect"
import { beforeAll } from "vitest"
import { expectCleanFailure, runCli } from "./support/cli.js"
import { argmax, loadLlama2cReference } from "./support/reference-llama.js"
import { convertStories, REFERENCE_IDS, STORIES_CHECKPOINT, tempDir } from "./support/stories.js"

/** Simple stories in the register of TinyStories, written for this test. */
const STORY_TEXT = `\
Once upon a time, there was a little boy named Tim. Tim had a small red car. He liked to play with his car \
every day. One day, Tim took his car to the park. The sun was warm and the sky was blue. Tim saw a big tree \
and a little bird. The bird sang a happy song. Tim smiled and said, "Hello, bird!" The bird flew down and sat \
on his car.

Tim and the bird played all day. They went around the tree and up the hill. Then Tim felt tired. He sat down \
on the grass. His mom came to the park and said, "Tim, it is time to go home." Tim said goodbye to the bird. \
He was sad, but his mom gave him a hug. They walked home together, and Tim was happy again.

Lily was a kind girl who loved her cat, Max. Max was soft and gray. One morning, Lily could not find Max. She \
looked under the bed and in the box. She looked in the garden and by the door. "Max, where are you?" she \
called. Lily was very sad. Her dad helped her look. They walked to the big pond. There was Max, sitting next \
to a duck! The duck and Max were friends. Lily laughed and picked up Max. She said, "I am so glad you are \
safe." Lily gave Max some milk, and Max purred. That night, Max slept on Lily's bed.

One day, Sam and Sue wanted to bake a cake for their mom. They got flour, eggs and sugar. Sam mixed the eggs \
and Sue poured the milk. The kitchen was a big mess, but they did not mind. They put the cake in the oven and \
waited. Soon the house smelled sweet. When Mom came home, she saw the cake and smiled. "Thank you, my dear \
children," she said. They all ate the cake together. It was the best day ever.

Ben had a blue ball. He threw the ball high in the sky. The ball went over the fence and into the yard of an \
old man. Ben was scared to ask for it. He knocked on the door. The old man opened it and gave Ben the ball. \
"Be careful," he said with a smile. Ben said thank you. From that day, Ben and the old man were good friends. \
Every day, Ben came to say hello, and the old man told him a story.
`

const TARGET = 0.95

let modelDir = ""
let cliModelDir = ""
beforeAll(async () => {
  modelDir = tempDir("calibrate")
  cliModelDir = tempDir("calibrate-cli")
  await Promise.all([convertStories(modelDir), convertStories(cliModelDir)])
})

const stats = (layer: number, samples: ReadonlyArray<readonly [number, boolean]>): ExitStatistics => ({
  layer,
  samples: samples.map(([confidence, agrees]) => ({ confidence, agrees, logprob: Number.NaN })),
})

describe("thresholdsForTarget", () => {
  it("takes the largest prefix by confidence whose agreement rate reaches the target", () => {
    // Sorted: .9 T, .8 T, .7 F, .6 T, .5 T, .4 F, .3 F. Rates: 1, 1, 2/3, 3/4, 4/5, 4/6, 4/7.
    const samples = [
      [0.5, true],
      [0.9, true],
      [0.3, false],
      [0.7, false],
      [0.8, true],
      [0.4, false],
      [0.6, true],
    ] as const
    const [exit] = thresholdsForTarget([stats(2, samples)], 0.75)
    // 4/5 at 0.5 is the longest prefix at ≥ 75 %, though 3/4 at 0.6 also qualifies and 2/3 at 0.7 does not.
    expect(exit).toEqual({ layer: 2, threshold: 0.5, coverage: 5 / 7, agreement: 0.8 })
    expect(thresholdsForTarget([stats(2, samples)], 1)[0]).toEqual({
      layer: 2,
      threshold: 0.8,
      coverage: 2 / 7,
      agreement: 1,
    })
    expect(thresholdsForTarget([stats(2, samples)], 0.5)[0]!.threshold).toBe(0.3)
  })

  it("admits or refuses a group of equal confidences as a whole", () => {
    // Two agreeing positions at 0.9, then three at 0.6 of which one disagrees: 4/5 = 80 % < 90 %. Cutting inside
    // the group (0.6 T, 0.6 T) would claim 100 %, but a 0.6 threshold admits all three.
    const tie = stats(1, [
      [0.9, true],
      [0.9, true],
      [0.6, true],
      [0.6, false],
      [0.6, true],
      [0.2, true],
    ])
    expect(thresholdsForTarget([tie], 0.9)[0]).toEqual({ layer: 1, threshold: 0.9, coverage: 2 / 6, agreement: 1 })
    // At 80 % the group fits, and the last position with it (5/6 ≥ 80 %).
    expect(thresholdsForTarget([tie], 0.8)[0]).toEqual({ layer: 1, threshold: 0.2, coverage: 1, agreement: 5 / 6 })
    // The top group itself fails the target: no non-empty prefix may be cut from it.
    const topTie = stats(1, [
      [0.9, true],
      [0.9, false],
      [0.5, true],
    ])
    expect(thresholdsForTarget([topTie], 0.9)[0]!.threshold).toBe(CLOSED_THRESHOLD)
  })

  it("closes an exit that can never reach the target, and one without samples", () => {
    const never = stats(3, [
      [0.99, false],
      [0.8, true],
      [0.7, false],
    ])
    const [closed, empty] = thresholdsForTarget([never, stats(4, [])], 0.6)
    expect(closed).toEqual({ layer: 3, threshold: CLOSED_THRESHOLD, coverage: 0, agreement: 0 })
    expect(empty).toEqual({ layer: 4, threshold: CLOSED_THRESHOLD, coverage: 0, agreement: 0 })
  })

  it("an exact target rate qualifies despite floating-point rounding", () => {
    const samples = Array.from({ length: 20 }, (_, i) => [1 - i / 100, i !== 7] as const)
    expect(thresholdsForTarget([stats(1, samples)], 0.95)[0]).toMatchObject({ coverage: 1, agreement: 0.95 })
  })
})

const runnerLayer = () => OnnxModelRunner.layer(modelDir, { blockSize: 16, numBlocks: 16 })

describe("thresholdsForPerplexity", () => {
  // Ten positions. Exit 2 predicts the text as well as full depth where it is confident (≥ 0.5) and badly
  // elsewhere; full depth gives every token probability 0.5.
  const half = Math.log(0.5)
  const final: ExitStatistics = {
    layer: 8,
    samples: Array.from({ length: 10 }, () => ({ confidence: 1, agrees: true, logprob: half })),
  }
  const early: ExitStatistics = {
    layer: 2,
    samples: Array.from({ length: 10 }, (_, p) => ({
      confidence: p / 10,
      agrees: p >= 5,
      logprob: p >= 5 ? half : Math.log(0.01),
    })),
  }
  const nll = (thresholdAt2: number) =>
    -early.samples.reduce((sum, s) => sum + (s.confidence >= thresholdAt2 ? s.logprob : half), 0)

  it("exits every position whose exit costs nothing, and no more, within a zero budget", () => {
    const [exit] = thresholdsForPerplexity([early], final, 0, 8)
    expect(exit!.threshold).toBe(0.5)
    expect(exit!.coverage).toBe(0.5)
    expect(exit!.agreement).toBe(1)
    expect(nll(exit!.threshold)).toBeCloseTo(-10 * half)
  })

  it("spends a budget on the least depth: a looser threshold once the budget covers a bad position", () => {
    // One more position at exit 2 costs log(0.5/0.01) ≈ 3.9 nats over 10 positions: exp(0.39) − 1 ≈ 48%.
    expect(thresholdsForPerplexity([early], final, 0.47, 8)[0]!.threshold).toBe(0.5)
    const loose = thresholdsForPerplexity([early], final, 0.5, 8)[0]!
    expect(loose.threshold).toBeLessThan(0.5)
    expect(Math.exp((nll(loose.threshold) - -10 * half) / 10) - 1).toBeLessThanOrEqual(0.5)
  })
})

describe("collectExitStatistics vs the TypeScript reference (stories260K)", () => {
  it.effect("agreement and softmax confidence per position match the reference forward pass", () =>
    Effect.gen(function* () {
      const runner = yield* ModelRunner
      const evaluator = yield* ConfidenceEvaluator
      const { spec } = runner
      // Two windows of 12 positions: BOS + 11 text tokens, then BOS + the rest.
      const text = REFERENCE_IDS.slice(1, 20)
      const statistics = yield* collectExitStatistics(runner, evaluator, text, { measure: "softmax", window: 12 })
      expect(statistics.map((s) => s.layer)).toEqual(spec.exits.slice(0, -1).map((e) => e.layer))
      for (const s of statistics) expect(s.samples.length).toBe(12 + 9)

      const reference = loadLlama2cReference(STORIES_CHECKPOINT)
      const windows = [
        [spec.tokens.bos, ...text.slice(0, 11)],
        [spec.tokens.bos, ...text.slice(11)],
      ]
      const positions = windows.flatMap((ids) => reference.run(ids).slice())
      const softmaxMax = (logits: Float32Array) => {
        const top = logits[argmax(logits)]!
        let sum = 0
        for (const x of logits) sum += Math.exp(x - top)
        return 1 / sum
      }
      let disagreements = 0
      for (const exit of statistics) {
        positions.forEach((position, p) => {
          const exitLogits = position.exitLogits[exit.layer - 1]!
          const agrees = argmax(exitLogits) === argmax(position.logits)
          expect(exit.samples[p]!.agrees).toBe(agrees)
          expect(exit.samples[p]!.confidence).toBeCloseTo(softmaxMax(exitLogits), 4)
          if (!agrees) disagreements++
        })
      }
      // Both outcomes occur, so the comparison is not vacuous.
      expect(disagreements).toBeGreaterThan(0)
      expect(disagreements).toBeLessThan(statistics.length * positions.length)
    }).pipe(Effect.provide(Layer.merge(runnerLayer(), ConfidenceEvaluator.layer))),
  )

  it.effect("saturation scores the first exit against the embedding and later ones against the previous exit", () =>
    Effect.gen(function* () {
      const runner = yield* ModelRunner
      const evaluator = yield* ConfidenceEvaluator
      const text = REFERENCE_IDS.slice(1, 9)
      const statistics = yield* collectExitStatistics(runner, evaluator, text, { measure: "saturation" })
      const reference = loadLlama2cReference(STORIES_CHECKPOINT)
      const positions = reference.run([runner.spec.tokens.bos, ...text])
      const embedding = reference.weights.tokenEmbedding
      const D = runner.spec.dims.hidden
      const cosine = (a: ArrayLike<number>, b: ArrayLike<number>) => {
        let dot = 0
        let na = 0
        let nb = 0
        for (let i = 0; i < a.length; i++) {
          dot += a[i]! * b[i]!
          na += a[i]! * a[i]!
          nb += b[i]! * b[i]!
        }
        return dot / Math.sqrt(na * nb)
      }
      statistics.forEach((exit, e) => {
        positions.forEach((position, p) => {
          const previous =
            e === 0
              ? embedding.subarray(position.token * D, (position.token + 1) * D)
              : position.hidden[statistics[e - 1]!.layer - 1]!
          const want = Math.max(0, cosine(position.hidden[exit.layer - 1]!, previous))
          expect(exit.samples[p]!.confidence).toBeCloseTo(want, 4)
        })
      })
    }).pipe(Effect.provide(Layer.merge(runnerLayer(), ConfidenceEvaluator.layer))),
  )
})

describe("offramp calibrate (stories260K)", () => {
  it("writes calibration.json that meets the target, and the engine takes it as its defaults", async () => {
    const textFile = join(tempDir("calibrate-text"), "stories.txt")
    writeFileSync(textFile, STORY_TEXT)
    const result = await runCli(["calibrate", "--model", cliModelDir, "--text", textFile, "--target", String(TARGET)])
    expect(result.stderr).toContain(CALIBRATION_FILE)
    expect(result.code).toBe(0)
    expect(result.stdout).toMatch(/^layer\s+threshold\s+coverage\s+agreement$/m)

    const file = Schema.decodeUnknownSync(CalibrationFile)(
      JSON.parse(readFileSync(join(cliModelDir, CALIBRATION_FILE), "utf8")),
    )
    const calibration = file.calibration as {
      target: number
      text: string
      tokens: number
      measure: string
      exits: ReadonlyArray<{ layer: number; threshold: number; coverage: number; agreement: number }>
    }
    expect(calibration).toMatchObject({ target: TARGET, text: "stories.txt", measure: "softmax" })
    expect(calibration.tokens).toBeGreaterThan(300)
    expect(calibration.exits.map((e) => e.layer)).toEqual([1, 2, 3, 4])
    expect(file.earlyExit).toMatchObject({ measure: "softmax", threshold: CLOSED_THRESHOLD, minExitLayer: 1 })
    expect(file.earlyExit).toMatchObject({ policy: "per-sequence", kv: "fill" })
    for (const exit of calibration.exits) {
      expect(exit.threshold === CLOSED_THRESHOLD || (exit.threshold >= 0 && exit.threshold <= 1)).toBe(true)
      if (exit.coverage > 0) expect(exit.agreement).toBeGreaterThanOrEqual(TARGET)
      else expect(exit.threshold).toBe(CLOSED_THRESHOLD)
      expect(file.earlyExit.thresholds?.[String(exit.layer)]).toBe(exit.threshold <= 1 ? exit.threshold : undefined)
    }
    // The deepest early exit agrees with full depth most: it must admit something at 95 %.
    expect(calibration.exits.at(-1)!.coverage).toBeGreaterThan(0)

    const defaults = await Effect.runPromise(
      Effect.map(Engine, (engine) => engine.defaults).pipe(Effect.provide(onnxEngineLayer(cliModelDir))),
    )
    expect(defaults.thresholds).toEqual(file.earlyExit.thresholds)
    expect(defaults).toEqual(file.earlyExit)
  })

  it("fails with one clear line for a missing, empty or too short text", async () => {
    const dir = tempDir("calibrate-bad")
    const empty = join(dir, "empty.txt")
    const short = join(dir, "short.txt")
    writeFileSync(empty, "  \n")
    writeFileSync(short, "Once upon a time, there was a cat.")
    const cases = [
      [join(dir, "missing.txt"), "cannot read the calibration text"],
      [empty, "is empty"],
      [short, "too short"],
    ] as const
    for (const [path, fragment] of cases) {
      const result = await runCli(["calibrate", "--model", cliModelDir, "--text", path])
      expect(expectCleanFailure(result, fragment)).toEqual({ failed: true, mentions: true, stackFree: true })
    }
  })
})
