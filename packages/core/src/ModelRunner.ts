/**
 * The ModelRunner service: runs the stages of a staged model (embed, segments, exit heads, kvfill) on a batch
 * and owns the paged K/V pools. The onnxruntime implementation lives in @offramp/onnx.
 */
import { Context, type Effect } from "effect"
import type { RunnerError } from "./Errors.js"
import type { ModelSpec } from "./ModelSpec.js"

/**
 * A batch in the padded layout [rows, tokens]: row r holds `tokens` new positions (unused ones are padding,
 * marked by slot -1). Each row attends to its cached blocks (by block table) and to its own new tokens.
 */
export interface RowBatch {
  readonly rows: number
  readonly tokens: number
  /** [rows × tokens] absolute positions. */
  readonly positions: BigInt64Array
  /** [rows × maxBlocks] physical block ids (any valid id where unused: the mask hides it). */
  readonly blockTable: Int32Array
  readonly maxBlocks: number
  /** [rows × tokens × (maxBlocks·blockSize + tokens)] additive attention mask (see GraphNames). */
  readonly mask: Float32Array
  /** [rows × tokens] pool slot (block·blockSize + offset) where each new K/V row is written; -1 for padding. */
  readonly slots: Int32Array
}

/**
 * What an exit head says about each row: the confidence statistics computed in-graph, and the logits when asked for.
 * Logits are rows × vocab floats that onnxruntime copies into a fresh buffer on every call, so a runner fetches them
 * only for the rows that sample or score a given token; greedy decoding needs only `topToken` and `maxProb`.
 */
export interface HeadOutput {
  /** [rows × vocab]; undefined unless the call asked for logits. */
  readonly logits: Float32Array | undefined
  readonly maxProb: Float32Array
  readonly margin: Float32Array
  readonly entropy: Float32Array
  readonly topToken: BigInt64Array
}

/**
 * A runner's calls read their input arrays only while they run (callers reuse them), and return arrays of their own
 * that they never write again (callers keep views of them).
 */
export interface ModelRunnerShape {
  readonly spec: ModelSpec
  readonly blockSize: number
  readonly numBlocks: number
  /** ids [rows × tokens] → hidden [rows × tokens × hidden]. */
  readonly embed: (ids: BigInt64Array, rows: number, tokens: number) => Effect.Effect<Float32Array, RunnerError>
  /** Runs segment `index` and writes its new K/V rows into the pools at `batch.slots`; returns the hidden out. */
  readonly segment: (index: number, hidden: Float32Array, batch: RowBatch) => Effect.Effect<Float32Array, RunnerError>
  /** Runs the head of exit `index` (position in spec.exits) on `count` hidden rows; `logits` asks for the logits too. */
  readonly head: (
    index: number,
    hidden: Float32Array,
    count: number,
    logits: boolean,
  ) => Effect.Effect<HeadOutput, RunnerError>
  /**
   * The exit classifier of exit `index` on `count` rows: their hidden states there and at the previous exit (the
   * embedding before the first exit), [count × hidden] each. Undefined when the model has none there.
   */
  readonly classify: (
    index: number,
    hidden: Float32Array,
    previous: Float32Array,
    count: number,
  ) => Effect.Effect<Float32Array | undefined, RunnerError>
  /**
   * The exit classifier of exit `index` as a plain function of one row's hidden state there and at the previous exit,
   * when the runner evaluates it in JavaScript: the engine then decides with no call and no copy. Undefined when the
   * exit has no classifier or it runs as a graph (use `classify`).
   */
  readonly exitPredictor: (index: number) => ((hidden: Float32Array, previous: Float32Array) => number) | undefined
  /**
   * Writes the K/V of every layer after early exit `index`, computed from each row's exit hidden state. With
   * `fromLayers`, row r writes only layers ≥ fromLayers[r] (rows that exited at later exits share the call).
   */
  readonly kvFill: (
    index: number,
    hidden: Float32Array,
    positions: BigInt64Array,
    slots: Int32Array,
    fromLayers?: Int32Array,
  ) => Effect.Effect<void, RunnerError>
  /** Copies block `from` to block `to` in every layer's K and V pools (copy-on-write of a shared block). */
  readonly copyBlock: (from: number, to: number) => void
  /** Bytes of K/V one block holds across all layers. */
  readonly bytesPerBlock: number
  /**
   * What the model's weights take: `storedBytes` in the files the runner loaded, `residentBytes` in memory once
   * loaded (for onnxruntime: the process's resident growth while its sessions were created; float16 storage, for
   * one, is cast to float32 there).
   */
  readonly weights: ModelWeightBytes
  /** A copy of the K and V rows of `layer` at pool `slot` (for inspection and tests). */
  readonly readKv: (layer: number, slot: number) => { readonly k: Float32Array; readonly v: Float32Array }
}

export interface ModelWeightBytes {
  readonly storedBytes: number
  readonly residentBytes: number
}

export class ModelRunner extends Context.Tag("@offramp/core/ModelRunner")<ModelRunner, ModelRunnerShape>() {}
