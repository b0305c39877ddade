import { mkdtemp, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "@effect/vitest"
import { Effect, Exit } from "effect"
import { hfRopeInvFreq, readHfCheckpoint } from "../src/HfCheckpoint.js"
import { ropeInvFreq } from "../src/LlamaWeights.js"
import { stagedModelSpec } from "../src/StagedModelWriter.js"
import { type TinyLlamaOptions, writeTinyLlama } from "./support/tiny-llama.js"

let root = ""
let counter = 0
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), "offramp-hf-"))
})
afterAll(() => rm(root, { recursive: true, force: true }))

const tiny = (options: TinyLlamaOptions = {}) => writeTinyLlama(join(root, `m${counter++}`), options)

/** The typed failure of reading a checkpoint. */
const readFailure = (dir: string) =>
  Effect.gen(function* () {
    const exit = yield* Effect.exit(readHfCheckpoint(dir))
    if (!Exit.isFailure(exit) || exit.cause._tag !== "Fail") throw new Error("expected a typed failure")
    return exit.cause.error as unknown as { _tag: string; message: string; [key: string]: unknown }
  })

describe("Hugging Face Llama checkpoints", () => {
  it.effect("reads every tensor unchanged (no Q/K permutation), with GQA dims and defaults", () =>
    Effect.gen(function* () {
      const model = yield* Effect.promise(() => tiny())
      const hf = yield* readHfCheckpoint(model.dir)
      const w = hf.weights
      expect(w.config).toEqual({
        dim: 32,
        hiddenDim: 64,
        layers: 3,
        heads: 4,
        kvHeads: 2,
        headDim: 8,
        vocab: 512,
        contextLength: 64,
        normEps: 1e-5,
        ropeTheta: 10000,
      })
      const t = (name: string) => Array.from(model.tensors.get(name)!)
      expect(Array.from(w.layers[1]!.wq)).toEqual(t("model.layers.1.self_attn.q_proj.weight"))
      expect(Array.from(w.layers[2]!.wk)).toEqual(t("model.layers.2.self_attn.k_proj.weight"))
      expect(Array.from(w.layers[0]!.down)).toEqual(t("model.layers.0.mlp.down_proj.weight"))
      expect(Array.from(w.finalHead.lmHead)).toEqual(t("lm_head.weight"))
      expect(Array.from(w.invFreq)).toEqual(Array.from(ropeInvFreq(8, 10000)))
      expect(w.exitHeads).toBeUndefined()
      expect(hf.exits).toBeUndefined()
      expect(hf.tokens).toEqual({ bos: 1, eos: 2, stop: [2] })
    }),
  )

  it.effect("tied embeddings share the table; eos lists and generation_config.json all stop", () =>
    Effect.gen(function* () {
      const model = yield* Effect.promise(() => tiny({ tied: true, config: { eos_token_id: [2, 7], bos_token_id: 0 } }))
      yield* Effect.promise(() =>
        writeFile(join(model.dir, "generation_config.json"), JSON.stringify({ eos_token_id: [7, 9] })),
      )
      const hf = yield* readHfCheckpoint(model.dir)
      expect(hf.weights.finalHead.lmHead).toBe(hf.weights.embedding)
      expect(hf.tokens).toEqual({ bos: 0, eos: 2, stop: [2, 7, 9] })
    }),
  )

  it.effect("sharded BF16 checkpoints read as the rounded float32 values", () =>
    Effect.gen(function* () {
      const model = yield* Effect.promise(() => tiny({ shards: 3, dtype: "BF16" }))
      const hf = yield* readHfCheckpoint(model.dir)
      expect(Array.from(hf.weights.layers[2]!.up)).toEqual(
        Array.from(model.tensors.get("model.layers.2.mlp.up_proj.weight")!),
      )
      expect(Array.from(hf.weights.embedding)).toEqual(Array.from(model.tensors.get("model.embed_tokens.weight")!))
    }),
  )

  it.effect("dedicated exit heads become exitHeads and the default exits; early_exit_layers wins over them", () =>
    Effect.gen(function* () {
      const model = yield* Effect.promise(() => tiny({ layers: 4, exitHeads: [1, 3] }))
      const hf = yield* readHfCheckpoint(model.dir)
      expect([...hf.weights.exitHeads!.keys()]).toEqual([1, 3])
      expect(Array.from(hf.weights.exitHeads!.get(3)!.lmHead)).toEqual(
        Array.from(model.tensors.get("exit_heads.3.lm_head.weight")!),
      )
      expect(hf.exits).toEqual([1, 3])
      const spec = stagedModelSpec(hf.weights, { name: "t", source: "t", tokens: hf.tokens, tokenizer: {} })
      expect(spec.headKind).toBe("dedicated")
      expect(spec.exits.map((e) => e.head)).toEqual(["head_1.onnx", "head_3.onnx", "head.onnx"])
      // An exit without a dedicated head is refused rather than silently given the final head.
      expect(() =>
        stagedModelSpec(hf.weights, { name: "t", source: "t", tokens: hf.tokens, tokenizer: {}, exits: [2] }),
      ).toThrow(/none after 2/)

      // The full-depth exit may be listed; alone, it converts a model with no early exits.
      const finalOnly = stagedModelSpec(hf.weights, {
        name: "t",
        source: "t",
        tokens: hf.tokens,
        tokenizer: {},
        exits: [4],
      })
      expect(finalOnly.exits.map((e) => e.layer)).toEqual([4])
      expect(finalOnly.segments.map((s) => [s.firstLayer, s.endLayer])).toEqual([[0, 4]])
      expect(() =>
        stagedModelSpec(hf.weights, { name: "t", source: "t", tokens: hf.tokens, tokenizer: {}, exits: [5] }),
      ).toThrow(/integers in 1\.\.4/)

      const configured = yield* Effect.promise(() => tiny({ layers: 4, config: { early_exit_layers: [2, 4] } }))
      expect((yield* readHfCheckpoint(configured.dir)).exits).toEqual([2])
    }),
  )

  it.effect("an exit head without its own LM head uses the shared one", () =>
    Effect.gen(function* () {
      const model = yield* Effect.promise(() => tiny({ exitHeads: [2], omit: ["exit_heads.2.lm_head.weight"] }))
      const hf = yield* readHfCheckpoint(model.dir)
      expect(hf.weights.exitHeads!.get(2)!.lmHead).toBe(hf.weights.finalHead.lmHead)
    }),
  )

  it.effect("typed errors: architecture, missing tensor, shape, config problems", () =>
    Effect.gen(function* () {
      const mistral = yield* Effect.promise(() =>
        tiny({ config: { architectures: ["MistralForCausalLM"], model_type: "mistral" } }),
      )
      const arch = yield* readFailure(mistral.dir)
      expect(arch._tag).toBe("UnsupportedArchitectureError")
      expect(arch.message).toBe(
        "unsupported architecture MistralForCausalLM; Offramp converts Llama-family models (LlamaForCausalLM)",
      )

      const noLmHead = yield* Effect.promise(() => tiny({ omit: ["lm_head.weight"] }))
      const missing = yield* readFailure(noLmHead.dir)
      expect(missing._tag).toBe("MissingTensorError")
      expect(missing.tensor).toBe("lm_head.weight")
      expect(missing.message).toContain("tie_word_embeddings false")

      const wrongK = yield* Effect.promise(() =>
        tiny({ reshape: { "model.layers.1.self_attn.k_proj.weight": [32, 32] } }),
      )
      const shape = yield* readFailure(wrongK.dir)
      expect(shape._tag).toBe("TensorShapeError")
      expect(shape.expected).toEqual([16, 32])
      expect(shape.actual).toEqual([32, 32])
      expect(shape.message).toContain("model.layers.1.self_attn.k_proj.weight has shape [32,32]")
      expect(shape.message).toContain("implies [16,32]")

      const cases: Array<[NonNullable<TinyLlamaOptions["config"]>, RegExp]> = [
        [{ num_key_value_heads: 3 }, /not a multiple of num_key_value_heads 3/],
        [{ head_dim: 16 }, /head_dim 16 differs/],
        [{ hidden_act: "gelu" }, /hidden_act gelu/],
        [{ rope_scaling: { rope_type: "yarn", factor: 4 } }, /rope_scaling type "yarn" is not supported/],
        [{ hidden_size: "big" }, /hidden_size/],
      ]
      for (const [config, message] of cases) {
        const model = yield* Effect.promise(() => tiny({ config }))
        const error = yield* readFailure(model.dir)
        expect(error._tag).toBe("CheckpointError")
        expect(error.message).toMatch(message)
      }

      const late = yield* Effect.promise(() => tiny({ exitHeads: [3] }))
      expect((yield* readFailure(late.dir)).message).toMatch(/exit heads after layers 3 are out of range/)

      expect((yield* readFailure(join(root, "nowhere"))).message).toMatch(/no config.json/)
    }),
  )
})

describe("RoPE scaling", () => {
  it("linear divides every frequency by the factor", () => {
    const scaled = hfRopeInvFreq(64, 10000, { type: "linear", factor: 4 })
    expect("invFreq" in scaled && Array.from(scaled.invFreq)).toEqual(
      Array.from(ropeInvFreq(64, 10000).map((f) => f / 4)),
    )
  })

  it("llama3 matches transformers' _compute_llama3_parameters (Llama 3.1 settings)", () => {
    const scaling = {
      rope_type: "llama3",
      factor: 8,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    }
    const result = hfRopeInvFreq(128, 500000, scaling)
    if (!("invFreq" in result)) throw new Error(result.error)
    const base = ropeInvFreq(128, 500000)
    // Written from the transformers source: wavelen > 8192 → /8; wavelen < 2048 → unchanged; between: smoothed.
    base.forEach((f, i) => {
      const wavelen = (2 * Math.PI) / f
      const smooth = (8192 / wavelen - 1) / (4 - 1)
      const want = wavelen > 8192 ? f / 8 : wavelen < 2048 ? f : (1 - smooth) * (f / 8) + smooth * f
      expect(Math.abs(result.invFreq[i]! - want)).toBeLessThanOrEqual(want * 1e-6)
    })
    // Spot values: the first frequency is unchanged, the last is divided by the factor.
    expect(result.invFreq[0]).toBe(1)
    expect(result.invFreq[63]).toBeCloseTo(base[63]! / 8, 15)
    expect(result.invFreq.some((f, i) => f !== base[i] && f !== Math.fround(base[i]! / 8))).toBe(true)
  })

  it("default and absent scaling leave the frequencies alone; unknown types fail", () => {
    const plain = Array.from(ropeInvFreq(16, 10000))
    for (const scaling of [undefined, null, { rope_type: "default" }]) {
      const result = hfRopeInvFreq(16, 10000, scaling)
      expect("invFreq" in result && Array.from(result.invFreq)).toEqual(plain)
    }
    expect(hfRopeInvFreq(16, 10000, { rope_type: "dynamic", factor: 2 })).toHaveProperty("error")
    expect(hfRopeInvFreq(16, 10000, { rope_type: "llama3", factor: 2 })).toHaveProperty("error")
  })
})
