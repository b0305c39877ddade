// The three engines behind one interface, all greedy, 1 intra-op thread:
//   generate(ids, maxTokens)          → the continuation's token ids (stops after a stop token, which is included)
//   streams(prompts, maxTokens)       → { perStream: ids[][], startMs, firstTokenMs[], endMs } for prompts run at once
// Prompts are token ids, so every engine sees exactly the same input.
import { join, resolve } from "node:path"
import { pathToFileURL } from "node:url"

const now = () => performance.now()

// What each engine loads before a model: the modules (and for llama.cpp its native binding). memory.mjs's baseline
// process loads exactly these and nothing else.

/** Offramp's packages (built to dist) from the checkout `root`. */
export const offrampLibrary = async (root = process.env.OFFRAMP_ROOT ?? "../..") => {
  const r = resolve(root)
  const url = (p) => pathToFileURL(join(r, p)).href
  // The one `effect` instance the packages use (their dist files import "effect" from the root's node_modules).
  const { Effect, ManagedRuntime, Stream } = await import(url("node_modules/effect/dist/esm/index.js"))
  const { Engine } = await import(url("packages/core/dist/Engine.js"))
  const Offramp = await import(url("packages/onnx/dist/Offramp.js"))
  return { Effect, ManagedRuntime, Stream, Engine, Offramp }
}

/** node-llama-cpp with its prebuilt CPU binary loaded (getLlama), no model. */
export const llamacppLibrary = async (threads = 1) => {
  const { getLlama } = await import("node-llama-cpp")
  return getLlama({ build: "never", gpu: false, maxThreads: threads, logLevel: "error" })
}

/** transformers.js (it loads onnxruntime-node as it is imported). */
export const transformersjsLibrary = () => import("@huggingface/transformers")

/** Offramp through its library (packages built to dist), at full depth (threshold 2: no early exit). */
export const offramp = async ({ model, root = process.env.OFFRAMP_ROOT ?? "../..", kvCacheMb = 256, threads = 1 }) => {
  const { Effect, ManagedRuntime, Stream, Engine, Offramp } = await offrampLibrary(root)
  const runtime = ManagedRuntime.make(
    Offramp.layer({ model, runner: { threads, kvCacheBytes: kvCacheMb * 1024 * 1024 } }),
  )
  await runtime.runPromise(Effect.void)
  const one = (ids, maxTokens, onToken) =>
    runtime.runPromise(
      Effect.flatMap(Engine, (engine) =>
        engine
          .generate({
            prompt: ids,
            maxTokens,
            sampling: { temperature: 0 },
            earlyExit: { threshold: 2 },
          })
          .pipe(
            Stream.runFold([], (acc, event) => {
              onToken?.(event)
              acc.push(event.id)
              return acc
            }),
          ),
      ),
    )
  return {
    name: "offramp",
    generate: (ids, maxTokens) => one(ids, maxTokens),
    streams: async (prompts, maxTokens) => {
      const startMs = now()
      const firstTokenMs = prompts.map(() => Number.NaN)
      const perStream = await Promise.all(
        prompts.map((ids, i) =>
          one(ids, maxTokens, (e) => {
            if (e.index === 0) firstTokenMs[i] = now()
          }),
        ),
      )
      return { perStream, startMs, firstTokenMs, endMs: now() }
    },
    /** The engine's EngineStats (weights: bytes stored in the graph files and resident after load). */
    stats: () => runtime.runPromise(Effect.flatMap(Engine, (engine) => engine.stats)),
    close: () => runtime.dispose(),
  }
}

/** llama.cpp through node-llama-cpp's prebuilt CPU binary: one context, a sequence per stream (batched by it). */
export const llamacpp = async ({ model, contextSize, threads = 1, useMmap }) => {
  const llama = await llamacppLibrary(threads)
  // useMmap: node-llama-cpp's default (undefined) maps the GGUF; false reads it into allocated memory.
  const m = await llama.loadModel({ modelPath: model, gpuLayers: 0, useMmap })
  const ctxSize = contextSize ?? m.trainContextSize
  const contexts = new Map()
  const contextFor = async (n) => {
    let c = contexts.get(n)
    if (!c) {
      c = await m.createContext({
        sequences: n,
        contextSize: ctxSize, // per sequence (node-llama-cpp multiplies by the sequences)
        batchSize: Math.min(512, ctxSize * n),
        threads: { ideal: threads, min: threads },
        // One sequence: dispatch each token's decode on the next tick instead of the next event-loop cycle
        // (node-llama-cpp's default), 10-25% faster on the default model (BENCHMARKS.md). Several sequences keep the
        // default, which lets their tokens gather into one batch.
        ...(n === 1 ? { batching: { dispatchSchedule: "nextTick" } } : {}),
      })
      contexts.set(n, c)
    }
    return c
  }
  const run = async (sequence, ids, maxTokens, onFirst) => {
    const out = []
    for await (const token of sequence.evaluate(ids, { temperature: 0, yieldEogToken: true })) {
      if (out.length === 0) onFirst?.()
      out.push(token)
      if (out.length >= maxTokens || m.isEogToken(token)) break
    }
    return out
  }
  const withSequences = async (n, f) => {
    const context = await contextFor(n)
    const sequences = Array.from({ length: n }, () => context.getSequence())
    try {
      return await f(sequences)
    } finally {
      for (const s of sequences) s.dispose()
    }
  }
  return {
    name: "llama.cpp",
    /** Creates the context for `n` sequences now (otherwise the first generation does). */
    prepare: async (n = 1) => {
      await contextFor(n)
    },
    tokenize: (text) => m.tokenize(text),
    generate: (ids, maxTokens) => withSequences(1, ([s]) => run(s, ids, maxTokens)),
    streams: (prompts, maxTokens) =>
      withSequences(prompts.length, async (sequences) => {
        const startMs = now()
        const firstTokenMs = prompts.map(() => Number.NaN)
        const perStream = await Promise.all(
          prompts.map((ids, i) =>
            run(sequences[i], ids, maxTokens, () => {
              firstTokenMs[i] = now()
            }),
          ),
        )
        return { perStream, startMs, firstTokenMs, endMs: now() }
      }),
    close: async () => {
      for (const c of contexts.values()) await c.dispose()
      await m.dispose()
      await llama.dispose()
    },
  }
}

/** transformers.js (onnxruntime-node underneath) on the exported model folder; streams are one batched generate(). */
export const transformersjs = async ({ model, threads = 1 }) => {
  const { AutoModelForCausalLM, AutoTokenizer, Tensor, env } = await transformersjsLibrary()
  env.allowRemoteModels = false
  env.allowLocalModels = true
  const dir = resolve(model)
  const m = await AutoModelForCausalLM.from_pretrained(dir, {
    dtype: "fp32",
    device: "cpu",
    local_files_only: true,
    session_options: { intraOpNumThreads: threads, interOpNumThreads: 1 },
  })
  const tokenizer = await AutoTokenizer.from_pretrained(dir, { local_files_only: true })
  const eos = m.generation_config?.eos_token_id ?? m.config.eos_token_id
  const batch = async (prompts, maxTokens, onStep) => {
    const len = prompts[0].length
    if (prompts.some((p) => p.length !== len)) throw new Error("transformers.js streams need prompts of one length")
    const input_ids = new Tensor("int64", BigInt64Array.from(prompts.flat(), BigInt), [prompts.length, len])
    const attention_mask = new Tensor("int64", new BigInt64Array(prompts.length * len).fill(1n), [prompts.length, len])
    const out = await m.generate({
      input_ids,
      attention_mask,
      max_new_tokens: maxTokens,
      do_sample: false,
      streamer: onStep ? { put: onStep, end: () => {} } : undefined,
    })
    const rows = out.tolist().map((row) => row.slice(len).map(Number))
    // A finished row is padded after its stop token: keep up to and including the first one.
    return rows.map((row) => {
      const stop = row.indexOf(eos)
      return stop < 0 ? row : row.slice(0, stop + 1)
    })
  }
  return {
    name: "transformers.js",
    tokenize: (text) => tokenizer.encode(text),
    generate: async (ids, maxTokens) => (await batch([ids], maxTokens))[0],
    streams: async (prompts, maxTokens) => {
      const startMs = now()
      let puts = 0
      let first = Number.NaN
      const perStream = await batch(prompts, maxTokens, () => {
        if (++puts === 2) first = now() // the first put is the prompt, the second the first generated tokens
      })
      return { perStream, startMs, firstTokenMs: prompts.map(() => first), endMs: now() }
    },
    close: async () => {
      await m.dispose?.()
    },
  }
}
