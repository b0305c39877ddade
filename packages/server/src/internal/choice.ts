/**
 * One choice of a response as its token events arrive: stop strings cut exactly (text that could still become a
 * stop string is held back until it cannot), the chosen tokens' log-probabilities, and early-exit figures.
 */
import type { FinishReason, TokenEvent } from "@offramp/core/Generation"

export interface TokenLogprob {
  readonly token: string
  readonly logprob: number
  /** Offset of the token's text in the choice's text. */
  readonly offset: number
}

/** What a choice releases to the client after one event. */
export interface ChoiceDelta {
  readonly index: number
  readonly text: string
  readonly logprobs: ReadonlyArray<TokenLogprob>
  readonly finishReason: FinishReason | null
}

interface Pending extends TokenLogprob {
  readonly end: number
}

export class Choice {
  /** The text released so far. */
  text = ""
  /** Tokens generated for this choice (up to and including the one that finished it). */
  tokens = 0
  /** Sum of exit layers, and tokens by exit layer. */
  depth = 0
  readonly exits: Record<number, number> = {}
  finishReason: FinishReason | null = null
  readonly logprobs: Array<TokenLogprob> = []
  private held = ""
  /** Length of every event's text so far: released + held. */
  private seen = 0
  private pending: Array<Pending> = []
  private readonly longestStop: number

  constructor(
    readonly index: number,
    private readonly stops: ReadonlyArray<string>,
  ) {
    this.longestStop = Math.max(0, ...stops.map((s) => s.length))
  }

  get done() {
    return this.finishReason !== null
  }

  /** Feeds one event of this choice's sample; undefined once the choice has finished (later events are ignored). */
  push(event: TokenEvent): ChoiceDelta | undefined {
    if (this.done) return undefined
    this.tokens++
    this.depth += event.exitLayer
    this.exits[event.exitLayer] = (this.exits[event.exitLayer] ?? 0) + 1
    const start = this.seen
    this.seen += event.text.length
    // A stop token ends the text; its log-probability is not the client's (OpenAI leaves it out too).
    const stopToken = event.finishReason === "stop"
    if (!stopToken || event.text !== "") {
      this.pending.push({ token: event.text, logprob: event.logprob, offset: start, end: this.seen })
    }
    const buffer = this.held + event.text
    const released = this.text.length
    const cut = this.firstStop(buffer)
    // A stop string that starts before the match may still complete with later text, and the earliest one wins:
    // hold from its start. When the generation ends here, only complete matches count.
    const open = cut >= 0 && event.finishReason === null ? this.holdLength(buffer, buffer.length - cut + 1) : 0
    if (cut >= 0 && open === 0) return this.release(buffer.slice(0, cut), "stop", (p) => p.offset < released + cut)
    if (event.finishReason !== null) return this.release(buffer, event.finishReason, () => true)
    const hold = cut >= 0 ? open : this.holdLength(buffer)
    const out = buffer.slice(0, buffer.length - hold)
    this.held = buffer.slice(buffer.length - hold)
    const upTo = released + out.length
    return this.release(out, null, (p) => p.end <= upTo)
  }

  private release(text: string, finishReason: FinishReason | null, take: (p: Pending) => boolean): ChoiceDelta {
    this.text += text
    if (finishReason !== null) {
      this.finishReason = finishReason
      this.held = ""
    }
    const taken = this.pending.filter(take).map(({ token, logprob, offset }) => ({ token, logprob, offset }))
    this.pending = finishReason !== null ? [] : this.pending.filter((p) => !take(p))
    this.logprobs.push(...taken)
    return { index: this.index, text, logprobs: taken, finishReason }
  }

  /** Where the earliest stop string starts in `text`, or -1. */
  private firstStop(text: string): number {
    let first = -1
    for (const stop of this.stops) {
      const at = text.indexOf(stop)
      if (at >= 0 && (first < 0 || at < first)) first = at
    }
    return first
  }

  /** The longest suffix of `text`, at least `atLeast` long, that is a proper prefix of a stop string (0 if none). */
  private holdLength(text: string, atLeast = 1): number {
    for (let k = Math.min(this.longestStop - 1, text.length); k >= atLeast; k--) {
      const suffix = text.slice(text.length - k)
      if (this.stops.some((s) => s.startsWith(suffix))) return k
    }
    return 0
  }
}

/** Early-exit figures over a set of choices. */
export const exitFigures = (choices: ReadonlyArray<Choice>, layers: number) => {
  const histogram: Record<string, number> = {}
  let tokens = 0
  let depth = 0
  for (const c of choices) {
    tokens += c.tokens
    depth += c.depth
    for (const [layer, n] of Object.entries(c.exits)) histogram[layer] = (histogram[layer] ?? 0) + n
  }
  return {
    mean_exit_depth: tokens === 0 ? 0 : depth / tokens,
    layers_skipped: tokens * layers - depth,
    layers,
    exit_histogram: histogram,
  }
}
