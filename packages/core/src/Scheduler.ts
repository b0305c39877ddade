/**
 * The Scheduler service: iteration-level batching over the paged KV cache (vLLM's policy, on a CPU budget).
 *
 * Every engine step asks for one batch. Running sequences come first, oldest admission first: each gets its next
 * prefill chunk or its one decode token under the step's token budget. Then waiting sequences are admitted in
 * arrival order while their blocks fit (first come, first served: a waiting sequence that does not fit blocks the
 * ones behind it). When a running sequence needs a block and the pool has none, the most recently admitted
 * sequence is preempted: its blocks are freed and it waits at the front of the queue to be recomputed.
 *
 * Fairness: sequences belong to groups (a client request: its prompts and their samples), and a group runs at most
 * `maxRunningPerGroup` sequences at once; its others wait without blocking other groups' admission. So one request
 * with many prompts or a large `n` takes a bounded share of the batch, and other clients' requests are admitted
 * at the next step. Samples forked from a computed prompt obey both caps: a fork that does not fit waits and is
 * admitted later (its prompt's full blocks come from the prefix cache).
 */
import { Context, Effect, Layer } from "effect"
import { KvCache, type SequenceBlocks } from "./KvCache.js"

export interface SchedulerOptions {
  /** Most new tokens (prefill + decode) in one step. */
  readonly tokenBudget?: number
  /** Most sequences running at once. */
  readonly maxRunning?: number
  /** Most sequences of one group (one client request) running at once (default a quarter of `maxRunning`). */
  readonly maxRunningPerGroup?: number
}

export const DEFAULT_TOKEN_BUDGET = 512
export const DEFAULT_MAX_RUNNING = 64

/** What the scheduler needs to know of a sequence; the engine keeps the rest (sampling, streams). */
export interface ScheduledSequence {
  readonly id: number
  /** The sequences of one client request share a group; the running cap per group keeps admission fair. */
  readonly group: number
  /** Prompt + generated tokens. The last one has no K/V yet once the sequence has sampled. */
  readonly tokens: Array<number>
  /** Positions whose K/V are in the cache. Written by the scheduler only (`advance` after a step computed them). */
  computed: number
  blocks: SequenceBlocks | undefined
  /** Set when the sequence's stream is gone; it is dropped at the next step. */
  cancelled: boolean
  /**
   * Positions past its next one that a decode step of this sequence may write (speculative decoding's drafts): they
   * are reserved with the step's token and count against its budget. The engine rolls back what it does not keep.
   */
  readonly lookahead?: number
}

export interface BatchRow<S extends ScheduledSequence = ScheduledSequence> {
  readonly seq: S
  /** New positions computed for this row in this step: [seq.computed, seq.computed + count). */
  readonly count: number
}

export interface ScheduleResult<S extends ScheduledSequence = ScheduledSequence> {
  readonly rows: ReadonlyArray<BatchRow<S>>
  /** Sequences preempted in this step (their blocks are freed; they wait for recomputation). */
  readonly preempted: ReadonlyArray<S>
  /** Sequences that can never proceed: alone in the engine and still out of blocks. */
  readonly starved: ReadonlyArray<S>
}

export interface SchedulerShape<S extends ScheduledSequence = ScheduledSequence> {
  /** Queues a new sequence (at the back) for admission. */
  readonly submit: (seq: S) => void
  /** Plans the next step; drops cancelled sequences first (freeing their blocks). */
  readonly schedule: () => ScheduleResult<S>
  /**
   * Another sample of `parent`'s prompt: `child` (same tokens) starts running as a copy that shares its blocks and
   * its computed positions, and true is returned; or, when the running caps are full, it is queued to be admitted
   * later like a new sequence (computing from its prompt's cached prefix), and false is returned.
   */
  readonly adopt: (parent: S, child: S) => boolean
  /** Records that the step computed `count` more positions of `seq` (their K/V are in its blocks). */
  readonly advance: (seq: S, count: number) => void
  /** Removes a sequence that finished or failed, freeing its blocks. */
  readonly finish: (seq: S) => void
  /** Removes every sequence (engine shutdown), freeing their blocks; returns them. */
  readonly drain: () => ReadonlyArray<S>
  readonly waiting: () => number
  readonly running: () => number
  readonly preemptions: () => number
}

export const makeScheduler = <S extends ScheduledSequence>(
  kv: typeof KvCache.Service,
  options: SchedulerOptions = {},
): SchedulerShape<S> => {
  const tokenBudget = options.tokenBudget ?? DEFAULT_TOKEN_BUDGET
  const maxRunning = options.maxRunning ?? DEFAULT_MAX_RUNNING
  const maxRunningPerGroup = options.maxRunningPerGroup ?? Math.max(1, Math.floor(maxRunning / 4))
  let waiting: Array<S> = []
  /** In admission order: the last is the first to be preempted. */
  let running: Array<S> = []
  let preemptions = 0

  const release = (seq: S) => {
    if (seq.blocks) kv.free(seq.blocks)
    seq.blocks = undefined
  }

  const preempt = (seq: S) => {
    release(seq)
    seq.computed = 0
    running = running.filter((s) => s !== seq)
    preemptions++
  }

  const schedule = (): ScheduleResult<S> => {
    for (const seq of running) if (seq.cancelled) release(seq)
    running = running.filter((s) => !s.cancelled)
    waiting = waiting.filter((s) => !s.cancelled)

    const rows: Array<BatchRow<S>> = []
    const preempted: Array<S> = []
    const starved: Array<S> = []
    let budget = tokenBudget

    // Running sequences, oldest first; a preempted victim is taken from the newest end.
    for (let i = 0; i < running.length && budget > 0; i++) {
      const seq = running[i]!
      const remaining = seq.tokens.length - seq.computed
      const count = Math.min(remaining, budget)
      if (count <= 0) continue
      const lookahead = remaining === 1 ? (seq.lookahead ?? 0) : 0
      const blocks = seq.blocks!
      const missing = seq.computed + count - blocks.reserved
      // The lookahead is taken when the pool has room for it; no sequence is preempted for it.
      const wanted = missing + lookahead
      let reserved = wanted <= 0 || kv.reserve(blocks, wanted) || missing <= 0 || kv.reserve(blocks, missing)
      while (!reserved) {
        const victim = running[running.length - 1]!
        if (victim === seq) break
        preempt(victim)
        preempted.push(victim)
        reserved = kv.reserve(blocks, missing)
      }
      if (!reserved) {
        if (running.length === 1 && rows.length === 0) {
          // Alone and still short of blocks: the pool can never hold this sequence's next position.
          release(seq)
          running = []
          starved.push(seq)
        } else {
          preempt(seq)
          preempted.push(seq)
        }
        break
      }
      rows.push({ seq, count })
      budget -= count + lookahead
    }
    // Preempted sequences go back to the front of the queue, oldest first.
    waiting = [...preempted.reverse(), ...waiting]

    // Admission, first come first served among the groups under their cap.
    if (preempted.length === 0 && budget > 0 && running.length < maxRunning && waiting.length > 0) {
      const perGroup = runningPerGroup()
      for (let i = 0; i < waiting.length && running.length < maxRunning && budget > 0; ) {
        const seq = waiting[i]!
        const groupRunning = perGroup.get(seq.group) ?? 0
        if (groupRunning >= maxRunningPerGroup) {
          i++
          continue
        }
        const blocks = kv.open(seq.tokens)
        if (!blocks) break
        waiting.splice(i, 1)
        perGroup.set(seq.group, groupRunning + 1)
        seq.blocks = blocks
        seq.computed = blocks.cachedPrefix
        running.push(seq)
        const count = Math.min(seq.tokens.length - seq.computed, budget)
        rows.push({ seq, count })
        budget -= count
      }
    }
    return { rows, preempted, starved }
  }

  const runningPerGroup = () => {
    const counts = new Map<number, number>()
    for (const seq of running) counts.set(seq.group, (counts.get(seq.group) ?? 0) + 1)
    return counts
  }

  const adopt = (parent: S, child: S): boolean => {
    const groupRunning = running.reduce((n, seq) => (seq.group === child.group ? n + 1 : n), 0)
    if (running.length < maxRunning && groupRunning < maxRunningPerGroup) {
      child.blocks = kv.fork(parent.blocks!)
      child.computed = parent.computed
      running.push(child)
      return true
    }
    child.blocks = undefined
    child.computed = 0
    waiting.push(child)
    return false
  }

  return {
    submit: (seq) => {
      waiting.push(seq)
    },
    schedule,
    adopt,
    advance: (seq, count) => {
      seq.computed += count
    },
    finish: (seq) => {
      release(seq)
      running = running.filter((s) => s !== seq)
      waiting = waiting.filter((s) => s !== seq)
    },
    drain: () => {
      const all = [...running, ...waiting]
      for (const seq of all) release(seq)
      running = []
      waiting = []
      return all
    },
    waiting: () => waiting.length,
    running: () => running.length,
    preemptions: () => preemptions,
  }
}

/**
 * The Scheduler service makes the scheduler of an engine over the KV cache in context, typed by the engine's own
 * sequences (the plans it returns hold them, with no casts).
 */
export interface SchedulerService {
  readonly make: <S extends ScheduledSequence>() => SchedulerShape<S>
}

export class Scheduler extends Context.Tag("@offramp/core/Scheduler")<Scheduler, SchedulerService>() {
  static readonly layer = (options: SchedulerOptions = {}) =>
    Layer.effect(
      Scheduler,
      Effect.map(KvCache, (kv) => ({ make: () => makeScheduler(kv, options) })),
    )
}
