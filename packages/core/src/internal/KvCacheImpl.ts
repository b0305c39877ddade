/**
 * The block manager behind the KvCache service: reference-counted blocks, a free list, and a vLLM-style prefix
 * cache whose unreferenced blocks stay findable until evicted, least recently freed first.
 *
 * Synchronous and single-threaded (the engine loop is the only caller). Every operation touches only the blocks it
 * names: the free list is a stack, the evictable blocks a doubly linked LRU list over typed arrays.
 *
 * A block's hash covers its tokens and its parent's hash, hence its whole prefix. A lookup also compares the stored
 * tokens and parent hash of the entry, so a hit needs an exact match of the block and a 53-bit hash match of
 * everything before it.
 */
import type { KvCacheShape, KvCacheStats, SequenceBlocks } from "../KvCache.js"

export interface KvCacheOptions {
  readonly numBlocks: number
  readonly blockSize: number
  readonly layers: number
  /** Bytes of K/V one block holds across all layers (for stats). */
  readonly bytesPerBlock: number
  /** Copies block `from` to block `to` in every layer's K and V pools (copy-on-write). */
  readonly copyBlock: (from: number, to: number) => void
}

/** Where a block is: held by a sequence, on the free list, or only in the prefix cache. */
export type BlockState = "used" | "free" | "cached"

export interface BlockInfo {
  readonly ref: number
  readonly state: BlockState
  readonly published: boolean
}

/** The KvCache plus introspection for tests and diagnostics. */
export interface KvCacheImpl extends KvCacheShape {
  readonly inspectBlock: (block: number) => BlockInfo
  /** Walks every internal structure (O(numBlocks)); throws an Error describing the first inconsistency. */
  readonly checkInvariants: () => void
}

const USED = 0
const FREE = 1
const CACHED = 2
const stateNames: ReadonlyArray<BlockState> = ["used", "free", "cached"]

// The parent hash of a sequence's first block. hashBlock never returns it, so no chain can loop back to the root.
const ROOT_HASH = 0

/** cyrb53 (two 32-bit lanes, 53-bit result) over tokens[start, end), seeded with the parent block's hash. */
const hashBlock = (parent: number, tokens: ReadonlyArray<number>, start: number, end: number): number => {
  let h1 = 0xdeadbeef ^ (parent >>> 0)
  let h2 = 0x41c6ce57 ^ Math.floor(parent / 0x1_0000_0000)
  for (let i = start; i < end; i++) {
    const t = tokens[i]
    h1 = Math.imul(h1 ^ t, 2654435761)
    h2 = Math.imul(h2 ^ t, 1597334677)
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507)
  h1 ^= Math.imul(h2 ^ (h2 >>> 13), 3266489909)
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507)
  h2 ^= Math.imul(h1 ^ (h1 >>> 13), 3266489909)
  const h = 0x1_0000_0000 * (0x1fffff & h2) + (h1 >>> 0)
  return h === ROOT_HASH ? 1 : h
}

/** The cache's mutable view of a sequence; callers see it through the readonly SequenceBlocks. */
class Seq implements SequenceBlocks {
  live = true
  constructor(
    readonly id: number,
    readonly owner: object,
    public blocks: Array<number>,
    public reserved: number,
    readonly cachedPrefix: number,
    /** Per-layer fill level, contiguous from position 0. */
    readonly fill: Int32Array,
    /** Leading blocks whose chain hash is known (published by this sequence, found in the cache, or duplicates). */
    public hashed: number,
    /** Hash of block `hashed - 1` (ROOT_HASH when none): the parent of the next block to publish. */
    public chainHash: number,
  ) {}
}

const positiveInt = (name: string, n: number) => {
  if (!Number.isInteger(n) || n < 1) throw new Error(`KvCache: ${name} must be a positive integer, got ${n}`)
}

export const makeKvCache = (options: KvCacheOptions): KvCacheImpl => {
  const { numBlocks, blockSize: bs, layers, bytesPerBlock, copyBlock } = options
  positiveInt("numBlocks", numBlocks)
  positiveInt("blockSize", bs)
  positiveInt("layers", layers)
  // Identifies this cache's sequences, so one from another cache is rejected.
  const owner = {}

  const ref = new Int32Array(numBlocks)
  const state = new Uint8Array(numBlocks).fill(FREE)
  const published = new Uint8Array(numBlocks)
  const blockHash = new Float64Array(numBlocks)
  const parentHash = new Float64Array(numBlocks)
  const blockTokens = new Int32Array(numBlocks * bs)
  const byHash = new Map<number, number>()

  // Free list as a stack, filled so that a fresh cache hands out blocks 0, 1, 2, ...
  const freeStack = new Int32Array(numBlocks)
  for (let i = 0; i < numBlocks; i++) freeStack[i] = numBlocks - 1 - i
  let freeCount = numBlocks

  // Cached blocks (ref 0, published), head = least recently freed = evicted first.
  const prev = new Int32Array(numBlocks).fill(-1)
  const next = new Int32Array(numBlocks).fill(-1)
  let head = -1
  let tail = -1
  let cachedCount = 0

  let nextId = 0
  let prefixQueries = 0
  let prefixHits = 0
  // Prefix hits found by `open` before it knows whether it can succeed; never more than numBlocks distinct blocks.
  const hitScratch = new Int32Array(numBlocks)

  const blocksFor = (positions: number) => Math.ceil(positions / bs)

  const pushCached = (b: number) => {
    prev[b] = tail
    next[b] = -1
    if (tail >= 0) next[tail] = b
    else head = b
    tail = b
    state[b] = CACHED
    cachedCount++
  }

  const unlinkCached = (b: number) => {
    const p = prev[b]
    const n = next[b]
    if (p >= 0) next[p] = n
    else head = n
    if (n >= 0) prev[n] = p
    else tail = p
    prev[b] = -1
    next[b] = -1
    cachedCount--
  }

  const unpublish = (b: number) => {
    if (byHash.get(blockHash[b]) === b) byHash.delete(blockHash[b])
    published[b] = 0
  }

  const pushFree = (b: number) => {
    state[b] = FREE
    freeStack[freeCount++] = b
  }

  /** Takes a block with ref 1: from the free list, else by evicting the LRU cached block. Callers check supply. */
  const allocate = (): number => {
    let b: number
    if (freeCount > 0) {
      b = freeStack[--freeCount]
    } else {
      b = head
      if (b < 0) throw new Error("KvCache: allocate with no free or cached block")
      unlinkCached(b)
      unpublish(b)
    }
    state[b] = USED
    ref[b] = 1
    return b
  }

  const release = (b: number) => {
    if (ref[b] <= 0) throw new Error(`KvCache: block ${b} released with ref ${ref[b]}`)
    if (--ref[b] > 0) return
    if (published[b]) pushCached(b)
    else pushFree(b)
  }

  const live = (seq: SequenceBlocks): Seq => {
    if (seq instanceof Seq && seq.owner === owner && seq.live) return seq
    throw new Error(`KvCache: sequence ${seq.id} is not open in this cache`)
  }

  const checkLayer = (layer: number) => {
    if (!Number.isInteger(layer) || layer < 0 || layer >= layers) throw new Error(`KvCache: no layer ${layer}`)
  }

  const checkPositions = (s: Seq, upTo: number, what: string) => {
    if (!Number.isInteger(upTo) || upTo < 0 || upTo > s.reserved) {
      throw new Error(`KvCache: ${what} ${upTo} outside [0, ${s.reserved}] of sequence ${s.id}`)
    }
  }

  /** The published block with this hash whose parent hash and tokens match exactly, or -1. */
  const find = (hash: number, parent: number, tokens: ReadonlyArray<number>, start: number): number => {
    const b = byHash.get(hash)
    if (b === undefined || parentHash[b] !== parent) return -1
    const base = b * bs
    for (let j = 0; j < bs; j++) if (blockTokens[base + j] !== tokens[start + j]) return -1
    return b
  }

  const open = (tokens: ReadonlyArray<number>): SequenceBlocks | undefined => {
    const n = tokens.length
    const needed = blocksFor(n)
    // Never the block holding the last token: its logits must be computed.
    const candidates = n > 0 ? Math.floor((n - 1) / bs) : 0
    let hits = 0
    let hitsCached = 0
    let parent = ROOT_HASH
    while (hits < candidates && hits < numBlocks) {
      const start = hits * bs
      const h = hashBlock(parent, tokens, start, start + bs)
      const b = find(h, parent, tokens, start)
      if (b < 0) break
      hitScratch[hits++] = b
      if (ref[b] === 0) hitsCached++
      parent = h
    }
    // Cached hits leave the evictable pool, so they cannot also supply the new blocks.
    // A failed open counts no queries: the engine retries it every step until blocks free up.
    if (needed - hits > freeCount + cachedCount - hitsCached) return undefined
    prefixQueries += candidates
    prefixHits += hits
    const blocks: Array<number> = []
    for (let i = 0; i < hits; i++) {
      const b = hitScratch[i]
      if (ref[b] === 0) {
        unlinkCached(b)
        state[b] = USED
      }
      ref[b]++
      blocks.push(b)
    }
    for (let i = hits; i < needed; i++) blocks.push(allocate())
    const cachedPrefix = hits * bs
    return new Seq(nextId++, owner, blocks, n, cachedPrefix, new Int32Array(layers).fill(cachedPrefix), hits, parent)
  }

  const reserve = (seq: SequenceBlocks, count: number): boolean => {
    const s = live(seq)
    if (!Number.isInteger(count) || count < 0) throw new Error(`KvCache: cannot reserve ${count} positions`)
    if (count === 0) return true
    const target = s.reserved + count
    const grow = blocksFor(target) - s.blocks.length
    const last = s.blocks.length - 1
    // The new positions start inside the last block: if another sequence holds it (fork), write to a copy.
    const cow = s.reserved % bs !== 0 && ref[s.blocks[last]] > 1
    if (grow + (cow ? 1 : 0) > freeCount + cachedCount) return false
    if (cow) {
      const old = s.blocks[last]
      const copy = allocate()
      try {
        copyBlock(old, copy)
      } catch (e) {
        release(copy)
        throw e
      }
      s.blocks[last] = copy
      release(old)
    }
    for (let i = 0; i < grow; i++) s.blocks.push(allocate())
    s.reserved = target
    return true
  }

  const fork = (seq: SequenceBlocks): SequenceBlocks => {
    const s = live(seq)
    for (const b of s.blocks) ref[b]++
    return new Seq(nextId++, owner, s.blocks.slice(), s.reserved, s.cachedPrefix, s.fill.slice(), s.hashed, s.chainHash)
  }

  const commit = (seq: SequenceBlocks, tokens: ReadonlyArray<number>, computed: number) => {
    const s = live(seq)
    checkPositions(s, computed, "commit of")
    if (tokens.length < computed)
      throw new Error(`KvCache: commit of ${computed} positions with ${tokens.length} tokens`)
    const fill = s.fill
    for (let l = 0; l < layers; l++) if (fill[l] < computed) fill[l] = computed
    const full = Math.floor(computed / bs)
    let parent = s.chainHash
    for (let i = s.hashed; i < full; i++) {
      const start = i * bs
      const h = hashBlock(parent, tokens, start, start + bs)
      const b = s.blocks[i]
      // An existing entry (an identical block, or a collision) wins; this sequence keeps its own block either way.
      if (published[b] === 0 && !byHash.has(h)) {
        published[b] = 1
        blockHash[b] = h
        parentHash[b] = parent
        const base = b * bs
        for (let j = 0; j < bs; j++) blockTokens[base + j] = tokens[start + j]
        byHash.set(h, b)
      }
      parent = h
    }
    if (full > s.hashed) {
      s.hashed = full
      s.chainHash = parent
    }
  }

  const free = (seq: SequenceBlocks) => {
    if (seq instanceof Seq && seq.owner === owner && !seq.live) return
    const s = live(seq)
    s.live = false
    // Last block first: a prompt's later blocks are then evicted before its earlier ones, which more prompts share.
    for (let i = s.blocks.length - 1; i >= 0; i--) release(s.blocks[i])
    // Leave no stale block ids for a caller to write through.
    s.blocks = []
    s.reserved = 0
  }

  const truncate = (seq: SequenceBlocks, positions: number) => {
    const s = live(seq)
    checkPositions(s, positions, "truncation to")
    if (positions < s.hashed * bs)
      throw new Error(`KvCache: truncation to ${positions} cuts into the committed blocks of sequence ${s.id}`)
    const keep = blocksFor(positions)
    for (let i = s.blocks.length - 1; i >= keep; i--) release(s.blocks[i])
    s.blocks.length = keep
    s.reserved = positions
    for (let l = 0; l < layers; l++) if (s.fill[l] > positions) s.fill[l] = positions
  }

  const slot = (seq: SequenceBlocks, position: number): number => {
    const s = live(seq)
    if (!Number.isInteger(position) || position < 0 || position >= s.reserved) {
      throw new Error(`KvCache: position ${position} not reserved in sequence ${s.id} (reserved ${s.reserved})`)
    }
    const i = Math.floor(position / bs)
    return s.blocks[i] * bs + (position - i * bs)
  }

  const filled = (seq: SequenceBlocks, layer: number): number => {
    const s = live(seq)
    checkLayer(layer)
    return s.fill[layer]
  }

  const markFilled = (seq: SequenceBlocks, layer: number, upTo: number) => {
    const s = live(seq)
    checkLayer(layer)
    checkPositions(s, upTo, "fill level")
    if (s.fill[layer] < upTo) s.fill[layer] = upTo
  }

  const evictCached = (): number => {
    let count = 0
    while (head >= 0) {
      const b = head
      unlinkCached(b)
      unpublish(b)
      pushFree(b)
      count++
    }
    return count
  }

  const stats = (): KvCacheStats => {
    const usedBlocks = numBlocks - freeCount - cachedCount
    return {
      blockSize: bs,
      totalBlocks: numBlocks,
      usedBlocks,
      freeBlocks: freeCount,
      cachedBlocks: cachedCount,
      bytesPerBlock,
      usedBytes: usedBlocks * bytesPerBlock,
      prefixQueries,
      prefixHits,
      prefixHitRate: prefixQueries === 0 ? 0 : prefixHits / prefixQueries,
    }
  }

  const inspectBlock = (b: number): BlockInfo => {
    if (!Number.isInteger(b) || b < 0 || b >= numBlocks) throw new Error(`KvCache: no block ${b}`)
    return { ref: ref[b], state: stateNames[state[b]], published: published[b] === 1 }
  }

  const checkInvariants = () => {
    const fail = (msg: string): never => {
      throw new Error(`KvCache invariant: ${msg}`)
    }
    const seen = new Uint8Array(numBlocks)
    for (let i = 0; i < freeCount; i++) {
      const b = freeStack[i]
      if (seen[b]) fail(`block ${b} twice on the free list`)
      seen[b] = 1
      if (state[b] !== FREE || ref[b] !== 0 || published[b]) fail(`free block ${b} is not free`)
    }
    let cached = 0
    for (let b = head, p = -1; b >= 0; p = b, b = next[b]) {
      if (seen[b]) fail(`block ${b} both free and cached, or cached twice`)
      seen[b] = 1
      if (prev[b] !== p) fail(`LRU link broken at block ${b}`)
      if (state[b] !== CACHED || ref[b] !== 0 || !published[b]) fail(`cached block ${b} is not cached`)
      cached++
    }
    if (cached !== cachedCount) fail(`cachedCount ${cachedCount} but ${cached} blocks on the LRU list`)
    for (let b = 0; b < numBlocks; b++) {
      if (!seen[b] && (state[b] !== USED || ref[b] <= 0)) fail(`block ${b} is on no list and not used`)
      if (published[b] && byHash.get(blockHash[b]) !== b) fail(`published block ${b} missing from the hash map`)
    }
    for (const [h, b] of byHash) if (!published[b] || blockHash[b] !== h) fail(`stale hash entry for block ${b}`)
  }

  return {
    blockSize: bs,
    numBlocks,
    layers,
    blocksFor,
    open,
    reserve,
    fork,
    commit,
    free,
    slot,
    filled,
    markFilled,
    truncate,
    evictCached,
    stats,
    inspectBlock,
    checkInvariants,
  }
}
