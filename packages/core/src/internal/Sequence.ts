/**
 * What the engine keeps of a request and of each of its samples (sequences) while they generate.
 */
import type { ResolvedEarlyExit } from "../EarlyExit.js"
import type { GenerationSink } from "../Engine.js"
import type { Rng, SamplingParams } from "../Sampler.js"
import type { ScheduledSequence } from "../Scheduler.js"
import type { DetokenizerStream } from "../Tokenizer.js"

/** One sample of a request, as the engine loop sees it. */
export interface Sequence extends ScheduledSequence {
  readonly request: RequestState
  readonly sample: number
  readonly rng: Rng
  readonly detokenizer: DetokenizerStream
  generated: number
  /** Its generated tokens by the layer count of the exit that produced them (its summary's histogram). */
  readonly exitHistogram: Record<number, number>
  /**
   * Recompute strategy: the hidden state of each position whose K/V wait for recomputation, at the layer they stop
   * at (its exit). Which positions wait, and from which layer, the KV cache's fill levels say: position p waits at
   * layer l when p ≥ `kv.filled(blocks, l)`.
   */
  readonly exitStates: Map<number, Float32Array>
  /** Positions [0, exact) have K/V equal to a full-depth computation; only those enter the prefix cache. */
  exact: number
}

export interface RequestState {
  readonly maxTokens: number
  readonly forcedTokens: ReadonlyArray<number> | undefined
  readonly sampling: SamplingParams
  /** Samples from the logits, or scores forced tokens with them; a greedy request takes the head's top token. */
  readonly usesLogits: boolean
  readonly exit: ResolvedEarlyExit
  readonly sink: GenerationSink
  /** Ended, failed or cancelled: the sink hears nothing more. */
  closed: boolean
  /** The scheduler's group of the request's sequences. */
  readonly group: number
  /** Self-speculative decoding: the draft exit (its index in spec.exits), the most tokens drafted, the threshold. */
  readonly speculative:
    | { readonly exitIndex: number; readonly maxDraft: number; readonly threshold: number }
    | undefined
  /** Samples 1..n-1, started by forking sample 0 once the prompt is computed; a sample with no room yet waits (undefined). */
  readonly forks: Array<() => Sequence | undefined>
  live: number
}

/**
 * A decode row on its way through the segments: its pending tokens that joined (recompute strategy), then its
 * current token.
 */
export interface DecodeRow {
  readonly seq: Sequence
  /** Positions in this row, consecutive, the current token last. */
  positions: Array<number>
  /** [positions × hidden] states entering the next segment. */
  hidden: Float32Array
  /** The current token's state at the previous exit (saturation measure). */
  previous: Float32Array
}
