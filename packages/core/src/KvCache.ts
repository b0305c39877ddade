/**
 * The KvCache service: the block manager over the runner's paged K/V pools.
 *
 * Blocks are reference-counted. Full blocks whose K/V are computed are published in a prefix cache under a hash
 * of their tokens and of everything before them; a new sequence whose prompt starts with cached blocks reuses
 * them. A block that no sequence holds but that is published stays cached (evictable) until its space is needed.
 */
import { Context, Effect, Layer } from "effect"
import { type KvCacheOptions, makeKvCache } from "./internal/KvCacheImpl.js"
import { ModelRunner } from "./ModelRunner.js"

export type { KvCacheOptions } from "./internal/KvCacheImpl.js"

export interface KvCacheStats {
  readonly blockSize: number
  readonly totalBlocks: number
  /** Blocks held by at least one sequence. */
  readonly usedBlocks: number
  /** Blocks on the free list. */
  readonly freeBlocks: number
  /** Blocks held only by the prefix cache (reusable, evicted when space is needed). */
  readonly cachedBlocks: number
  readonly bytesPerBlock: number
  readonly usedBytes: number
  /** Full prompt blocks looked up in the prefix cache, and how many were found. */
  readonly prefixQueries: number
  readonly prefixHits: number
  /** prefixHits / prefixQueries (0 when there were no queries). */
  readonly prefixHitRate: number
}

/** A sequence's block table. Owned by the KvCache; read it, change it only through the KvCache. */
export interface SequenceBlocks {
  readonly id: number
  /** Physical block ids covering positions [0, reserved). */
  readonly blocks: ReadonlyArray<number>
  /** Positions with a reserved slot. */
  readonly reserved: number
  /** Leading positions whose K/V came from the prefix cache when the sequence was opened. */
  readonly cachedPrefix: number
}

export interface KvCacheShape {
  readonly blockSize: number
  readonly numBlocks: number
  /** Layers with K/V (each has its own fill level per sequence). */
  readonly layers: number
  /** Blocks needed to hold `positions` positions. */
  readonly blocksFor: (positions: number) => number
  /**
   * Opens a sequence for `tokens` (its prompt, or prompt + generated tokens when it is recomputed after
   * preemption), reusing cached blocks for its longest cached prefix of full blocks — never the block holding
   * the last token, which must be computed to produce logits — and reserving slots for all of `tokens`.
   * Returns undefined, changing nothing, when the free and evictable blocks do not suffice.
   */
  readonly open: (tokens: ReadonlyArray<number>) => SequenceBlocks | undefined
  /**
   * Reserves slots for `count` more positions, allocating blocks as needed, and copy-on-write of a shared
   * last block before it is written. Returns false, changing nothing, when the pool cannot supply the blocks.
   */
  readonly reserve: (seq: SequenceBlocks, count: number) => boolean
  /** A second sequence sharing all of `seq`'s blocks (n > 1 samples of one prompt). */
  readonly fork: (seq: SequenceBlocks) => SequenceBlocks
  /**
   * Records that positions [0, computed) of `seq` hold the K/V of `tokens[0, computed)` in every layer, and
   * publishes its full blocks in the prefix cache.
   */
  readonly commit: (seq: SequenceBlocks, tokens: ReadonlyArray<number>, computed: number) => void
  /** Releases the sequence's blocks; calling it twice for one sequence is a no-op. */
  readonly free: (seq: SequenceBlocks) => void
  /**
   * Rolls `seq` back to its first `positions` positions (speculative decoding's rejected drafts): the reservation
   * shrinks, blocks past it are released, and fill levels are capped. Committed (published) positions stay.
   */
  readonly truncate: (seq: SequenceBlocks, positions: number) => void
  /** The pool slot (block · blockSize + offset) of `position`. */
  readonly slot: (seq: SequenceBlocks, position: number) => number
  /** Per-layer fill level: positions of `seq` whose K/V are written in `layer` (contiguous from 0). */
  readonly filled: (seq: SequenceBlocks, layer: number) => number
  /** Records that `layer` holds K/V for positions [0, upTo) of `seq`. */
  readonly markFilled: (seq: SequenceBlocks, layer: number, upTo: number) => void
  /** Drops every cached block no sequence holds; returns how many. */
  readonly evictCached: () => number
  readonly stats: () => KvCacheStats
}

export class KvCache extends Context.Tag("@offramp/core/KvCache")<KvCache, KvCacheShape>() {
  /** The KvCache over the runner's K/V pools. */
  static readonly layer: Layer.Layer<KvCache, never, ModelRunner> = Layer.effect(
    KvCache,
    Effect.map(ModelRunner, (runner) =>
      makeKvCache({
        numBlocks: runner.numBlocks,
        blockSize: runner.blockSize,
        layers: runner.spec.dims.layers,
        bytesPerBlock: runner.bytesPerBlock,
        copyBlock: (from, to) => runner.copyBlock(from, to),
      }),
    ),
  )
}

/** The KvCache over the runner's K/V pools. */
export const layer = KvCache.layer

/** A KvCache over a fixed pool with no K/V storage, for tests and tools that run without a ModelRunner. */
export const layerWithoutRunner = (options: KvCacheOptions): Layer.Layer<KvCache> =>
  Layer.sync(KvCache, () => makeKvCache(options))
