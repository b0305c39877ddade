/**
 * ModelRunner on onnxruntime-node. One onnxruntime session per stage, called synchronously, acquired in a Scope and
 * released with it.
 * The K/V pools are JS-owned Float32Arrays passed as zero-copy inputs; graphs return only the new rows,
 * which are copied into the pools here (onnxruntime copies every output, so returning whole caches is slow).
 */
import { readFile } from "node:fs/promises"
import { join } from "node:path"
import { ModelLoadError, RunnerError } from "@offramp/core/Errors"
import { predictExit } from "@offramp/core/ExitClassifier"
import { GraphNames as G } from "@offramp/core/GraphNames"
import { type HeadOutput, ModelRunner, type ModelRunnerShape, type RowBatch } from "@offramp/core/ModelRunner"
import { Effect, Layer, type Scope } from "effect"
import * as ort from "onnxruntime-node"
import { readClassifierWeights } from "./internal/ClassifierFile.js"
import { readEmbeddingTable } from "./internal/EmbeddingTable.js"
import { loadNativeSession, type NativeSession } from "./internal/NativeSession.js"
import { openModelDirectory } from "./ModelDirectory.js"

export interface RunnerOptions {
  /** Tokens per KV block. */
  readonly blockSize?: number
  /** Pool size in blocks; default: as many as fit in `kvCacheBytes`. */
  readonly numBlocks?: number
  /** Memory budget of the K/V pools in bytes (default 64 MiB). */
  readonly kvCacheBytes?: number
  /**
   * Intra-op threads per session. Measured (DESIGN.md): several sessions with 2 threads each collapse 5–10x
   * because every session spins its own pool, so the default is 1.
   */
  readonly threads?: number
}

export const DEFAULT_BLOCK_SIZE = 16
export const DEFAULT_KV_CACHE_BYTES = 64 * 1024 * 1024

const sessionOptions = (threads: number): ort.InferenceSession.SessionOptions => ({
  intraOpNumThreads: threads,
  interOpNumThreads: 1,
  executionMode: "sequential",
  graphOptimizationLevel: "all",
})

/**
 * A session on one graph file. Sessions are called synchronously (see internal/NativeSession.ts): the native run
 * blocks the thread either way, and the public promise API adds an event-loop turn and a fiber suspension per call.
 */
const acquireSession = (dir: string, file: string, threads: number) =>
  Effect.acquireRelease(
    Effect.try({
      try: () => loadNativeSession(join(dir, file), sessionOptions(threads)),
      catch: (e) =>
        new ModelLoadError({
          path: join(dir, file),
          message: `onnxruntime cannot load ${file} (${(e as Error).message.split("\n")[0]}); the file is corrupt or from an incompatible converter`,
        }),
    }),
    (session) => Effect.sync(() => session.dispose()),
  )

/** An exit classifier: weights evaluated in JavaScript, or a session for a graph of another origin. */
const loadClassifier = (dir: string, file: string, hidden: number, threads: number) =>
  Effect.gen(function* () {
    const path = join(dir, file)
    const weights = yield* Effect.tryPromise({
      try: async () => readClassifierWeights(new Uint8Array(await readFile(path)), hidden),
      catch: (e) =>
        new ModelLoadError({
          path,
          message: `cannot read the exit classifier ${file} (${(e as Error).message}); fit it again with \`offramp calibrate --classifiers\``,
        }),
    })
    if (weights) return { weights, session: undefined }
    return { weights: undefined, session: yield* acquireSession(dir, file, threads) }
  })

/** The head's small outputs; without the logits, a call returns a few floats per row instead of a vocabulary's. */
const HEAD_STATISTICS = [G.maxProb, G.margin, G.entropy, G.topToken]
const HEAD_OUTPUTS = [G.logits, ...HEAD_STATISTICS]

const f32 = (data: Float32Array, dims: ReadonlyArray<number>) => new ort.Tensor("float32", data, dims)
const i64 = (data: BigInt64Array, dims: ReadonlyArray<number>) => new ort.Tensor("int64", data, dims)
const i32 = (data: Int32Array, dims: ReadonlyArray<number>) => new ort.Tensor("int32", data, dims)

export const makeOnnxModelRunner = (
  modelDir: string,
  options: RunnerOptions = {},
): Effect.Effect<ModelRunnerShape, ModelLoadError, Scope.Scope> =>
  Effect.gen(function* () {
    const { spec, files } = yield* openModelDirectory(modelDir)
    const { dims } = spec
    const threads = options.threads ?? 1
    const blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE
    const rowFloats = dims.kvHeads * dims.headDim
    const blockBytes = 2 * dims.layers * blockSize * rowFloats * 4
    const numBlocks =
      options.numBlocks ?? Math.max(1, Math.floor((options.kvCacheBytes ?? DEFAULT_KV_CACHE_BYTES) / blockBytes))

    // What loading the weights adds to the process's resident memory (onnxruntime lays them out at session creation).
    const residentBefore = process.memoryUsage.rss()
    // Offramp's embed graph is a table lookup, done in JavaScript (see internal/EmbeddingTable.ts); another runs in
    // a session.
    const embedPath = join(modelDir, spec.files.embed)
    const embedTable = yield* Effect.tryPromise({
      try: async () => readEmbeddingTable(new Uint8Array(await readFile(embedPath)), dims.vocab, dims.hidden),
      catch: (e) =>
        new ModelLoadError({
          path: embedPath,
          message: `cannot read ${spec.files.embed} (${(e as Error).message}); convert the model again`,
        }),
    })
    const embedSession = embedTable ? undefined : yield* acquireSession(modelDir, spec.files.embed, threads)
    const segmentSessions = yield* Effect.forEach(spec.segments, (s) => acquireSession(modelDir, s.file, threads))
    // Exits that share one head file share one session.
    const headByFile = new Map<string, NativeSession>()
    for (const e of spec.exits) {
      if (!headByFile.has(e.head)) headByFile.set(e.head, yield* acquireSession(modelDir, e.head, threads))
    }
    const headSessions = spec.exits.map((e) => headByFile.get(e.head)!)
    const kvFillSessions = yield* Effect.forEach(spec.exits, (e) =>
      e.kvfill ? acquireSession(modelDir, e.kvfill, threads) : Effect.succeed(undefined),
    )

    // Offramp's own classifier graphs run in JavaScript (a session call costs more than the classifier); any other
    // classifier graph runs in a session.
    const classifiers = yield* Effect.forEach(spec.exits, (e) =>
      e.classifier ? loadClassifier(modelDir, e.classifier, dims.hidden, threads) : Effect.succeed(undefined),
    )

    const weights = {
      // The graph files (the tokenizer is not weights).
      storedBytes: files.filter((f) => f.name.endsWith(".onnx")).reduce((n, f) => n + f.bytes, 0),
      residentBytes: Math.max(0, process.memoryUsage.rss() - residentBefore),
    }

    // Head-major pools, [kvHeads, blocks, blockSize, headDim] per layer (see GraphNames): gathered by block table,
    // each KV head's rows come out contiguous, as the attention products read them.
    const hd = dims.headDim
    const headFloats = numBlocks * blockSize * hd
    const poolDims = [dims.kvHeads, numBlocks, blockSize, hd]
    const kPools = Array.from({ length: dims.layers }, () => new Float32Array(dims.kvHeads * headFloats))
    const vPools = Array.from({ length: dims.layers }, () => new Float32Array(dims.kvHeads * headFloats))
    const kPoolTensors = kPools.map((p) => f32(p, poolDims))
    const vPoolTensors = vPools.map((p) => f32(p, poolDims))

    const run = (
      stage: string,
      session: NativeSession,
      feeds: Record<string, ort.Tensor>,
      fetches?: ReadonlyArray<string>,
    ) =>
      Effect.try({
        try: () => session.run(feeds, fetches),
        catch: (e) => new RunnerError({ stage, message: (e as Error).message }),
      })

    /**
     * Copies a graph's new K/V rows into the head-major pools at their slots. `kv` is the graph's N.kvNew output,
     * [n, 2·layers·kvHeads·headDim]: per row, K of each of its `layers` layers (the first is `first`), then V of each.
     * `slotOf(i, layer)` is row i's slot in that layer, or -1 to leave it.
     */
    const writeRows = (
      kv: Float32Array,
      first: number,
      layers: number,
      slotOf: (i: number, layer: number) => number,
    ) => {
      const stride = 2 * layers * rowFloats
      const n = kv.length / stride
      for (let j = 0; j < layers; j++) {
        const kPool = kPools[first + j]!
        const vPool = vPools[first + j]!
        for (let i = 0; i < n; i++) {
          const slot = slotOf(i, first + j)
          if (slot < 0) continue
          const kRow = i * stride + j * rowFloats
          const vRow = kRow + layers * rowFloats
          for (let h = 0; h < dims.kvHeads; h++) {
            const to = h * headFloats + slot * hd
            kPool.set(kv.subarray(kRow + h * hd, kRow + (h + 1) * hd), to)
            vPool.set(kv.subarray(vRow + h * hd, vRow + (h + 1) * hd), to)
          }
        }
      }
    }

    const embed: ModelRunnerShape["embed"] = (ids, rows, tokens) =>
      embedTable
        ? Effect.try({
            try: () => embedTable.lookup(ids),
            catch: (e) => new RunnerError({ stage: "embed", message: (e as Error).message }),
          })
        : run("embed", embedSession!, { [G.ids]: i64(ids, [rows, tokens]) }).pipe(
            Effect.map((out) => out[G.hidden]!.data as Float32Array),
          )

    const segment: ModelRunnerShape["segment"] = (index, hidden, batch: RowBatch) => {
      const s = spec.segments[index]!
      const { rows, tokens } = batch
      const keys = batch.maxBlocks * blockSize + tokens
      const feeds: Record<string, ort.Tensor> = {
        [G.hidden]: f32(hidden, [rows, tokens, dims.hidden]),
        [G.positions]: i64(batch.positions, [rows, tokens]),
        [G.blockTable]: i32(batch.blockTable, [rows, batch.maxBlocks]),
        [G.attnMask]: f32(batch.mask, [rows, tokens, keys]),
      }
      for (let l = s.firstLayer; l < s.endLayer; l++) {
        feeds[G.kPool(l)] = kPoolTensors[l]!
        feeds[G.vPool(l)] = vPoolTensors[l]!
      }
      return run(`segment ${index}`, segmentSessions[index]!, feeds).pipe(
        Effect.map((out) => {
          const slots = batch.slots
          writeRows(out[G.kvNew]!.data as Float32Array, s.firstLayer, s.endLayer - s.firstLayer, (i) => slots[i]!)
          return out[G.hiddenOut]!.data as Float32Array
        }),
      )
    }

    const head: ModelRunnerShape["head"] = (index, hidden, count, logits) =>
      run(
        `head of exit ${spec.exits[index]!.layer}`,
        headSessions[index]!,
        { [G.hidden]: f32(hidden, [count, dims.hidden]) },
        logits ? HEAD_OUTPUTS : HEAD_STATISTICS,
      ).pipe(
        Effect.map(
          (out): HeadOutput => ({
            logits: logits ? (out[G.logits]!.data as Float32Array) : undefined,
            maxProb: out[G.maxProb]!.data as Float32Array,
            margin: out[G.margin]!.data as Float32Array,
            entropy: out[G.entropy]!.data as Float32Array,
            topToken: out[G.topToken]!.data as BigInt64Array,
          }),
        ),
      )

    const predictors = classifiers.map((c) => {
      const weights = c?.weights
      return weights
        ? (hidden: Float32Array, previous: Float32Array) => predictExit(weights, hidden, previous)
        : undefined
    })

    const classify: ModelRunnerShape["classify"] = (index, hidden, previous, count) => {
      const classifier = classifiers[index]
      if (!classifier) return Effect.succeed(undefined)
      const predict = predictors[index]
      if (predict) {
        return Effect.sync(() => {
          const D = dims.hidden
          const out = new Float32Array(count)
          for (let r = 0; r < count; r++) {
            out[r] = predict(hidden.subarray(r * D, (r + 1) * D), previous.subarray(r * D, (r + 1) * D))
          }
          return out
        })
      }
      const session = classifier.session!
      const feeds: Record<string, ort.Tensor> = { [G.hidden]: f32(hidden, [count, dims.hidden]) }
      // A classifier graph may read the hidden state alone.
      if (session.inputNames.includes(G.previousHidden)) feeds[G.previousHidden] = f32(previous, [count, dims.hidden])
      return run(`classifier of exit ${spec.exits[index]!.layer}`, session, feeds).pipe(
        Effect.map((out) => out[G.exitProb]!.data as Float32Array),
      )
    }

    const kvFill: ModelRunnerShape["kvFill"] = (index, hidden, positions, slots, fromLayers) => {
      const exit = spec.exits[index]!
      const session = kvFillSessions[index]
      if (!session) return Effect.void
      const n = slots.length
      // One position per batch row: the rotary embedding's sequence axis must stay within the context length, and
      // a fill can carry more positions than that (every pending one of many rows).
      return run(`kvfill after layer ${exit.layer}`, session, {
        [G.hidden]: f32(hidden, [n, 1, dims.hidden]),
        [G.positions]: i64(positions, [n, 1]),
      }).pipe(
        Effect.map((out) => {
          // A row that exited later than a layer keeps the K/V its segments computed there.
          writeRows(out[G.kvNew]!.data as Float32Array, exit.layer, dims.layers - exit.layer, (r, l) =>
            fromLayers && fromLayers[r]! > l ? -1 : slots[r]!,
          )
        }),
      )
    }

    /** A slot's row of every KV head, [kvHeads, headDim]. */
    const rowOf = (pool: Float32Array, slot: number) => {
      const row = new Float32Array(rowFloats)
      for (let h = 0; h < dims.kvHeads; h++) {
        row.set(pool.subarray(h * headFloats + slot * hd, h * headFloats + (slot + 1) * hd), h * hd)
      }
      return row
    }
    const readKv: ModelRunnerShape["readKv"] = (layer, slot) => ({
      k: rowOf(kPools[layer]!, slot),
      v: rowOf(vPools[layer]!, slot),
    })

    const blockFloats = blockSize * hd
    const copyBlock: ModelRunnerShape["copyBlock"] = (from, to) => {
      for (const pool of [...kPools, ...vPools]) {
        for (let h = 0; h < dims.kvHeads; h++) {
          const plane = h * headFloats
          pool.copyWithin(plane + to * blockFloats, plane + from * blockFloats, plane + (from + 1) * blockFloats)
        }
      }
    }

    // The graphs must agree with model.json's vocabulary: the sampler reads `vocab` logits per row, and every id below
    // it needs an embedding.
    const inconsistent = (file: string, problem: string) =>
      new ModelLoadError({
        path: join(modelDir, file),
        message: `${problem}, but model.json says the vocabulary has ${dims.vocab} tokens; the model directory is inconsistent (convert the model again)`,
      })
    yield* embed(BigInt64Array.of(BigInt(dims.vocab - 1)), 1, 1).pipe(
      Effect.mapError(() =>
        inconsistent(spec.files.embed, `${spec.files.embed} has no embedding for token ${dims.vocab - 1}`),
      ),
    )
    for (const [file, session] of headByFile) {
      const out = yield* run(
        `head ${file}`,
        session,
        { [G.hidden]: f32(new Float32Array(dims.hidden), [1, dims.hidden]) },
        [G.logits],
      ).pipe(Effect.mapError((e) => inconsistent(file, `${file} fails on one row (${e.message.split("\n")[0]})`)))
      const width = out[G.logits]!.data.length
      if (width !== dims.vocab) return yield* inconsistent(file, `${file} gives ${width} logits per token`)
    }

    return {
      spec,
      blockSize,
      numBlocks,
      bytesPerBlock: blockBytes,
      weights,
      embed,
      segment,
      head,
      classify,
      exitPredictor: (index) => predictors[index],
      kvFill,
      copyBlock,
      readKv,
    }
  })

export const OnnxModelRunner = {
  layer: (modelDir: string, options: RunnerOptions = {}): Layer.Layer<ModelRunner, ModelLoadError> =>
    Layer.scoped(ModelRunner, makeOnnxModelRunner(modelDir, options)),
}
