/**
 * The Engine service: `generate(request)` returns a Stream of token events; requests from any number of fibers
 * are batched together at every step by a background loop that the Engine layer owns.
 *
 * Each step runs prefill chunks at full depth and decode rows through the segments one at a time; after a segment
 * that ends at an exit, the exit head scores the rows and confident rows take their token there (per-sequence, or
 * all together under the `all` policy) while the rest go on in a compacted batch. The K/V of layers a token
 * skipped are filled from its exit hidden state, or recomputed by pushing the token through them with the
 * sequence's next token (see DecodeRow).
 *
 * The loop is the only fiber that touches the scheduler and the KV cache. A stream that is interrupted marks its
 * sequences cancelled; the next step drops them and frees their blocks. When the layer's scope closes, the loop
 * stops and every stream still open ends with EngineStoppedError.
 */
import { Context, Effect, Exit, Layer, Mailbox, Queue, Schema, Stream } from "effect"
import { ConfidenceEvaluator } from "./ConfidenceEvaluator.js"
import { type EarlyExitParams, FULL_DEPTH } from "./EarlyExit.js"
import { EngineStoppedError, type GenerationError, InvalidRequestError } from "./Errors.js"
import type { GenerationRequest, TokenEvent } from "./Generation.js"
import { makeAdmission } from "./internal/Admission.js"
import { makeEmission } from "./internal/Emission.js"
import { makeForwardPass } from "./internal/ForwardPass.js"
import { commitExact, makeFill, makeRecompute } from "./internal/KvStrategy.js"
import type { RequestState, Sequence } from "./internal/Sequence.js"
import { makeSpeculativePass } from "./internal/SpeculativePass.js"
import { makeStatistics } from "./internal/Statistics.js"
import { KvCache, type KvCacheStats } from "./KvCache.js"
import { ModelRunner, type ModelWeightBytes } from "./ModelRunner.js"
import type { ModelSpec } from "./ModelSpec.js"
import { Sampler } from "./Sampler.js"
import { Scheduler } from "./Scheduler.js"
import { Tokenizer } from "./Tokenizer.js"

export interface EngineOptions {
  /** Early-exit settings of requests that do not set their own (default: full depth). */
  readonly earlyExit?: EarlyExitParams
}

export interface EngineStats {
  readonly steps: number
  readonly prefillTokens: number
  readonly decodeTokens: number
  readonly running: number
  readonly waiting: number
  readonly preemptions: number
  /** Generated tokens by the layer count of the exit that produced them. */
  readonly exitHistogram: Readonly<Record<number, number>>
  /** Mean layers run per generated token. */
  readonly meanExitDepth: number
  /** Layers skipped by early exits, summed over generated tokens. */
  readonly layersSkipped: number
  /** Time deciding at intermediate exits (heads and classifiers, the `exits` summed), and in KV fill. */
  readonly headMs: number
  readonly kvFillMs: number
  /**
   * Time in the segment calls of decode rows, and the layers those calls ran summed over their rows: their ratio is
   * what one layer costs a decode row, the unit a decision's cost is compared with.
   */
  readonly decodeSegmentMs: number
  readonly decodeLayerRows: number
  /** What deciding cost at each early exit. */
  readonly exits: ReadonlyArray<ExitDecisionStats>
  /** Self-speculative decoding: tokens drafted, drafts the full model accepted, tokens kept, verifications. */
  readonly speculative: {
    readonly drafted: number
    readonly accepted: number
    readonly kept: number
    readonly verifications: number
  }
  readonly kv: KvCacheStats
  /** The model's weights in their files and in memory (see ModelRunnerShape.weights). */
  readonly weights: ModelWeightBytes
}

/** Decisions at one early exit, since the engine started. */
export interface ExitDecisionStats {
  readonly layer: number
  /** Decode rows scored at this exit (their request could exit here). */
  readonly scored: number
  /** Rows the exit head ran for: all scored rows under a head measure, only the candidates under a head-free one. */
  readonly headRows: number
  /** Rows that took their token here. */
  readonly exited: number
  /** Time in the exit head's calls, and in head-free decisions (classifier, saturation), in ms. */
  readonly headMs: number
  readonly decisionMs: number
}

/**
 * Where `submit` delivers a generation's output. The engine calls it from its loop, so it must return at once. After
 * the generation is cancelled it hears nothing more.
 */
export interface GenerationSink {
  readonly onEvent: (event: TokenEvent) => void
  /** Called once, when every sample has finished (success) or the generation failed. */
  readonly onEnd: (exit: Exit.Exit<void, GenerationError>) => void
}

/**
 * Whether the engine takes requests: `ready`; `restarting` while a supervised engine (the worker engine) replaces a
 * worker that died or hung; `stopped` once it shut down.
 */
export const EngineState = Schema.Literal("ready", "restarting", "stopped")
export type EngineState = typeof EngineState.Type

export interface EngineStatus {
  readonly state: EngineState
  /** Times the engine was restarted after a failure. */
  readonly restarts: number
}

export interface EngineShape {
  readonly spec: ModelSpec
  readonly defaults: EarlyExitParams
  readonly generate: (request: GenerationRequest) => Stream.Stream<TokenEvent, GenerationError>
  /**
   * `generate` as callbacks, for a host that multiplexes many generations itself (the engine worker sends every
   * step's tokens of all of them in one message): no fiber or stream per generation. Fails as `generate` does on a
   * request it refuses; succeeds with the effect that cancels the generation (idempotent).
   */
  readonly submit: (
    request: GenerationRequest,
    sink: GenerationSink,
  ) => Effect.Effect<Effect.Effect<void>, GenerationError>
  readonly stats: Effect.Effect<EngineStats>
  readonly status: Effect.Effect<EngineStatus>
}

/** `generate` over a `submit`: the stream reads a mailbox that the sink fills; closing the stream cancels. */
export const streamOfSubmit =
  (submit: EngineShape["submit"]) =>
  (request: GenerationRequest): Stream.Stream<TokenEvent, GenerationError> =>
    Stream.unwrapScoped(
      Effect.gen(function* () {
        const mailbox = yield* Mailbox.make<TokenEvent, GenerationError>()
        const cancel = yield* submit(request, {
          onEvent: (event) => mailbox.unsafeOffer(event),
          onEnd: (exit) => mailbox.unsafeDone(exit),
        })
        // Still open when the stream's scope closes: the consumer stopped reading (interrupted, or had enough).
        yield* Effect.addFinalizer(() => cancel)
        return Mailbox.toStream(mailbox)
      }),
    )

export class Engine extends Context.Tag("@offramp/core/Engine")<Engine, EngineShape>() {
  static readonly layer = (
    options: EngineOptions = {},
  ): Layer.Layer<Engine, never, ModelRunner | Tokenizer | Sampler | KvCache | Scheduler | ConfidenceEvaluator> =>
    Layer.scoped(Engine, makeEngine(options))
}

/**
 * The engine over the services it needs (ModelRunner, Tokenizer, Sampler, KvCache, Scheduler, ConfidenceEvaluator).
 * A host app provides `Offramp.layer` from @offramp/onnx instead, which brings them all.
 */
export const layer = Engine.layer

/** Generates with the Engine in context: the tokens of every sample, as they come (see EngineShape.generate). */
export const generate = (request: GenerationRequest): Stream.Stream<TokenEvent, GenerationError, Engine> =>
  Stream.unwrap(Effect.map(Engine, (engine) => engine.generate(request)))

/** The engine's counters (see EngineStats). */
export const stats: Effect.Effect<EngineStats, never, Engine> = Effect.flatMap(Engine, (engine) => engine.stats)

/** The longest the engine loop runs steps back to back before Node's event loop turns. */
const EVENT_LOOP_TURN_MS = 4

/** Lets Node's event loop run its pending timers and I/O once. */
const eventLoopTurn = Effect.async<void>((resume) => {
  const handle = setImmediate(() => resume(Effect.void))
  return Effect.sync(() => clearImmediate(handle))
})

/**
 * The wiring of the engine's parts (internal/): admission, the forward pass with its exit policy and KV strategies,
 * emission and statistics; and the loop that runs one step after another while there is work.
 */
const makeEngine = (options: EngineOptions) =>
  Effect.gen(function* () {
    const runner = yield* ModelRunner
    const tokenizer = yield* Tokenizer
    const sampler = yield* Sampler
    const kv = yield* KvCache
    const scheduler = (yield* Scheduler).make<Sequence>()
    const evaluator = yield* ConfidenceEvaluator
    const { spec } = runner
    const defaults = options.earlyExit ?? FULL_DEPTH
    const wake = yield* Queue.sliding<void>(1)
    /** The live sequences by id: admission adds them, emission removes those that end, cancellation the rest. */
    const sequences = new Map<number, Sequence>()
    let stopped = false
    const statistics = makeStatistics(spec)
    const emission = makeEmission({ spec, sampler, scheduler, statistics, sequences })
    const admission = makeAdmission({ spec, tokenizer, kv, sampler, scheduler, defaults, sequences })
    const forwardPass = makeForwardPass({
      runner,
      kv,
      evaluator,
      strategies: { fill: makeFill({ runner, kv, statistics }), recompute: makeRecompute({ runner, kv }) },
      speculativePass: makeSpeculativePass({ runner, kv, scheduler, statistics }),
      scheduler,
      statistics,
      emission,
    })

    const step = Effect.gen(function* () {
      const plan = scheduler.schedule()
      statistics.counters.steps++
      // A preempted sequence is recomputed from scratch: what it had pending went with its blocks.
      for (const seq of plan.preempted) {
        seq.exitStates.clear()
        seq.exact = 0
      }
      if (plan.starved.length > 0) {
        emission.fail(
          plan.starved,
          new InvalidRequestError({
            message: `the KV cache (${kv.numBlocks} blocks of ${kv.blockSize} tokens) cannot hold this sequence's next position; raise the KV cache budget`,
          }),
        )
      }
      const { finished, speculative } = yield* forwardPass.run(plan.rows)
      for (const f of finished) {
        if (!sequences.has(f.seq.id)) continue
        // Publish what is exact of the sequence before it samples (and perhaps ends).
        if (f.seq.blocks) commitExact(kv, f.seq)
        emission.emit(f)
      }
      for (const { seq, tokens } of speculative) {
        if (!sequences.has(seq.id)) continue
        for (const t of tokens)
          if (!emission.deliver(seq, t.id, false, spec.dims.layers, t.confidence, t.logprob)) break
      }
    })

    const loop = Effect.gen(function* () {
      let lastTurn = performance.now()
      while (true) {
        if (scheduler.running() + scheduler.waiting() === 0) yield* Queue.take(wake)
        yield* step
        // Let request fibers run between steps (their submissions and cancellations).
        yield* Effect.yieldNow()
        // A runner's calls may be synchronous (onnxruntime's are), and yieldNow yields only to other fibers, so the
        // event loop gets a turn every few milliseconds: timers, I/O and worker messages (a disconnect, a shutdown)
        // would otherwise wait for the whole generation. A turn costs ~50 µs, so not every step takes one.
        if (performance.now() - lastTurn >= EVENT_LOOP_TURN_MS) {
          yield* eventLoopTurn
          lastTurn = performance.now()
        }
      }
    })

    /** Stops the engine: every request still in it ends with `message`, and new ones are refused. */
    const stop = (message: string) =>
      Effect.sync(() => {
        stopped = true
        const error = new EngineStoppedError({ message })
        for (const seq of scheduler.drain()) {
          sequences.delete(seq.id)
          emission.close(seq.request, Exit.fail(error))
        }
      })
    yield* Effect.addFinalizer(() => stop("the engine shut down while the request was in flight"))
    // A defect in a step (a bug) ends the loop: its requests fail rather than wait forever, and it is logged.
    yield* Effect.forkScoped(
      loop.pipe(
        Effect.catchAllCause((cause) =>
          Effect.logError("the engine loop failed", cause).pipe(
            Effect.zipRight(stop("the engine failed while the request was in flight (see the server log)")),
          ),
        ),
      ),
    )

    const submit = (request: GenerationRequest, sink: GenerationSink) =>
      Effect.gen(function* () {
        if (stopped) return yield* new EngineStoppedError({ message: "the engine has shut down" })
        const first = yield* admission.admit(request, sink)
        scheduler.submit(first)
        yield* Queue.offer(wake, undefined)
        return cancel(first.request)
      })

    // The next step's schedule drops the cancelled sequences and frees their blocks; from now on nothing is emitted.
    const cancel = (state: RequestState) =>
      Effect.suspend(() => {
        if (state.closed) return Effect.void
        state.closed = true
        for (const seq of sequences.values()) {
          if (seq.request !== state) continue
          seq.cancelled = true
          sequences.delete(seq.id)
        }
        state.forks.length = 0
        return Queue.offer(wake, undefined)
      })

    const stats = Effect.sync(
      (): EngineStats =>
        statistics.snapshot(
          { running: scheduler.running(), waiting: scheduler.waiting(), preemptions: scheduler.preemptions() },
          kv.stats(),
          runner.weights,
        ),
    )

    const status = Effect.sync((): EngineStatus => ({ state: stopped ? "stopped" : "ready", restarts: 0 }))

    return { spec, defaults, generate: streamOfSubmit(submit), submit, stats, status } satisfies EngineShape
  })
