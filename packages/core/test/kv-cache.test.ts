import { describe, expect, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import fc from "fast-check"
import { type KvCacheImpl, makeKvCache } from "../src/internal/KvCacheImpl.js"
import {
  KvCache,
  layer as KvCacheLive,
  layerWithoutRunner as kvCacheLayer,
  type SequenceBlocks,
} from "../src/KvCache.js"
import { ModelRunner, type ModelRunnerShape } from "../src/ModelRunner.js"

const make = (numBlocks: number, blockSize: number, copies: Array<[number, number]> = [], layers = 2) =>
  makeKvCache({ numBlocks, blockSize, layers, bytesPerBlock: 64, copyBlock: (from, to) => copies.push([from, to]) })

const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i)

const opened = (kv: KvCacheImpl, tokens: ReadonlyArray<number>): SequenceBlocks => {
  const seq = kv.open(tokens)
  if (seq === undefined) throw new Error("open failed")
  return seq
}

/** Opens and computes a whole prompt, publishing its full blocks. */
const prefill = (kv: KvCacheImpl, tokens: ReadonlyArray<number>): SequenceBlocks => {
  const seq = opened(kv, tokens)
  kv.commit(seq, tokens, tokens.length)
  return seq
}

const snapshot = (kv: KvCacheImpl, seqs: ReadonlyArray<SequenceBlocks> = []) => ({
  stats: kv.stats(),
  blocks: range(0, kv.numBlocks).map(kv.inspectBlock),
  tables: seqs.map((s) => [[...s.blocks], s.reserved]),
})

describe("KvCache prefix cache", () => {
  it("reuses the full blocks of a repeated prompt, never the block holding the last token", () => {
    const kv = make(16, 4)
    const prompt = range(100, 110) // 10 tokens: 2 full blocks + 1 partial
    const a = prefill(kv, prompt)
    expect(a.cachedPrefix).toBe(0)
    const aBlocks = [...a.blocks]
    kv.free(a)
    expect(kv.stats()).toMatchObject({ usedBlocks: 0, cachedBlocks: 2, freeBlocks: 14 })

    const b = opened(kv, prompt)
    expect(b.cachedPrefix).toBe(8)
    expect(b.blocks.slice(0, 2)).toEqual(aBlocks.slice(0, 2))
    expect(b.reserved).toBe(10)
    expect(kv.filled(b, 0)).toBe(8)
    expect(kv.filled(b, 1)).toBe(8)
    expect(kv.stats()).toMatchObject({ prefixQueries: 4, prefixHits: 2, prefixHitRate: 0.5, cachedBlocks: 0 })

    // 8 tokens end exactly on a block boundary: the second block holds the last token, so only one block is reused.
    const exact = prefill(kv, range(200, 208))
    const c = opened(kv, range(200, 208))
    expect(c.cachedPrefix).toBe(4)
    expect(c.blocks[0]).toBe(exact.blocks[0])
    expect(c.blocks[1]).not.toBe(exact.blocks[1])
    expect(kv.inspectBlock(exact.blocks[0]).ref).toBe(2)
    kv.checkInvariants()
  })

  it("reuses the prefix up to the first differing block", () => {
    const kv = make(16, 4)
    const a = prefill(kv, range(0, 13))
    const b = opened(kv, [...range(0, 4), ...range(50, 59)])
    expect(b.cachedPrefix).toBe(4)
    expect(b.blocks[0]).toBe(a.blocks[0])
    expect(b.blocks.slice(1)).not.toContain(a.blocks[1])
    // A block with the same tokens under a different prefix is a different block.
    const c = opened(kv, [...range(50, 54), ...range(4, 8), 99])
    expect(c.cachedPrefix).toBe(0)
    expect(kv.stats()).toMatchObject({ prefixQueries: 3 + 3 + 2, prefixHits: 1 })
    kv.checkInvariants()
  })

  it("evicts cached blocks least recently freed first, after the free list", () => {
    const kv = make(4, 2)
    const a = prefill(kv, [1, 2])
    const b = prefill(kv, [3, 4])
    const c = prefill(kv, [5, 6])
    expect([a.blocks, b.blocks, c.blocks]).toEqual([[0], [1], [2]])
    kv.free(b)
    kv.free(a)
    kv.free(c)
    expect(kv.stats()).toMatchObject({ freeBlocks: 1, cachedBlocks: 3 })

    // The free block first, then b's (freed first).
    const d = opened(kv, [7, 8, 9, 10])
    expect(d.blocks).toEqual([3, 1])
    // b's prompt is gone from the cache; the allocation evicts a's block, then c's.
    const e = opened(kv, [3, 4, 0])
    expect(e.cachedPrefix).toBe(0)
    expect(e.blocks).toEqual([0, 2])
    expect(kv.stats()).toMatchObject({ usedBlocks: 4, freeBlocks: 0, cachedBlocks: 0 })
    kv.checkInvariants()
  })

  it("frees a sequence's blocks last first, so a prompt's later blocks are evicted before its first", () => {
    const kv = make(4, 2)
    kv.free(prefill(kv, [1, 2, 3, 4, 5, 6]))
    expect(kv.stats()).toMatchObject({ cachedBlocks: 3, freeBlocks: 1 })
    const x = opened(kv, [9, 9, 9, 9]) // the free block, then block 2 ([5, 6]) evicted
    expect(x.blocks).toEqual([3, 2])
    kv.free(x)
    expect(opened(kv, [1, 2, 3, 4, 7]).cachedPrefix).toBe(4)
  })

  it("publishes an identical block once; the later sequence keeps its own block", () => {
    const kv = make(8, 2)
    const prompt = [1, 2, 3, 4, 5]
    const a = opened(kv, prompt)
    const b = opened(kv, prompt)
    const aBlocks = [...a.blocks]
    kv.commit(a, prompt, 5)
    kv.commit(b, prompt, 5)
    expect(a.blocks.slice(0, 2).map((x) => kv.inspectBlock(x).published)).toEqual([true, true])
    expect(b.blocks.map((x) => kv.inspectBlock(x).published)).toEqual([false, false, false])
    kv.free(a)
    kv.free(b)
    expect(kv.stats()).toMatchObject({ cachedBlocks: 2, freeBlocks: 6 })
    expect(opened(kv, prompt).blocks.slice(0, 2)).toEqual(aBlocks.slice(0, 2))
    kv.checkInvariants()
  })

  it("evictCached drops every cached block and its hash", () => {
    const kv = make(8, 2)
    kv.free(prefill(kv, [1, 2, 3, 4, 5]))
    expect(kv.evictCached()).toBe(2)
    expect(kv.stats()).toMatchObject({ freeBlocks: 8, cachedBlocks: 0 })
    expect(opened(kv, [1, 2, 3, 4, 5]).cachedPrefix).toBe(0)
    kv.checkInvariants()
  })
})

describe("KvCache sequences", () => {
  it("copies a shared last block on write after fork", () => {
    const copies: Array<[number, number]> = []
    const kv = make(8, 4, copies)
    const prompt = range(0, 6)
    const a = prefill(kv, prompt)
    const f = kv.fork(a)
    expect(f.id).not.toBe(a.id)
    expect(f.blocks).toEqual(a.blocks)
    expect(f.reserved).toBe(6)
    expect(kv.filled(f, 1)).toBe(6)
    expect(a.blocks.map((b) => kv.inspectBlock(b).ref)).toEqual([2, 2])

    const shared = a.blocks[1]
    expect(kv.reserve(f, 1)).toBe(true)
    expect(copies).toEqual([[shared, f.blocks[1]]])
    expect(f.blocks[0]).toBe(a.blocks[0])
    expect(f.blocks[1]).not.toBe(shared)
    expect(a.blocks[1]).toBe(shared)
    expect(kv.inspectBlock(shared).ref).toBe(1)
    expect(kv.filled(f, 0)).toBe(6)

    // The original now holds its last block alone: no second copy.
    expect(kv.reserve(a, 3)).toBe(true)
    expect(copies).toHaveLength(1)
    expect(a.blocks).toHaveLength(3)
    expect(kv.slot(a, 6)).not.toBe(kv.slot(f, 6))
    kv.checkInvariants()
  })

  it("does not copy when the shared last block is full", () => {
    const copies: Array<[number, number]> = []
    const kv = make(8, 4, copies)
    const a = prefill(kv, range(0, 8))
    const f = kv.fork(a)
    expect(kv.reserve(f, 1)).toBe(true)
    expect(copies).toEqual([])
    expect(f.blocks.slice(0, 2)).toEqual(a.blocks)
    expect(f.blocks).toHaveLength(3)
  })

  it("open returns undefined and changes nothing when the pool is too small", () => {
    const kv = make(4, 2)
    const a = prefill(kv, range(0, 6))
    const before = snapshot(kv, [a])
    expect(kv.open(range(10, 14))).toBeUndefined()
    expect(snapshot(kv, [a])).toEqual(before)

    const aBlocks = [...a.blocks]
    // 1 free + 3 cached, but the 2 cached hits cannot also be evicted to supply the 3 new blocks.
    kv.free(a)
    const cached = snapshot(kv)
    expect(kv.open([...range(0, 4), 7, 8, 9, 10, 11, 12])).toBeUndefined()
    expect(snapshot(kv)).toEqual(cached)
    const ok = opened(kv, [...range(0, 4), 7, 8, 9, 10])
    expect(ok.cachedPrefix).toBe(4)
    expect(ok.blocks.slice(0, 2)).toEqual(aBlocks.slice(0, 2))
    kv.checkInvariants()
  })

  it("reserve returns false and changes nothing when the pool cannot supply the blocks", () => {
    const copies: Array<[number, number]> = []
    const kv = make(3, 2, copies)
    const a = prefill(kv, range(0, 3))
    const f = kv.fork(a)
    const before = snapshot(kv, [a, f])
    // Needs a copy of the shared last block plus one new block; only one block is free.
    expect(kv.reserve(f, 2)).toBe(false)
    expect(snapshot(kv, [a, f])).toEqual(before)
    expect(copies).toEqual([])
    expect(kv.reserve(f, 1)).toBe(true)
    expect(copies).toHaveLength(1)
  })

  it("free is idempotent and never double-frees", () => {
    const kv = make(4, 2)
    const a = prefill(kv, range(0, 5))
    const f = kv.fork(a)
    kv.free(a)
    kv.free(a)
    expect(kv.stats().usedBlocks).toBe(3)
    kv.free(f)
    kv.free(f)
    kv.free(a)
    expect(kv.stats()).toMatchObject({ usedBlocks: 0, cachedBlocks: 2, freeBlocks: 2 })
    kv.checkInvariants()
    const all = [opened(kv, [9, 9, 9]), opened(kv, [8, 8, 8])]
    expect(new Set(all.flatMap((s) => s.blocks)).size).toBe(4)
    expect(() => kv.slot(a, 0)).toThrow()
    expect(a.blocks).toEqual([])
  })

  it("maps positions to slots and rejects unreserved positions", () => {
    const kv = make(8, 4)
    kv.free(opened(kv, range(0, 4)))
    const s = opened(kv, range(10, 19))
    expect(s.blocks).toEqual([0, 1, 2])
    expect([0, 3, 4, 7, 8].map((p) => kv.slot(s, p))).toEqual([0, 3, 4, 7, 8])
    expect(() => kv.slot(s, 9)).toThrow(Error)
    expect(() => kv.slot(s, -1)).toThrow(Error)
    expect(kv.reserve(s, 1)).toBe(true)
    expect(kv.slot(s, 9)).toBe(9)
  })

  it("tracks per-layer fill levels", () => {
    const kv = make(8, 4, [], 3)
    const s = opened(kv, range(0, 6))
    expect([0, 1, 2].map((l) => kv.filled(s, l))).toEqual([0, 0, 0])
    kv.markFilled(s, 0, 6)
    kv.markFilled(s, 1, 5)
    expect([0, 1, 2].map((l) => kv.filled(s, l))).toEqual([6, 5, 0])
    kv.commit(s, range(0, 6), 6)
    expect([0, 1, 2].map((l) => kv.filled(s, l))).toEqual([6, 6, 6])
    expect(() => kv.markFilled(s, 3, 1)).toThrow(Error)
    expect(() => kv.markFilled(s, 0, 7)).toThrow(Error)
  })

  it.effect("kvCacheLayer and KvCacheLive provide the service", () =>
    Effect.gen(function* () {
      const kv = yield* Effect.provide(
        KvCache,
        kvCacheLayer({ numBlocks: 4, blockSize: 2, layers: 1, bytesPerBlock: 8, copyBlock: () => {} }),
      )
      expect(kv.stats()).toMatchObject({ totalBlocks: 4, blockSize: 2 })
      const copies: Array<[number, number]> = []
      const runner = {
        numBlocks: 6,
        blockSize: 4,
        bytesPerBlock: 128,
        spec: { dims: { layers: 3 } },
        copyBlock: (from: number, to: number) => copies.push([from, to]),
      } as unknown as ModelRunnerShape
      const live = yield* Effect.provide(KvCache, KvCacheLive.pipe(Layer.provide(Layer.succeed(ModelRunner, runner))))
      const s = live.open([1, 2, 3])!
      live.markFilled(s, 2, 3)
      expect(live.filled(s, 2)).toBe(3)
      live.reserve(live.fork(s), 1)
      expect(copies).toEqual([[0, 1]])
      live.reserve(s, 1)
      expect(live.stats()).toMatchObject({ totalBlocks: 6, usedBlocks: 2, usedBytes: 256 })
    }),
  )
})

// ---- Model-based property test ----

type Op =
  | { readonly kind: "open"; readonly tokens: ReadonlyArray<number> }
  | { readonly kind: "reserve"; readonly pick: number; readonly tokens: ReadonlyArray<number> }
  | { readonly kind: "fork"; readonly pick: number }
  | { readonly kind: "commit"; readonly pick: number; readonly amount: number }
  | { readonly kind: "free"; readonly pick: number; readonly twice: boolean }
  | { readonly kind: "evict" }

// A two-letter alphabet makes shared prefixes, and so prefix hits, common.
const tokensArb = (min: number, max: number) =>
  fc.array(fc.integer({ min: 0, max: 1 }), { minLength: min, maxLength: max })

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant("open" as const), tokens: tokensArb(1, 12) }) },
  {
    weight: 3,
    arbitrary: fc.record({ kind: fc.constant("reserve" as const), pick: fc.nat(), tokens: tokensArb(1, 5) }),
  },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant("fork" as const), pick: fc.nat() }) },
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant("commit" as const),
      pick: fc.nat(),
      amount: fc.integer({ min: 0, max: 12 }),
    }),
  },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant("free" as const), pick: fc.nat(), twice: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("evict" as const) }) },
)

interface ModelSeq {
  readonly seq: SequenceBlocks
  /** The sequence's tokens, one per reserved position. */
  readonly tokens: Array<number>
  /** Positions whose K/V the model has written. */
  computed: number
}

// What a slot must hold once a sequence has computed position p: the K/V of its whole prefix up to p.
const contentKey = (tokens: ReadonlyArray<number>, p: number) => `${p}:${tokens.slice(0, p + 1).join("")}`

describe("KvCache model-based", () => {
  it("keeps its invariants under random open/reserve/fork/commit/free", () => {
    let totalHits = 0
    fc.assert(
      fc.property(
        fc.integer({ min: 8, max: 12 }),
        fc.integer({ min: 2, max: 4 }),
        fc.array(opArb, { minLength: 10, maxLength: 60, size: "max" }),
        (numBlocks, bs, ops) => {
          // A simulated K/V pool: each slot holds the prefix whose K/V it stores.
          const pool = new Array<string | undefined>(numBlocks * bs)
          const kv = makeKvCache({
            numBlocks,
            blockSize: bs,
            layers: 2,
            bytesPerBlock: 1,
            copyBlock: (from, to) => {
              for (let j = 0; j < bs; j++) pool[to * bs + j] = pool[from * bs + j]
            },
          })
          const live: Array<ModelSeq> = []

          const check = () => {
            kv.checkInvariants()
            const st = kv.stats()
            expect(st.usedBlocks + st.freeBlocks + st.cachedBlocks).toBe(numBlocks)
            const holders = new Array<number>(numBlocks).fill(0)
            for (const m of live) {
              expect(m.seq.blocks).toHaveLength(kv.blocksFor(m.seq.reserved))
              expect(new Set(m.seq.blocks).size).toBe(m.seq.blocks.length)
              for (const b of m.seq.blocks) holders[b]++
            }
            for (let b = 0; b < numBlocks; b++) {
              const info = kv.inspectBlock(b)
              expect(info.ref).toBe(holders[b])
              expect(info.state === "used").toBe(holders[b] > 0)
              if (info.state === "cached") expect(info.published).toBe(true)
            }
            expect(st.usedBlocks).toBe(holders.filter((h) => h > 0).length)
            // Two live sequences share a slot only for the same position and the same prefix (identical K/V).
            const owners = new Map<number, string>()
            for (const m of live) {
              for (let p = 0; p < m.seq.reserved; p++) {
                const s = kv.slot(m.seq, p)
                const key = contentKey(m.tokens, p)
                const other = owners.get(s)
                if (other !== undefined) expect(other).toBe(key)
                owners.set(s, key)
                // Everything computed (by this sequence, or found in the prefix cache) is intact.
                if (p < m.computed) expect(pool[s]).toBe(key)
              }
              expect(kv.filled(m.seq, 0)).toBe(m.computed)
            }
          }

          for (const op of ops) {
            const m = live.length > 0 && "pick" in op ? live[op.pick % live.length] : undefined
            switch (op.kind) {
              case "open": {
                const before = snapshot(kv)
                const seq = kv.open(op.tokens)
                const needed = kv.blocksFor(op.tokens.length)
                if (seq === undefined) {
                  expect(before.stats.freeBlocks + before.stats.cachedBlocks).toBeLessThan(needed)
                  expect(snapshot(kv)).toEqual(before)
                } else {
                  expect(seq.reserved).toBe(op.tokens.length)
                  expect(seq.cachedPrefix % bs).toBe(0)
                  expect(seq.cachedPrefix).toBeLessThanOrEqual(Math.floor((op.tokens.length - 1) / bs) * bs)
                  totalHits += seq.cachedPrefix / bs
                  live.push({ seq, tokens: [...op.tokens], computed: seq.cachedPrefix })
                }
                break
              }
              case "reserve": {
                if (m === undefined) break
                const before = snapshot(kv, [m.seq])
                const grow = kv.blocksFor(m.seq.reserved + op.tokens.length) - m.seq.blocks.length
                if (kv.reserve(m.seq, op.tokens.length)) {
                  m.tokens.push(...op.tokens)
                } else {
                  expect(before.stats.freeBlocks + before.stats.cachedBlocks).toBeLessThan(grow + 1)
                  expect(snapshot(kv, [m.seq])).toEqual(before)
                }
                break
              }
              case "fork": {
                if (m === undefined) break
                live.push({ seq: kv.fork(m.seq), tokens: [...m.tokens], computed: m.computed })
                break
              }
              case "commit": {
                if (m === undefined) break
                const upTo = Math.min(m.seq.reserved, m.computed + op.amount)
                for (let p = m.computed; p < upTo; p++) pool[kv.slot(m.seq, p)] = contentKey(m.tokens, p)
                kv.commit(m.seq, m.tokens, upTo)
                m.computed = upTo
                break
              }
              case "free": {
                if (m === undefined) break
                kv.free(m.seq)
                if (op.twice) kv.free(m.seq)
                live.splice(live.indexOf(m), 1)
                break
              }
              case "evict": {
                const cached = kv.stats().cachedBlocks
                expect(kv.evictCached()).toBe(cached)
                break
              }
            }
            check()
          }

          for (const m of live) kv.free(m.seq)
          live.length = 0
          check()
          expect(kv.stats().usedBlocks).toBe(0)
          kv.evictCached()
          expect(kv.stats()).toMatchObject({ freeBlocks: numBlocks, cachedBlocks: 0, usedBlocks: 0 })
          kv.checkInvariants()
        },
      ),
      { numRuns: 300 },
    )
    // The generator must actually exercise the prefix cache.
    expect(totalHits).toBeGreaterThan(0)
  })
})

describe("KvCache truncation (speculative decoding's rollback)", () => {
  it("releases the blocks past the kept positions, caps fill levels, and keeps committed blocks", () => {
    const kv = make(8, 4)
    const seq = opened(kv, range(0, 10)) // 3 blocks
    expect(kv.reserve(seq, 6)).toBe(true) // 16 positions: 4 blocks
    kv.commit(seq, range(0, 10), 8) // blocks 0 and 1 are full and published
    kv.markFilled(seq, 1, 16)
    expect(kv.stats().usedBlocks).toBe(4)
    kv.truncate(seq, 9)
    expect(seq.blocks).toHaveLength(3)
    expect(seq.reserved).toBe(9)
    expect(kv.filled(seq, 1)).toBe(9)
    expect(kv.filled(seq, 0)).toBe(8)
    expect(kv.stats()).toMatchObject({ usedBlocks: 3, freeBlocks: 5 })
    // The reservation grows again from there, from free blocks.
    expect(kv.reserve(seq, 7)).toBe(true)
    expect(seq.blocks).toHaveLength(4)
    // Rolling back into committed (published) positions is a bug, not a rollback.
    expect(() => kv.truncate(seq, 7)).toThrow(/cuts into the committed blocks/)
    kv.free(seq)
    expect(kv.stats().usedBlocks).toBe(0)
  })
})
