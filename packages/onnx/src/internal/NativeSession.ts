/**
 * A synchronous onnxruntime session: onnxruntime-node's native session object, called directly.
 *
 * Why: the public `InferenceSession.run` (onnxruntime-common) checks its arguments, then the node backend's handler
 * defers the native call — which is synchronous C++ and blocks the thread either way — to a `setImmediate` inside a
 * promise, and rewraps every output. That is one event-loop turn and one fiber suspension per call, several calls per
 * generated token. The public package exports no synchronous run, so this module reaches into
 * `onnxruntime-node/dist/binding.js`, the only place that does; nothing else in Offramp touches it.
 *
 * Checked against onnxruntime-node 1.30.0 (pinned in packages/onnx/package.json), dist/backend.js
 * (`OnnxruntimeSessionHandler`) and dist/binding.js:
 * - `initOrt()` initialises the native environment once (log level from `ort.env`, the Tensor constructor outputs
 *   are built with); the handler calls it before creating a session, so do we.
 * - `new binding.InferenceSession()` then `loadModel(path, sessionOptions)` loads a model synchronously (it throws on
 *   a corrupt file); `inputMetadata` / `outputMetadata` list the graph's inputs and outputs by `name`.
 * - `run(feeds, fetches, runOptions)`: feeds map input names to tensors (read only during the call: onnxruntime wraps
 *   their typed arrays without copying), fetches map the wanted output names to null; it returns an object mapping
 *   each fetched name to a tensor whose `data` is a fresh typed array (onnxruntime copies every output).
 * - `dispose()` frees the native session; it throws if called twice.
 * An upgrade must re-check these; `run` below checks that each fetched output came back as a tensor (type, dims, typed
 * array data), so that a changed binding fails there with a message naming this module, not later in the runner.
 */
import * as ort from "onnxruntime-node"
import { binding, initOrt } from "onnxruntime-node/dist/binding.js"

const CHECKED_VERSION = "1.30.0"

export type Tensor = ort.Tensor

export interface NativeSession {
  readonly inputNames: ReadonlyArray<string>
  readonly outputNames: ReadonlyArray<string>
  /**
   * Runs the graph synchronously on `feeds` and returns the outputs named in `fetches` (all outputs when omitted).
   * Throws an Error with onnxruntime's message when the run fails.
   */
  readonly run: (feeds: Readonly<Record<string, Tensor>>, fetches?: ReadonlyArray<string>) => Record<string, Tensor>
  readonly dispose: () => void
}

const isTensorLike = (value: unknown): value is Tensor => {
  if (value instanceof ort.Tensor) return true
  if (typeof value !== "object" || value === null) return false
  const v = value as { type?: unknown; dims?: unknown; data?: unknown }
  return typeof v.type === "string" && Array.isArray(v.dims) && ArrayBuffer.isView(v.data)
}

/** Loads a model file synchronously; throws onnxruntime's error (e.g. a protobuf parsing failure) as is. */
export const loadNativeSession = (path: string, options: ort.InferenceSession.SessionOptions): NativeSession => {
  initOrt()
  const session = new binding.InferenceSession()
  session.loadModel(path, options)
  const inputNames = session.inputMetadata.map((m) => m.name)
  const outputNames = session.outputMetadata.map((m) => m.name)
  const allOutputs = Object.fromEntries(outputNames.map((name) => [name, null]))
  const fetchesOf = new Map<ReadonlyArray<string>, Record<string, null>>()
  const emptyRunOptions = {}
  let disposed = false

  const run: NativeSession["run"] = (feeds, fetches) => {
    let wanted = allOutputs
    if (fetches) {
      // The caller's fetch lists are constants; build each one's object once.
      let cached = fetchesOf.get(fetches)
      if (!cached) {
        const unknown = fetches.filter((name) => !outputNames.includes(name))
        if (unknown.length > 0) {
          throw new Error(`the graph has no output ${unknown.join(", ")} (its outputs: ${outputNames.join(", ")})`)
        }
        cached = Object.fromEntries(fetches.map((name) => [name, null]))
        fetchesOf.set(fetches, cached)
      }
      wanted = cached
    }
    let out: Record<string, unknown>
    try {
      out = session.run(feeds, wanted, emptyRunOptions) as Record<string, unknown>
    } catch (e) {
      // onnxruntime runs a graph with a missing input until a kernel needs it; name the missing ones up front.
      const missing = inputNames.filter((name) => feeds[name] === undefined)
      if (missing.length > 0)
        throw new Error(`input ${missing.join(", ")} missing from the feeds (${(e as Error).message})`)
      throw e
    }
    for (const name in wanted) {
      if (!isTensorLike(out[name])) {
        throw new Error(
          `onnxruntime-node returned no tensor for output ${name}; the direct native call in NativeSession.ts was checked against onnxruntime-node ${CHECKED_VERSION} and needs re-checking for this version`,
        )
      }
    }
    return out as Record<string, Tensor>
  }

  const dispose = () => {
    if (disposed) return
    disposed = true
    session.dispose()
  }

  return { inputNames, outputNames, run, dispose }
}
