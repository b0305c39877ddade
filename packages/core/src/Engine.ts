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
import { type EarlyExitParams, FULL_DEPTH, type ResolvedEarlyExit, resolveEarlyExit, thresholdAt } from "./EarlyExit.js"
import { describeParseError, EngineStoppedError, type GenerationError, InvalidRequestError } from "./Errors.js"
import { GenerationRequest, type TokenEvent } from "./Generation.js"
import { KvCache, type KvCacheStats } from "./KvCache.js"
import { type HeadOutput, ModelRunner } from "./ModelRunner.js"
import type { ModelSpec } from "./ModelSpec.js"
import { buildRowBatch } from "./RowBatch.js"
import { logProbabilityFromTop, type Rng, Sampler, type SamplingParams } from "./Sampler.js"
import { type BatchRow, type ScheduledSequence, Scheduler } from "./Scheduler.js"
import { type DetokenizerStream, Tokenizer } from "./Tokenizer.js"

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
  /** What deciding cost at each early exit. */
  readonly exits: ReadonlyArray<ExitDecisionStats>
  readonly kv: KvCacheStats
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

/** A token whose K/V are missing from layer `layer` on (recompute strategy); `hidden` is its state there. */
interface Pending {
  readonly position: number
  readonly hidden: Float32Array
  readonly layer: number
}

/** The longest the engine loop runs steps back to back before Node's event loop turns. */
const EVENT_LOOP_TURN_MS = 4

/** Lets Node's event loop run its pending timers and I/O once. */
const eventLoopTurn = Effect.async<void>((resume) => {
  const handle = setImmediate(() => resume(Effect.void))
  return Effect.sync(() => clearImmediate(handle))
})

/** A reusable buffer: each call returns a view of n floats over storage that grows as needed. */
const scratch = () => {
  let storage = new Float32Array(0)
  return (n: number) => {
    if (storage.length < n) storage = new Float32Array(Math.max(n, storage.length * 2))
    return storage.subarray(0, n)
  }
}

/** One sample of a request, as the engine loop sees it. */
interface Sequence extends ScheduledSequence {
  readonly request: RequestState
  readonly sample: number
  readonly rng: Rng
  readonly detokenizer: DetokenizerStream
  generated: number
  /** Tokens skipped past layers whose K/V wait for recomputation, oldest first (exit layers non-increasing). */
  pending: Array<Pending>
  /** Positions [0, exact) have K/V equal to a full-depth computation; only those enter the prefix cache. */
  exact: number
}

interface RequestState {
  readonly maxTokens: number
  readonly forcedTokens: ReadonlyArray<number> | undefined
  readonly sampling: SamplingParams
  /** Samples from the logits, or scores forced tokens with them; a greedy request takes the head's top token. */
  readonly usesLogits: boolean
  readonly exit: ResolvedEarlyExit
  readonly sink: GenerationSink
  /** Ended, failed or cancelled: the sink hears nothing more. */
  closed: boolean
  /** Samples 1..n-1, started by forking sample 0 once the prompt is computed. */
  readonly forks: Array<() => Sequence>
  live: number
}

/** A decode row on its way through the segments: its pending tokens that joined, then its current token. */
interface DecodeRow {
  readonly seq: Sequence
  /** Positions in this row, consecutive, the current token last. */
  positions: Array<number>
  /** [positions × hidden] states entering the next segment. */
  hidden: Float32Array
  /** The current token's state at the previous exit (saturation measure). */
  previous: Float32Array
}

/** A scored row at an exit: its confidence, its row in the exit head's call, and whether it takes its token there. */
interface Scored {
  readonly confidence: number
  readonly row: number
  readonly confident: boolean
}

/** `Scored.row` of a row whose token comes from the step's final head call (see decideExits). */
const DEFERRED = -1

/** A row that exited early and takes its token from the step's final head call. */
interface Deferred {
  readonly seq: Sequence
  readonly hidden: Float32Array
  readonly exitIndex: number
  readonly confidence: number
}

/** A row that exited early under the fill strategy: its skipped layers' K/V are filled at the step's end. */
interface Fill {
  readonly row: DecodeRow
  readonly exitIndex: number
}

/** A row that is done with the network this step: it samples from `logits` row `row`. */
interface Finished {
  readonly seq: Sequence
  readonly head: HeadOutput
  readonly row: number
  readonly exitLayer: number
  readonly confidence: number
}

const makeEngine = (options: EngineOptions) =>
  Effect.gen(function* () {
    const runner = yield* ModelRunner
    const tokenizer = yield* Tokenizer
    const sampler = yield* Sampler
    const kv = yield* KvCache
    const scheduler = yield* Scheduler
    const evaluator = yield* ConfidenceEvaluator
    const { spec } = runner
    const { dims } = spec
    const D = dims.hidden
    // Inputs of the runner's calls are assembled in these, reused from call to call (a call reads its input only
    // while it runs). Each step used to allocate them anew: with the runner's outputs, enough ArrayBuffer bytes for
    // V8 to run a full mark-compact about three times a second in the engine worker's small heap.
    const segmentInput = scratch()
    const headInput = scratch()
    const classifierInput = scratch()
    const previousInput = scratch()
    const headFree = evaluator.headFree ?? (() => false)
    const sharedHead = spec.exits.every((e) => e.head === spec.exits.at(-1)!.head)
    const finalExit = spec.exits.length - 1
    const exitAfterSegment = spec.segments.map((s) => spec.exits.findIndex((e) => e.layer === s.endLayer))
    const stopIds = new Set(spec.tokens.stop)
    const defaults = options.earlyExit ?? FULL_DEPTH
    const wake = yield* Queue.sliding<void>(1)
    const sequences = new Map<number, Sequence>()
    let nextId = 0
    let stopped = false
    const counters = { steps: 0, prefillTokens: 0, decodeTokens: 0, layersSkipped: 0, kvFillMs: 0 }
    const exitStats = spec.exits
      .slice(0, finalExit)
      .map((e) => ({ layer: e.layer, scored: 0, headRows: 0, exited: 0, headMs: 0, decisionMs: 0 }))
    const exitHistogram: Record<number, number> = {}

    const close = (request: RequestState, exit: Exit.Exit<void, GenerationError>) => {
      if (request.closed) return
      request.closed = true
      request.sink.onEnd(exit)
    }

    const end = (seq: Sequence, exit: Exit.Exit<void, GenerationError>) => {
      scheduler.finish(seq)
      sequences.delete(seq.id)
      seq.request.live--
      if (Exit.isFailure(exit) || seq.request.live === 0) close(seq.request, exit)
    }

    const fail = (seqs: Iterable<Sequence>, error: GenerationError) => {
      for (const seq of seqs) if (sequences.has(seq.id)) end(seq, Exit.fail(error))
    }

    const timed = <A, E>(counter: "kvFillMs", effect: Effect.Effect<A, E>) =>
      Effect.suspend(() => {
        const start = performance.now()
        return Effect.ensuring(
          effect,
          Effect.sync(() => {
            counters[counter] += performance.now() - start
          }),
        )
      })

    /** Samples (or takes the forced) next token of a finished row, emits it, and ends the sequence when done. */
    const emit = ({ seq, head, row, exitLayer, confidence }: Finished) => {
      const { request } = seq
      const offset = row * dims.vocab
      const forced = request.forcedTokens?.[seq.generated]
      const top = Number(head.topToken[row])
      const id =
        forced ??
        (request.usesLogits ? sampler.sample(head.logits!, offset, dims.vocab, request.sampling, seq.rng) : top)
      const stop = forced === undefined && stopIds.has(id)
      seq.generated++
      exitHistogram[exitLayer] = (exitHistogram[exitLayer] ?? 0) + 1
      counters.layersSkipped += dims.layers - exitLayer
      const full = seq.generated >= request.maxTokens || seq.tokens.length + 1 > dims.contextLength
      const finishReason = stop ? "stop" : full ? "length" : null
      let text = stop ? "" : seq.detokenizer.push(id)
      if (finishReason !== null) text += seq.detokenizer.flush()
      request.sink.onEvent({
        sample: seq.sample,
        index: seq.generated - 1,
        id,
        text,
        exitLayer,
        confidence,
        logprob: logProbabilityFromTop(head.logits, offset, id, top, head.maxProb[row]!),
        finishReason,
      })
      if (finishReason !== null) end(seq, Exit.void)
      else seq.tokens.push(id)
    }

    /** Publishes what is exact of a sequence in the prefix cache. */
    const commit = (seq: Sequence) => {
      seq.exact = Math.min(seq.computed, seq.pending[0]?.position ?? seq.computed, seq.exact)
      kv.commit(seq.blocks!, seq.tokens, seq.exact)
    }

    /** Prefill chunks at full depth, one call each; returns the rows that reached their last token. */
    const prefill = (rows: ReadonlyArray<BatchRow>) =>
      Effect.gen(function* () {
        const done: Array<{ seq: Sequence; hidden: Float32Array }> = []
        for (const { seq: s, count } of rows) {
          const seq = s as Sequence
          seq.pending = []
          if (seq.computed === 0) seq.exact = 0
          const batch = buildRowBatch([{ cached: seq.computed, count, blocks: seq.blocks!.blocks }], runner.blockSize)
          const ids = BigInt64Array.from(seq.tokens.slice(seq.computed, seq.computed + count), BigInt)
          const result = yield* Effect.either(
            Effect.gen(function* () {
              let hidden = yield* runner.embed(ids, 1, count)
              for (let s = 0; s < spec.segments.length; s++) hidden = yield* runner.segment(s, hidden, batch)
              return hidden
            }),
          )
          if (result._tag === "Left") {
            fail([seq], result.left)
            continue
          }
          counters.prefillTokens += count
          seq.computed += count
          seq.exact = seq.computed
          commit(seq)
          if (seq.computed === seq.tokens.length) {
            done.push({ seq, hidden: result.right.slice((count - 1) * D, count * D) })
          }
        }
        return done
      })

    /** Runs one segment for decode rows, each with its joined pending tokens and its current token. */
    const runSegment = (index: number, rows: ReadonlyArray<DecodeRow>) =>
      Effect.gen(function* () {
        const { firstLayer, endLayer } = spec.segments[index]!
        for (const row of rows) {
          // Pending tokens stopped at this segment's first layer join ahead of the row's tokens.
          const joiners = row.seq.pending.filter((p) => p.layer === firstLayer)
          if (joiners.length === 0) continue
          const hidden = new Float32Array((joiners.length + row.positions.length) * D)
          joiners.forEach((p, i) => hidden.set(p.hidden, i * D))
          hidden.set(row.hidden, joiners.length * D)
          row.positions = [...joiners.map((p) => p.position), ...row.positions]
          row.hidden = hidden
          row.seq.pending = row.seq.pending.filter((p) => p.layer !== firstLayer)
        }
        const batch = buildRowBatch(
          rows.map((r) => ({ cached: r.positions[0]!, count: r.positions.length, blocks: r.seq.blocks!.blocks })),
          runner.blockSize,
        )
        const input = segmentInput(batch.rows * batch.tokens * D)
        rows.forEach((r, i) => {
          input.set(r.hidden, i * batch.tokens * D)
          // Padding after a shorter row's tokens: the call ignores it, but stale values need not go in.
          input.fill(0, i * batch.tokens * D + r.hidden.length, (i + 1) * batch.tokens * D)
        })
        const output = yield* runner.segment(index, input, batch)
        rows.forEach((r, i) => {
          // A view: the output is the runner's own buffer, never written again.
          r.hidden = output.subarray(i * batch.tokens * D, (i * batch.tokens + r.positions.length) * D)
          const upTo = r.positions.at(-1)! + 1
          for (let l = firstLayer; l < endLayer; l++) kv.markFilled(r.seq.blocks!, l, upTo)
        })
      })

    const current = (row: DecodeRow) => row.hidden.subarray((row.positions.length - 1) * D)

    /**
     * Decides which rows take their token at early exit `exitIndex`. Rows whose measure needs no head (classifier,
     * saturation) are decided first, from hidden states; then the head runs once, for the rows that may still exit
     * here: those whose measure reads the head, and those that passed a head-free measure (they need the head for
     * their token, and it confirms them where the request sets `confirm`). A row that a head-free measure sends on
     * pays no head. Returns the exiting rows' indices, the head, and each scored row's confidence and head row.
     */
    const decideExits = (exitIndex: number, rows: ReadonlyArray<DecodeRow>) =>
      Effect.gen(function* () {
        const stats = exitStats[exitIndex]!
        // A row whose request has samples still to fork goes the whole depth: the forks start at the final head from
        // its exact K/V (a prompt whose last token is its only uncached one comes here as a decode row).
        const thresholds = rows.map((r) =>
          r.seq.request.forks.length > 0
            ? Number.POSITIVE_INFINITY
            : thresholdAt(r.seq.request.exit, exitIndex, r.seq.generated, r.seq.request.maxTokens),
        )
        const params = (r: number) => rows[r]!.seq.request.exit.params
        const scored = rows.flatMap((_, i) => (thresholds[i]! <= 1 ? [i] : []))
        const none = { exiting: [] as Array<number>, head: undefined, confidences: new Map<number, Scored>() }
        if (scored.length === 0) return none
        stats.scored += scored.length
        const free = scored.filter((r) => headFree(params(r).measure))

        // Head-free measures first: one classifier call for the rows that use it, then the evaluator per row.
        const cheap = new Map<number, number>()
        if (free.length > 0) {
          const started = performance.now()
          const classified = free.filter((r) => params(r).measure === "classifier")
          let classifier: Float32Array | undefined
          if (classified.length > 0) {
            const hidden = classifierInput(classified.length * D)
            const previous = previousInput(classified.length * D)
            classified.forEach((r, i) => {
              hidden.set(current(rows[r]!), i * D)
              previous.set(rows[r]!.previous, i * D)
            })
            classifier = yield* runner.classify(exitIndex, hidden, previous, classified.length)
          }
          // `classified` keeps `free`'s order, so the classifier's rows come in turn.
          let next = 0
          for (const r of free) {
            const c = evaluator.confidence({
              measure: params(r).measure,
              exitIndex,
              head: undefined,
              row: 0,
              hidden: current(rows[r]!),
              previousHidden: rows[r]!.previous,
              vocab: dims.vocab,
              ...(classifier && params(r).measure === "classifier" ? { classifier: classifier[next++]! } : {}),
            })
            cheap.set(r, c)
          }
          stats.decisionMs += performance.now() - started
        }
        const passes = (r: number) => (cheap.has(r) ? cheap.get(r)! >= thresholds[r]! : true)
        // The paper's policy: rows under `all` leave together, when every one of them is confident. One that a
        // head-free measure already holds back keeps them all, so none of them needs the head.
        const allRows = rows.flatMap((_, r) => (params(r).policy === "all" ? [r] : []))
        const allPossible = allRows.every((r) => thresholds[r]! <= 1 && passes(r))
        const candidates = scored.filter((r) => passes(r) && (params(r).policy !== "all" || allPossible))
        if (candidates.length === 0) return none
        // A row that a head-free measure lets go without confirmation needs the head only for its token; where every
        // exit shares one head, it takes it from the step's one final head call, with the rows that ran full depth.
        const deferred = (r: number) => sharedHead && cheap.has(r) && params(r).confirm === undefined
        const confidences = new Map<number, Scored>()
        for (const r of candidates) {
          if (deferred(r)) confidences.set(r, { confidence: cheap.get(r)!, row: DEFERRED, confident: true })
        }
        const headed = candidates.filter((r) => !deferred(r))
        let head: HeadOutput | undefined
        if (headed.length > 0) {
          const hidden = headInput(headed.length * D)
          headed.forEach((r, i) => hidden.set(current(rows[r]!), i * D))
          const started = performance.now()
          head = yield* runner.head(
            exitIndex,
            hidden,
            headed.length,
            evaluator.needsLogits === true || headed.some((r) => rows[r]!.seq.request.usesLogits),
          )
          stats.headMs += performance.now() - started
          stats.headRows += headed.length
        }
        headed.forEach((r, i) => {
          const row = rows[r]!
          const confidence =
            cheap.get(r) ??
            evaluator.confidence({
              measure: params(r).measure,
              exitIndex,
              head: head!,
              row: i,
              hidden: current(row),
              previousHidden: row.previous,
              vocab: dims.vocab,
            })
          const { confirm } = params(r)
          const confident = cheap.has(r)
            ? confirm === undefined || head!.maxProb[i]! >= confirm
            : confidence >= thresholds[r]!
          confidences.set(r, { confidence, row: i, confident })
        })
        const confident = (r: number) => confidences.get(r)?.confident === true
        const allExit = allRows.length > 0 && allRows.every(confident)
        const exiting = rows.flatMap((_, r) => ((params(r).policy === "all" ? allExit : confident(r)) ? [r] : []))
        stats.exited += exiting.length
        return { exiting, head, confidences }
      })

    /** K/V of the skipped layers of rows that exited at `exitIndex`: left pending (recompute), or queued for fill. */
    const skipLayers = (exitIndex: number, rows: ReadonlyArray<DecodeRow>, fills: Array<Fill>) => {
      const exitLayer = spec.exits[exitIndex]!.layer
      for (const row of rows) {
        if (row.seq.request.exit.params.kv === "fill") {
          fills.push({ row, exitIndex })
          continue
        }
        const stopped = row.positions.map((position, i) => ({
          position,
          hidden: row.hidden.slice(i * D, (i + 1) * D),
          layer: exitLayer,
        }))
        row.seq.pending = [...row.seq.pending, ...stopped].sort((a, b) => a.position - b.position)
      }
    }

    /**
     * Fills the K/V of the layers the step's exited rows skipped, in one call for all of them: the earliest exit's
     * kvfill graph computes every layer from its exit on, and each row writes only the layers after its own exit.
     * (No row of this step reads another's skipped K/V, so the fill can wait for the step's end.)
     */
    const fillSkipped = (fills: ReadonlyArray<Fill>) =>
      Effect.gen(function* () {
        if (fills.length === 0) return
        const first = Math.min(...fills.map((f) => f.exitIndex))
        const count = fills.reduce((n, f) => n + f.row.positions.length, 0)
        const hidden = new Float32Array(count * D)
        const positions = new BigInt64Array(count)
        const slots = new Int32Array(count)
        const fromLayers = new Int32Array(count)
        let i = 0
        for (const { row, exitIndex } of fills) {
          hidden.set(row.hidden, i * D)
          for (const position of row.positions) {
            positions[i] = BigInt(position)
            fromLayers[i] = spec.exits[exitIndex]!.layer
            slots[i++] = kv.slot(row.seq.blocks!, position)
          }
        }
        yield* timed("kvFillMs", runner.kvFill(first, hidden, positions, slots, fromLayers))
        for (const { row, exitIndex } of fills) {
          const upTo = row.positions.at(-1)! + 1
          for (let l = spec.exits[exitIndex]!.layer; l < dims.layers; l++) kv.markFilled(row.seq.blocks!, l, upTo)
          // Filled K/V approximate the full-depth ones: nothing from here on enters the prefix cache.
          row.seq.exact = Math.min(row.seq.exact, row.positions[0]!)
        }
      })

    /** Decode rows through the segments with early exits; returns the rows that finished, with their heads. */
    const decode = (rows: ReadonlyArray<BatchRow>) =>
      Effect.gen(function* () {
        const finished: Array<Finished> = []
        const deferred: Array<Deferred> = []
        const fills: Array<Fill> = []
        if (rows.length === 0) return { finished, deferred, atEnd: [] as Array<DecodeRow> }
        const ids = BigInt64Array.from(rows, (r) => BigInt(r.seq.tokens[r.seq.computed]!))
        const embedded = yield* runner.embed(ids, rows.length, 1)
        let active: Array<DecodeRow> = rows.map(({ seq }, i) => ({
          seq: seq as Sequence,
          positions: [seq.computed],
          hidden: embedded.subarray(i * D, (i + 1) * D),
          previous: embedded.subarray(i * D, (i + 1) * D),
        }))
        for (const row of active) {
          row.seq.computed += 1
          counters.decodeTokens++
        }
        for (let s = 0; s < spec.segments.length && active.length > 0; s++) {
          yield* runSegment(s, active)
          const exitIndex = exitAfterSegment[s]!
          if (exitIndex < 0 || exitIndex === finalExit) continue
          const { exiting, head, confidences } = yield* decideExits(exitIndex, active)
          if (exiting.length > 0) {
            skipLayers(
              exitIndex,
              exiting.map((r) => active[r]!),
              fills,
            )
            const exitLayer = spec.exits[exitIndex]!.layer
            for (const r of exiting) {
              const { confidence, row } = confidences.get(r)!
              const seq = active[r]!.seq
              if (row === DEFERRED) deferred.push({ seq, hidden: current(active[r]!), exitIndex, confidence })
              else finished.push({ seq, head: head!, row, exitLayer, confidence })
            }
            const gone = new Set(exiting)
            active = active.filter((_, r) => !gone.has(r))
          }
          for (const row of active) row.previous = current(row)
        }
        yield* fillSkipped(fills)
        return { finished, deferred, atEnd: active }
      })

    const step = Effect.gen(function* () {
      const plan = scheduler.schedule()
      counters.steps++
      // A preempted sequence is recomputed from scratch: what it had pending went with its blocks.
      for (const seq of plan.preempted as ReadonlyArray<Sequence>) {
        seq.pending = []
        seq.exact = 0
      }
      if (plan.starved.length > 0) {
        fail(
          plan.starved as ReadonlyArray<Sequence>,
          new InvalidRequestError({
            message: `the KV cache (${kv.numBlocks} blocks of ${kv.blockSize} tokens) cannot hold this sequence's next position; raise the KV cache budget`,
          }),
        )
      }
      // A row with one new token whose earlier tokens are all computed is a decode row; anything else prefills.
      const isDecode = (r: BatchRow) => r.count === 1 && r.seq.computed > 0
      const decodeRows = plan.rows.filter(isDecode)
      const prefilled = yield* prefill(plan.rows.filter((r) => !isDecode(r)))
      const decoded = yield* Effect.either(decode(decodeRows))
      if (decoded._tag === "Left")
        fail(
          decodeRows.map((r) => r.seq as Sequence),
          decoded.left,
        )
      const { finished, deferred, atEnd } =
        decoded._tag === "Right" ? decoded.right : { finished: [], deferred: [], atEnd: [] }

      // Everything that ran the whole depth shares one call of the final head, with the rows that exited early
      // without needing a head to decide (their exits share this head).
      const deep = [
        ...prefilled,
        ...atEnd.map((row) => ({ seq: row.seq, hidden: current(row) })),
        ...deferred.map(({ seq, hidden }) => ({ seq, hidden })),
      ]
      const fullDepth = deep.length - deferred.length
      if (deep.length > 0) {
        const started = performance.now()
        const hidden = headInput(deep.length * D)
        deep.forEach((r, i) => hidden.set(r.hidden, i * D))
        const head = yield* Effect.either(
          runner.head(
            finalExit,
            hidden,
            deep.length,
            deep.some((r) => r.seq.request.usesLogits),
          ),
        )
        // The early rows' share of the call is their exits' head time.
        const share = (performance.now() - started) / deep.length
        for (const d of deferred) {
          exitStats[d.exitIndex]!.headMs += share
          exitStats[d.exitIndex]!.headRows++
        }
        if (head._tag === "Left")
          fail(
            deep.map((r) => r.seq),
            head.left,
          )
        else {
          for (const row of atEnd) row.seq.pending = []
          deferred.forEach(({ seq, exitIndex, confidence }, i) => {
            const exitLayer = spec.exits[exitIndex]!.layer
            finished.push({ seq, head: head.right, row: fullDepth + i, exitLayer, confidence })
          })
          deep.slice(0, fullDepth).forEach(({ seq }, row) => {
            const out = { head: head.right, row, exitLayer: dims.layers, confidence: head.right.maxProb[row]! }
            // The other samples of the request start from the same prompt blocks and the same logits.
            const forks = seq.request.forks.splice(0).map((start) => start())
            finished.push(...[seq, ...forks].map((s) => ({ ...out, seq: s })))
          })
        }
      }
      for (const f of finished) {
        if (!sequences.has(f.seq.id)) continue
        if (f.seq.blocks) commit(f.seq)
        emit(f)
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

    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        stopped = true
        const error = new EngineStoppedError({ message: "the engine shut down while the request was in flight" })
        for (const seq of scheduler.drain()) {
          sequences.delete(seq.id)
          close((seq as Sequence).request, Exit.fail(error))
        }
      }),
    )
    yield* Effect.forkScoped(loop)

    const newSequence = (
      request: RequestState,
      tokens: Array<number>,
      sample: number,
      prompt: ReadonlyArray<number>,
    ) => {
      const seq: Sequence = {
        id: nextId++,
        tokens,
        computed: 0,
        blocks: undefined,
        cancelled: false,
        request,
        sample,
        rng: sampler.makeRng(request.sampling.seed, (request.sampling.stream ?? 0) + sample),
        detokenizer: tokenizer.detokenizer(prompt),
        generated: 0,
        pending: [],
        exact: 0,
      }
      sequences.set(seq.id, seq)
      return seq
    }

    const submit = (request: GenerationRequest, sink: GenerationSink) =>
      Effect.gen(function* () {
        if (stopped) return yield* new EngineStoppedError({ message: "the engine has shut down" })
        const req = yield* Schema.decodeUnknown(GenerationRequest)(request).pipe(
          Effect.mapError((e) => new InvalidRequestError({ message: describeParseError(e) })),
        )
        const prompt = yield* tokenizer.encode(req.prompt)
        if (prompt.length >= dims.contextLength) {
          return yield* new InvalidRequestError({
            message: `the prompt is ${prompt.length} tokens but the model's context is ${dims.contextLength}; shorten the prompt`,
          })
        }
        if (kv.blocksFor(prompt.length + 1) > kv.numBlocks) {
          return yield* new InvalidRequestError({
            message: `the prompt is ${prompt.length} tokens but the KV cache holds ${kv.numBlocks * kv.blockSize}; shorten the prompt or raise the KV cache budget`,
          })
        }
        // A request that sets its own threshold means it for every exit: the defaults' per-exit thresholds
        // (calibration) apply only where the request keeps the default threshold too.
        const ownThreshold = req.earlyExit?.threshold !== undefined && req.earlyExit.thresholds === undefined
        const { thresholds: _calibrated, ...base } = defaults
        const exitParams = { ...(ownThreshold ? base : defaults), ...req.earlyExit }
        if (exitParams.measure === "classifier" && !spec.exits.some((e) => e.classifier)) {
          return yield* new InvalidRequestError({
            message:
              "the classifier measure needs exit classifiers, and this model has none; use softmax, margin, entropy or saturation",
          })
        }
        const n = req.n ?? 1
        const forcedTokens = req.forcedTokens
        if (forcedTokens?.some((id) => id >= dims.vocab)) {
          return yield* new InvalidRequestError({
            message: `forced tokens must be ids below the vocabulary size ${dims.vocab}`,
          })
        }
        const state: RequestState = {
          maxTokens: forcedTokens ? Math.min(req.maxTokens, forcedTokens.length) : req.maxTokens,
          forcedTokens,
          sampling: req.sampling,
          usesLogits: req.sampling.temperature > 0 || forcedTokens !== undefined,
          exit: resolveEarlyExit(spec, exitParams),
          sink,
          closed: false,
          forks: [],
          live: n,
        }
        const first = newSequence(state, [...prompt], 0, prompt)
        for (let sample = 1; sample < n; sample++) {
          state.forks.push(() => {
            const seq = newSequence(state, [...first.tokens], sample, prompt)
            seq.computed = first.computed
            seq.exact = first.exact
            scheduler.adopt(first, seq)
            return seq
          })
        }
        scheduler.submit(first)
        yield* Queue.offer(wake, undefined)
        return cancel(state)
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

    const stats = Effect.sync((): EngineStats => {
      const generated = Object.values(exitHistogram).reduce((a, b) => a + b, 0)
      const depth = Object.entries(exitHistogram).reduce((sum, [layer, n]) => sum + Number(layer) * n, 0)
      return {
        ...counters,
        running: scheduler.running(),
        waiting: scheduler.waiting(),
        preemptions: scheduler.preemptions(),
        exitHistogram: { ...exitHistogram },
        meanExitDepth: generated === 0 ? 0 : depth / generated,
        headMs: exitStats.reduce((ms, e) => ms + e.headMs + e.decisionMs, 0),
        exits: exitStats.map((e) => ({ ...e })),
        kv: kv.stats(),
      }
    })

    return { spec, defaults, generate: streamOfSubmit(submit), submit, stats } satisfies EngineShape
  })
