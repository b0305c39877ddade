/**
 * The forward pass of one engine step. Prefill chunks run at full depth, one call per segment each. Decode rows run
 * through the segments together; after a segment that ends at an early exit the exit policy decides which rows take
 * their token there, and the rest go on in a compacted batch. Everything that ran the whole depth, and the rows that
 * exited without needing a head to decide, share one call of the final head.
 *
 * Returns the rows that are done with the network this step (emission samples them; a row's sequence may have
 * ended meanwhile) and fails the sequences whose calls failed.
 */
import { Effect } from "effect"
import type { ConfidenceEvaluatorShape } from "../ConfidenceEvaluator.js"
import type { KvStrategy as KvStrategyName } from "../EarlyExit.js"
import { thresholdAt } from "../EarlyExit.js"
import type { RunnerError } from "../Errors.js"
import type { KvCacheShape } from "../KvCache.js"
import type { HeadOutput, ModelRunnerShape } from "../ModelRunner.js"
import { makeRowBatchBuilder } from "../RowBatch.js"
import type { BatchRow, SchedulerShape } from "../Scheduler.js"
import type { Emission, Finished } from "./Emission.js"
import { confidentAfterHead, type ExitRow, exitingRows, planHead } from "./ExitPolicy.js"
import { commitExact, type KvStrategy } from "./KvStrategy.js"
import type { DecodeRow, Sequence } from "./Sequence.js"
import type { SpeculativePass } from "./SpeculativePass.js"
import type { Statistics } from "./Statistics.js"

/** A reusable buffer: each call returns a view of n floats over storage that grows as needed. */
const scratch = () => {
  let storage = new Float32Array(0)
  return (n: number) => {
    if (storage.length < n) storage = new Float32Array(Math.max(n, storage.length * 2))
    return storage.subarray(0, n)
  }
}

/** A row that exited early and takes its token from the step's final head call. */
interface Deferred {
  readonly seq: Sequence
  readonly hidden: Float32Array
  readonly exitIndex: number
  readonly confidence: number
}

export const makeForwardPass = (deps: {
  readonly runner: ModelRunnerShape
  readonly kv: KvCacheShape
  readonly evaluator: ConfidenceEvaluatorShape
  readonly strategies: Readonly<Record<KvStrategyName, KvStrategy>>
  readonly speculativePass: SpeculativePass
  readonly scheduler: SchedulerShape<Sequence>
  readonly statistics: Statistics
  readonly emission: Emission
}) => {
  const { runner, kv, evaluator, strategies, speculativePass, scheduler, statistics, emission } = deps
  const { spec } = runner
  const { dims } = spec
  const D = dims.hidden
  const { counters } = statistics
  // Inputs of the runner's calls are assembled in these, reused from call to call (a call reads its input only
  // while it runs). Each step used to allocate them anew: with the runner's outputs, enough ArrayBuffer bytes for
  // V8 to run a full mark-compact about three times a second in the engine worker's small heap.
  const segmentInput = scratch()
  const headInput = scratch()
  // Batches for the segment calls, each used only by the call it is built for (see makeRowBatchBuilder).
  const rowBatch = makeRowBatchBuilder(runner.blockSize)
  const classifierInput = scratch()
  const previousInput = scratch()
  const headFree = evaluator.headFree ?? (() => false)
  const sharedHead = spec.exits.every((e) => e.head === spec.exits.at(-1)!.head)
  const finalExit = spec.exits.length - 1
  const exitAfterSegment = spec.segments.map((s) => spec.exits.findIndex((e) => e.layer === s.endLayer))
  const strategyOf = (seq: Sequence) => strategies[seq.request.exit.params.kv]
  const strategyList = Object.values(strategies)

  /** Prefill chunks at full depth, one call each; returns the rows that reached their last token. */
  const prefill = (rows: ReadonlyArray<BatchRow<Sequence>>) =>
    Effect.gen(function* () {
      const done: Array<{ seq: Sequence; hidden: Float32Array }> = []
      for (const { seq, count } of rows) {
        seq.exitStates.clear()
        if (seq.computed === 0) seq.exact = 0
        const batch = rowBatch([{ cached: seq.computed, count, blocks: seq.blocks!.blocks }])
        const ids = BigInt64Array.from(seq.tokens.slice(seq.computed, seq.computed + count), BigInt)
        const result = yield* Effect.either(
          Effect.gen(function* () {
            let hidden = yield* runner.embed(ids, 1, count)
            for (let s = 0; s < spec.segments.length; s++) hidden = yield* runner.segment(s, hidden, batch)
            return hidden
          }),
        )
        if (result._tag === "Left") {
          emission.fail([seq], result.left)
          continue
        }
        counters.prefillTokens += count
        scheduler.advance(seq, count)
        for (let l = 0; l < dims.layers; l++) kv.markFilled(seq.blocks!, l, seq.computed)
        seq.exact = seq.computed
        commitExact(kv, seq)
        if (seq.computed === seq.tokens.length) {
          done.push({ seq, hidden: result.right.slice((count - 1) * D, count * D) })
        }
      }
      return done
    })

  /** Runs one segment for decode rows, each with the tokens its strategy makes it carry, then its current token. */
  const runSegment = (index: number, rows: ReadonlyArray<DecodeRow>) =>
    Effect.gen(function* () {
      const { firstLayer, endLayer } = spec.segments[index]!
      for (const strategy of strategyList) {
        const own = rows.filter((r) => strategyOf(r.seq) === strategy)
        if (own.length > 0) yield* strategy.beforeSegment(index, own)
      }
      const batch = rowBatch(
        rows.map((r) => ({ cached: r.positions[0]!, count: r.positions.length, blocks: r.seq.blocks!.blocks })),
      )
      const input = segmentInput(batch.rows * batch.tokens * D)
      rows.forEach((r, i) => {
        input.set(r.hidden, i * batch.tokens * D)
        // Padding after a shorter row's tokens: the call ignores it, but stale values need not go in.
        input.fill(0, i * batch.tokens * D + r.hidden.length, (i + 1) * batch.tokens * D)
      })
      const started = performance.now()
      const output = yield* runner.segment(index, input, batch)
      counters.decodeSegmentMs += performance.now() - started
      counters.decodeLayerRows += rows.length * (endLayer - firstLayer)
      rows.forEach((r, i) => {
        // A view: the output is the runner's own buffer, never written again.
        r.hidden = output.subarray(i * batch.tokens * D, (i * batch.tokens + r.positions.length) * D)
        const upTo = r.positions.at(-1)! + 1
        for (let l = firstLayer; l < endLayer; l++) kv.markFilled(r.seq.blocks!, l, upTo)
      })
    })

  const current = (row: DecodeRow) => row.hidden.subarray((row.positions.length - 1) * D)

  /** The decision at an exit for one step's rows, before any head runs. */
  interface ExitPlan {
    readonly exitIndex: number
    readonly rows: ReadonlyArray<DecodeRow>
    /** Rows scored here (their threshold is at most 1). */
    readonly scored: number
    /** Each row's threshold, policy and head-free confidence (undefined where its measure needs the head). */
    readonly exitRows: ReadonlyArray<ExitRow>
    readonly deferred: ReadonlyArray<number>
    readonly headed: ReadonlyArray<number>
  }

  interface ExitDecision {
    readonly exiting: ReadonlyArray<number>
    readonly head: HeadOutput | undefined
    /** Each row's row in the head call; -1: it takes its token from the step's final head call. */
    readonly headRows: ReadonlyArray<number>
    readonly confidences: ReadonlyArray<number>
  }

  const nobody: ExitDecision = { exiting: [], head: undefined, headRows: [], confidences: [] }

  /**
   * A row's threshold at early exit `exitIndex` (above 1: not scored there). A row whose request has samples still
   * to fork goes the whole depth: the forks start at the final head from its exact K/V (a prompt whose last token is
   * its only uncached one comes here as a decode row).
   */
  const thresholdOf = (row: DecodeRow, exitIndex: number) => {
    const { request } = row.seq
    return request.forks.length > 0
      ? Number.POSITIVE_INFINITY
      : thresholdAt(request.exit, exitIndex, row.seq.generated, request.maxTokens)
  }

  /**
   * The first half of deciding at early exit `exitIndex` (see ExitPolicy), synchronous and in one pass over the
   * rows: their thresholds, then head-free measures from hidden states (the runner's JavaScript classifier, or one
   * classifier call for the rows that use it when it runs as a graph). A row held back here pays nothing more, so
   * when no row needs the head, this is the whole decision.
   */
  const planExits = (exitIndex: number, rows: ReadonlyArray<DecodeRow>, classified?: Float32Array): ExitPlan => {
    const predictor = runner.exitPredictor(exitIndex)
    const exitRows: Array<ExitRow> = new Array(rows.length)
    let scored = 0
    let next = 0
    for (let r = 0; r < rows.length; r++) {
      const row = rows[r]!
      const params = row.seq.request.exit.params
      const threshold = thresholdOf(row, exitIndex)
      let confidence: number | undefined
      if (threshold <= 1) {
        scored++
        if (headFree(params.measure)) {
          const hidden = current(row)
          const probability =
            params.measure !== "classifier"
              ? undefined
              : predictor
                ? predictor(hidden, row.previous)
                : classified?.[next++]
          confidence = evaluator.confidence({
            measure: params.measure,
            exitIndex,
            head: undefined,
            row: 0,
            hidden,
            previousHidden: row.previous,
            vocab: dims.vocab,
            ...(probability !== undefined ? { classifier: probability } : {}),
          })
        }
      }
      exitRows[r] = { threshold, policy: params.policy, headFree: confidence, confirm: params.confirm }
    }
    statistics.exits[exitIndex]!.scored += scored
    const { deferred, headed } = scored === 0 ? { deferred: [], headed: [] } : planHead(exitRows, sharedHead)
    return { exitIndex, rows, scored, exitRows, deferred, headed }
  }

  /** Rows whose measure is the classifier and that are scored here, when the classifier runs as a graph. */
  const classifierRows = (exitIndex: number, rows: ReadonlyArray<DecodeRow>): Array<number> => {
    if (runner.exitPredictor(exitIndex) !== undefined) return []
    return rows.flatMap((row, r) =>
      thresholdOf(row, exitIndex) <= 1 && row.seq.request.exit.params.measure === "classifier" ? [r] : [],
    )
  }

  /**
   * Decides which rows take their token at early exit `exitIndex`: the plan, then the head once, for the rows that
   * may still exit here and need it. Returns the exiting rows, with their confidences, and for each its row in the
   * head call (-1: it takes its token from the step's final head call). When no row needs the head (the common case
   * under a head-free measure) nothing but the plan runs: no Effect, no call.
   */
  const decideExits = (exitIndex: number, rows: ReadonlyArray<DecodeRow>): Effect.Effect<ExitDecision, RunnerError> => {
    const started = performance.now()
    // A classifier that runs as a graph is one call for the rows that use it, before the plan.
    const viaGraph = classifierRows(exitIndex, rows)
    if (viaGraph.length === 0) return decide(exitIndex, rows, started)
    const hidden = classifierInput(viaGraph.length * D)
    const previous = previousInput(viaGraph.length * D)
    viaGraph.forEach((r, i) => {
      hidden.set(current(rows[r]!), i * D)
      previous.set(rows[r]!.previous, i * D)
    })
    return Effect.flatMap(runner.classify(exitIndex, hidden, previous, viaGraph.length), (classified) =>
      decide(exitIndex, rows, started, classified),
    )
  }

  /** The plan, timed from `started` when any row was scored, then the head if a row needs it. */
  const decide = (exitIndex: number, rows: ReadonlyArray<DecodeRow>, started: number, classified?: Float32Array) => {
    const plan = planExits(exitIndex, rows, classified)
    // Rows not scored here decided nothing (their threshold says full depth).
    if (plan.scored > 0) statistics.exits[exitIndex]!.decisionMs += performance.now() - started
    return plan.deferred.length === 0 && plan.headed.length === 0 ? Effect.succeed(nobody) : withHead(plan)
  }

  /** The second half: the head for the plan's headed rows, then which rows exit. */
  const withHead = (plan: ExitPlan) =>
    Effect.gen(function* () {
      const { exitIndex, rows, exitRows, deferred, headed } = plan
      const stats = statistics.exits[exitIndex]!
      const confident: Array<boolean> = rows.map(() => false)
      const confidences: Array<number> = rows.map(() => 0)
      const headRows: Array<number> = rows.map(() => -1)
      for (const r of deferred) {
        confident[r] = true
        confidences[r] = exitRows[r]!.headFree!
      }
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
        headed.forEach((r, i) => {
          const row = rows[r]!
          const confidence =
            exitRows[r]!.headFree ??
            evaluator.confidence({
              measure: row.seq.request.exit.params.measure,
              exitIndex,
              head: head!,
              row: i,
              hidden: current(row),
              previousHidden: row.previous,
              vocab: dims.vocab,
            })
          confidences[r] = confidence
          headRows[r] = i
          confident[r] = confidentAfterHead(exitRows[r]!, confidence, head!.maxProb[i]!)
        })
      }
      const exiting = exitingRows(exitRows, confident)
      stats.exited += exiting.length
      return { exiting, head, headRows, confidences } satisfies ExitDecision
    })

  /** Decode rows through the segments with early exits. */
  const decode = (rows: ReadonlyArray<BatchRow<Sequence>>) =>
    Effect.gen(function* () {
      const finished: Array<Finished> = []
      const deferred: Array<Deferred> = []
      if (rows.length === 0) return { finished, deferred, atEnd: [] as Array<DecodeRow> }
      const ids = BigInt64Array.from(rows, (r) => BigInt(r.seq.tokens[r.seq.computed]!))
      const embedded = yield* runner.embed(ids, rows.length, 1)
      let active: Array<DecodeRow> = rows.map(({ seq }, i) => ({
        seq,
        positions: [seq.computed],
        hidden: embedded.subarray(i * D, (i + 1) * D),
        previous: embedded.subarray(i * D, (i + 1) * D),
      }))
      for (const row of active) {
        scheduler.advance(row.seq, 1)
        counters.decodeTokens++
      }
      for (let s = 0; s < spec.segments.length && active.length > 0; s++) {
        yield* runSegment(s, active)
        const exitIndex = exitAfterSegment[s]!
        if (exitIndex < 0 || exitIndex === finalExit) continue
        const { exiting, head, headRows, confidences } = yield* decideExits(exitIndex, active)
        if (exiting.length > 0) {
          const exitLayer = spec.exits[exitIndex]!.layer
          for (const r of exiting) {
            const row = active[r]!
            strategyOf(row.seq).skipped(exitIndex, row)
            const confidence = confidences[r]!
            if (headRows[r] === -1) deferred.push({ seq: row.seq, hidden: current(row), exitIndex, confidence })
            else finished.push({ seq: row.seq, head: head!, row: headRows[r]!, exitLayer, confidence })
          }
          const gone = new Set(exiting)
          active = active.filter((_, r) => !gone.has(r))
        }
        for (const row of active) row.previous = current(row)
      }
      return { finished, deferred, atEnd: active }
    })

  /** One step's forward pass over the scheduler's rows; returns the rows to emit. */
  const run = (rows: ReadonlyArray<BatchRow<Sequence>>) =>
    Effect.gen(function* () {
      // A row with one new token whose earlier tokens are all computed is a decode row; anything else prefills.
      // Decode rows of speculative requests draft and verify (unless their forks still wait for the final head).
      const isDecode = (r: BatchRow<Sequence>) => r.count === 1 && r.seq.computed > 0
      const isSpeculative = (r: BatchRow<Sequence>) =>
        r.seq.request.speculative !== undefined && r.seq.request.forks.length === 0
      const decodeRows = rows.filter((r) => isDecode(r) && !isSpeculative(r))
      const speculativeRows = rows.filter((r) => isDecode(r) && isSpeculative(r))
      const prefilled = yield* prefill(rows.filter((r) => !isDecode(r)))
      const speculated = yield* Effect.either(speculativePass.run(speculativeRows))
      if (speculated._tag === "Left")
        emission.fail(
          speculativeRows.map((r) => r.seq),
          speculated.left,
        )
      const speculative = speculated._tag === "Right" ? speculated.right : []
      const decoded = yield* Effect.either(decode(decodeRows))
      if (decoded._tag === "Left")
        emission.fail(
          decodeRows.map((r) => r.seq),
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
          statistics.exits[d.exitIndex]!.headMs += share
          statistics.exits[d.exitIndex]!.headRows++
        }
        if (head._tag === "Left")
          emission.fail(
            deep.map((r) => r.seq),
            head.left,
          )
        else {
          deferred.forEach(({ seq, exitIndex, confidence }, i) => {
            const exitLayer = spec.exits[exitIndex]!.layer
            finished.push({ seq, head: head.right, row: fullDepth + i, exitLayer, confidence })
          })
          deep.slice(0, fullDepth).forEach(({ seq }, row) => {
            const out = { head: head.right, row, exitLayer: dims.layers, confidence: head.right.maxProb[row]! }
            // The other samples of the request start from the same prompt blocks and the same logits.
            const forks = seq.request.forks.splice(0).flatMap((start) => start() ?? [])
            finished.push(...[seq, ...forks].map((s) => ({ ...out, seq: s })))
          })
        }
      }
      return { finished, speculative }
    })

  return { run }
}
