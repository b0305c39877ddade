import { describe, expect, it } from "@effect/vitest"
import fc from "fast-check"
import { makeKvCache } from "../src/internal/KvCacheImpl.js"
import { makeScheduler, type ScheduledSequence } from "../src/Scheduler.js"

const kvOf = (numBlocks: number, blockSize = 4) =>
  makeKvCache({ numBlocks, blockSize, layers: 2, bytesPerBlock: 64, copyBlock: () => {} })

let nextId = 0
const sequence = (group: number, tokens: ReadonlyArray<number>): ScheduledSequence => ({
  id: nextId++,
  group,
  tokens: [...tokens],
  computed: 0,
  blocks: undefined,
  cancelled: false,
})

const prompt = (length: number, first = 10) => Array.from({ length }, (_, i) => first + i)

/** Runs one planned step as the engine would: computes the rows, then appends one sampled token to each. */
const runStep = (kv: ReturnType<typeof kvOf>, plan: ReturnType<ReturnType<typeof makeScheduler>["schedule"]>) => {
  for (const { seq, count } of plan.rows) {
    seq.computed += count
    kv.commit(seq.blocks!, seq.tokens, seq.computed)
    if (seq.computed === seq.tokens.length) seq.tokens.push(7)
  }
}

describe("Scheduler fairness", () => {
  it("runs at most maxRunningPerGroup sequences of one group, and admits another group's sequence at once", () => {
    const kv = kvOf(256)
    const scheduler = makeScheduler(kv, { maxRunning: 8, maxRunningPerGroup: 3 })
    const hog = Array.from({ length: 10 }, (_, i) => sequence(1, prompt(5, 100 * i)))
    for (const s of hog) scheduler.submit(s)
    let plan = scheduler.schedule()
    expect(plan.rows.map((r) => r.seq.group)).toEqual([1, 1, 1])
    runStep(kv, plan)
    // A later request of another client is admitted at the next step, ahead of the hog's waiting sequences.
    const other = sequence(2, prompt(5, 5000))
    scheduler.submit(other)
    plan = scheduler.schedule()
    expect(plan.rows.map((r) => r.seq)).toContain(other)
    expect(scheduler.running()).toBe(4)
    expect(scheduler.waiting()).toBe(7)
  })

  it("starts the hog's next sequence when one of its running sequences finishes", () => {
    const kv = kvOf(256)
    const scheduler = makeScheduler(kv, { maxRunning: 8, maxRunningPerGroup: 2 })
    const hog = Array.from({ length: 4 }, (_, i) => sequence(1, prompt(3, 100 * i)))
    for (const s of hog) scheduler.submit(s)
    runStep(kv, scheduler.schedule())
    scheduler.finish(hog[0]!)
    const plan = scheduler.schedule()
    expect(plan.rows.map((r) => r.seq)).toEqual([hog[1], hog[2]])
    expect(scheduler.running()).toBe(2)
  })

  it("a fork obeys the running caps: it shares its parent's blocks when there is room, else it waits", () => {
    const kv = kvOf(64)
    const scheduler = makeScheduler(kv, { maxRunning: 8, maxRunningPerGroup: 2 })
    const parent = sequence(1, prompt(9))
    scheduler.submit(parent)
    runStep(kv, scheduler.schedule())
    const first = sequence(1, parent.tokens.slice(0, 9))
    expect(scheduler.adopt(parent, first)).toBe(true)
    expect(first.computed).toBe(parent.computed)
    expect([...first.blocks!.blocks.slice(0, 2)]).toEqual([...parent.blocks!.blocks.slice(0, 2)])
    const second = sequence(1, parent.tokens.slice(0, 9))
    expect(scheduler.adopt(parent, second)).toBe(false)
    expect(second.blocks).toBeUndefined()
    expect(scheduler.running()).toBe(2)
    expect(scheduler.waiting()).toBe(1)
    // Admitted once its group has room, from its prompt's cached full blocks (the last token is computed again).
    scheduler.finish(parent)
    const plan = scheduler.schedule()
    const row = plan.rows.find((r) => r.seq === second)
    expect(row).toEqual({ seq: second, count: 1 })
    expect(second.computed).toBe(8)
  })

  it("a fork obeys the global running cap too", () => {
    const kv = kvOf(64)
    const scheduler = makeScheduler(kv, { maxRunning: 2, maxRunningPerGroup: 2 })
    const parent = sequence(1, prompt(4))
    const stranger = sequence(2, prompt(4, 500))
    scheduler.submit(parent)
    scheduler.submit(stranger)
    runStep(kv, scheduler.schedule())
    expect(scheduler.adopt(parent, sequence(1, prompt(4)))).toBe(false)
    expect(scheduler.running()).toBe(2)
  })

  it("never exceeds the caps, and every sequence is eventually served", () => {
    fc.assert(
      fc.property(
        fc.array(fc.record({ group: fc.integer({ min: 0, max: 3 }), length: fc.integer({ min: 1, max: 12 }) }), {
          minLength: 1,
          maxLength: 30,
        }),
        fc.integer({ min: 1, max: 6 }),
        fc.integer({ min: 1, max: 4 }),
        (specs, maxRunning, perGroup) => {
          const kv = kvOf(128)
          const scheduler = makeScheduler(kv, { maxRunning, maxRunningPerGroup: perGroup })
          const seqs = specs.map((s, i) => sequence(s.group, prompt(s.length, 1000 * i)))
          for (const s of seqs) scheduler.submit(s)
          const done = new Set<ScheduledSequence>()
          for (let step = 0; step < 1000 && done.size < seqs.length; step++) {
            const plan = scheduler.schedule()
            expect(plan.starved).toEqual([])
            expect(scheduler.running()).toBeLessThanOrEqual(maxRunning)
            const perGroupNow = new Map<number, number>()
            for (const { seq } of plan.rows) perGroupNow.set(seq.group, (perGroupNow.get(seq.group) ?? 0) + 1)
            for (const n of perGroupNow.values()) expect(n).toBeLessThanOrEqual(perGroup)
            runStep(kv, plan)
            // A sequence is done after two generated tokens.
            for (const { seq } of plan.rows)
              if (seq.tokens.length >= specs[seqs.indexOf(seq)]!.length + 2) {
                scheduler.finish(seq)
                done.add(seq)
              }
          }
          expect(done.size).toBe(seqs.length)
          expect(kv.stats().usedBlocks).toBe(0)
        },
      ),
    )
  })
})
