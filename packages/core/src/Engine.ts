/**
 * The Engine service: `generate(request)` returns a Stream of token events; requests from any number of fibers
 * are batched together at every step by a background loop that the Engine layer owns.
 *
 * The loop is the only fiber that touches the scheduler and the KV cache. A stream that is interrupted marks its
 * sequences cancelled; the next step drops them and frees their blocks. When the layer's scope closes, the loop
 * stops and every stream still open ends with EngineStoppedError.
 */
import { Context, Effect, Exit, Layer, Mailbox, Queue, Schema, Stream } from "effect"
import {
  describeParseError,
  EngineStoppedError,
  type GenerationError,
  InvalidRequestError,
  type RunnerError,
} from "./Errors.js"
import { GenerationRequest, type TokenEvent } from "./Generation.js"
import { KvCache } from "./KvCache.js"
import { ModelRunner } from "./ModelRunner.js"
import type { ModelSpec } from "./ModelSpec.js"
import { buildRowBatch } from "./RowBatch.js"
import { type Rng, Sampler, type SamplingParams } from "./Sampler.js"
import { type BatchRow, type ScheduledSequence, Scheduler } from "./Scheduler.js"
import { type DetokenizerStream, Tokenizer } from "./Tokenizer.js"

export interface EngineStats {
  readonly steps: number
  readonly prefillTokens: number
  readonly decodeTokens: number
  readonly running: number
  readonly waiting: number
  readonly preemptions: number
  readonly kv: ReturnType<typeof KvCache.Service.stats>
}

export interface EngineShape {
  readonly spec: ModelSpec
  readonly generate: (request: GenerationRequest) => Stream.Stream<TokenEvent, GenerationError>
  readonly stats: Effect.Effect<EngineStats>
}

export class Engine extends Context.Tag("@offramp/core/Engine")<Engine, EngineShape>() {
  static readonly layer: Layer.Layer<Engine, never, ModelRunner | Tokenizer | Sampler | KvCache | Scheduler> =
    Layer.scoped(
      Engine,
      Effect.suspend(() => makeEngine),
    )
}

/** One sample of a request, as the engine loop sees it. */
interface Sequence extends ScheduledSequence {
  readonly request: RequestState
  readonly sample: number
  readonly rng: Rng
  readonly detokenizer: DetokenizerStream
  generated: number
}

interface RequestState {
  readonly promptLength: number
  readonly maxTokens: number
  readonly sampling: SamplingParams
  readonly mailbox: Mailbox.Mailbox<TokenEvent, GenerationError>
  /** Samples 1..n-1, started by forking sample 0 once the prompt is computed. */
  readonly forks: Array<() => Sequence>
  live: number
}

const makeEngine = Effect.gen(function* () {
  const runner = yield* ModelRunner
  const tokenizer = yield* Tokenizer
  const sampler = yield* Sampler
  const kv = yield* KvCache
  const scheduler = yield* Scheduler
  const { spec } = runner
  const { dims } = spec
  const finalExit = spec.exits.length - 1
  const exitLayer = spec.exits[finalExit]!.layer
  const stopIds = new Set(spec.tokens.stop)
  const wake = yield* Queue.sliding<void>(1)
  const sequences = new Map<number, Sequence>()
  let nextId = 0
  let stopped = false
  const counters = { steps: 0, prefillTokens: 0, decodeTokens: 0 }

  const end = (seq: Sequence, exit: Exit.Exit<void, GenerationError>) => {
    scheduler.finish(seq)
    sequences.delete(seq.id)
    seq.request.live--
    if (Exit.isFailure(exit) || seq.request.live === 0) seq.request.mailbox.unsafeDone(exit)
  }

  /** Samples the next token of `seq` from `logits` row `row`, emits it, and ends the sequence when it is done. */
  const emit = (seq: Sequence, logits: Float32Array, row: number, confidence: number) => {
    const { request } = seq
    const id = sampler.sample(logits, row * dims.vocab, dims.vocab, request.sampling, seq.rng)
    const stop = stopIds.has(id)
    seq.generated++
    const full = seq.generated >= request.maxTokens || seq.tokens.length + 1 > dims.contextLength
    const finishReason = stop ? "stop" : full ? "length" : null
    let text = stop ? "" : seq.detokenizer.push(id)
    if (finishReason !== null) text += seq.detokenizer.flush()
    request.mailbox.unsafeOffer({
      sample: seq.sample,
      index: seq.generated - 1,
      id,
      text,
      exitLayer,
      confidence,
      finishReason,
    })
    if (finishReason !== null) end(seq, Exit.void)
    else seq.tokens.push(id)
  }

  /** Runs rows through the full depth; returns the last hidden state of each row that reaches its end. */
  const forward = (rows: ReadonlyArray<BatchRow>) =>
    Effect.gen(function* () {
      const batch = buildRowBatch(
        rows.map(({ seq, count }) => ({ cached: seq.computed, count, blocks: seq.blocks!.blocks })),
        runner.blockSize,
      )
      const ids = new BigInt64Array(batch.rows * batch.tokens)
      rows.forEach(({ seq, count }, r) => {
        for (let t = 0; t < count; t++) ids[r * batch.tokens + t] = BigInt(seq.tokens[seq.computed + t]!)
      })
      let hidden = yield* runner.embed(ids, batch.rows, batch.tokens)
      for (let s = 0; s < spec.segments.length; s++) hidden = yield* runner.segment(s, hidden, batch)
      const last: Array<{ seq: Sequence; hidden: Float32Array }> = []
      rows.forEach(({ seq, count }, r) => {
        if (seq.computed + count === seq.tokens.length) {
          const i = r * batch.tokens + count - 1
          last.push({ seq: seq as Sequence, hidden: hidden.subarray(i * dims.hidden, (i + 1) * dims.hidden) })
        }
      })
      return last
    })

  /** Decode rows share one call; each prefill chunk runs in its own, so short rows are not padded to long ones. */
  const groupRows = (rows: ReadonlyArray<BatchRow>): Array<ReadonlyArray<BatchRow>> => {
    const decode = rows.filter((r) => r.count === 1)
    const prefill = rows.filter((r) => r.count > 1).map((r) => [r])
    return decode.length > 0 ? [decode, ...prefill] : prefill
  }

  const fail = (seqs: ReadonlyArray<Sequence>, error: GenerationError) => {
    for (const seq of seqs) if (sequences.has(seq.id)) end(seq, Exit.fail(error))
  }

  const step = Effect.gen(function* () {
    const plan = scheduler.schedule()
    counters.steps++
    fail(
      plan.starved.map((s) => s as Sequence),
      new InvalidRequestError({
        message: `the KV cache (${kv.numBlocks} blocks of ${kv.blockSize} tokens) cannot hold this sequence's next position; raise the KV cache budget`,
      }),
    )
    const ready: Array<{ seq: Sequence; hidden: Float32Array }> = []
    for (const group of groupRows(plan.rows)) {
      const result = yield* Effect.either(forward(group))
      if (result._tag === "Left") {
        fail(
          group.map((r) => r.seq as Sequence),
          result.left as RunnerError,
        )
        continue
      }
      for (const { seq, count } of group) {
        if (count === 1 && seq.computed === seq.tokens.length - 1) counters.decodeTokens++
        else counters.prefillTokens += count
        seq.computed += count
        kv.commit(seq.blocks!, seq.tokens, seq.computed)
      }
      ready.push(...result.right)
    }
    if (ready.length === 0) return
    const hidden = new Float32Array(ready.length * dims.hidden)
    ready.forEach((r, i) => hidden.set(r.hidden, i * dims.hidden))
    const head = yield* Effect.either(runner.head(finalExit, hidden, ready.length))
    if (head._tag === "Left")
      return fail(
        ready.map((r) => r.seq),
        head.left,
      )
    ready.forEach(({ seq }, row) => {
      // The other samples of the request start from the same prompt blocks and the same logits.
      const forks = seq.request.forks.splice(0).map((start) => start())
      for (const s of [seq, ...forks]) emit(s, head.right.logits, row, head.right.maxProb[row]!)
    })
  })

  const loop = Effect.gen(function* () {
    while (true) {
      if (scheduler.running() + scheduler.waiting() === 0) yield* Queue.take(wake)
      yield* step
      // Let request fibers run between steps (their submissions and cancellations).
      yield* Effect.yieldNow()
    }
  })

  yield* Effect.addFinalizer(() =>
    Effect.sync(() => {
      stopped = true
      const error = new EngineStoppedError({ message: "the engine shut down while the request was in flight" })
      for (const seq of scheduler.drain()) {
        sequences.delete(seq.id)
        ;(seq as Sequence).request.mailbox.unsafeDone(Exit.fail(error))
      }
    }),
  )
  yield* Effect.forkScoped(loop)

  const newSequence = (request: RequestState, tokens: Array<number>, sample: number, prompt: ReadonlyArray<number>) => {
    const seq: Sequence = {
      id: nextId++,
      tokens,
      computed: 0,
      blocks: undefined,
      cancelled: false,
      request,
      sample,
      rng: sampler.makeRng(request.sampling.seed === undefined ? undefined : request.sampling.seed + sample),
      detokenizer: tokenizer.detokenizer(prompt),
      generated: 0,
    }
    sequences.set(seq.id, seq)
    return seq
  }

  const admit = (request: GenerationRequest) =>
    Effect.gen(function* () {
      if (stopped) return yield* new EngineStoppedError({ message: "the engine has shut down" })
      const req = yield* Schema.decodeUnknown(GenerationRequest)(request).pipe(
        Effect.mapError((e) => new InvalidRequestError({ message: describeParseError(e) })),
      )
      const sampling = yield* sampler.validate(req.sampling)
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
      const mailbox = yield* Mailbox.make<TokenEvent, GenerationError>()
      const n = req.n ?? 1
      const state: RequestState = {
        promptLength: prompt.length,
        maxTokens: req.maxTokens,
        sampling,
        mailbox,
        forks: [],
        live: n,
      }
      const first = newSequence(state, [...prompt], 0, prompt)
      for (let sample = 1; sample < n; sample++) {
        state.forks.push(() => {
          const seq = newSequence(state, [...first.tokens], sample, prompt)
          seq.computed = first.computed
          scheduler.adopt(first, seq)
          return seq
        })
      }
      scheduler.submit(first)
      yield* Queue.offer(wake, undefined)
      return { state, mailbox }
    })

  const cancel = (state: RequestState) =>
    Effect.gen(function* () {
      for (const seq of sequences.values()) if (seq.request === state) seq.cancelled = true
      state.forks.length = 0
      yield* Queue.offer(wake, undefined)
    })

  const generate = (request: GenerationRequest): Stream.Stream<TokenEvent, GenerationError> =>
    Stream.unwrapScoped(
      Effect.gen(function* () {
        const { state, mailbox } = yield* admit(request)
        yield* Effect.addFinalizer(() => cancel(state))
        return Mailbox.toStream(mailbox)
      }),
    )

  const stats = Effect.sync(
    (): EngineStats => ({
      ...counters,
      running: scheduler.running(),
      waiting: scheduler.waiting(),
      preemptions: scheduler.preemptions(),
      kv: kv.stats(),
    }),
  )

  return { spec, generate, stats } satisfies EngineShape
})
