/**
 * Emission: a row that is done with the network for this step samples its token (or takes the forced one), is
 * detokenized and delivered to its request's sink; a sequence that stops or runs out of room ends, and a request
 * ends when its last sample does (or at once, on failure).
 */
import { Exit } from "effect"
import type { GenerationError } from "../Errors.js"
import type { HeadOutput } from "../ModelRunner.js"
import type { ModelSpec } from "../ModelSpec.js"
import type { SamplerShape } from "../Sampler.js"
import type { SchedulerShape } from "../Scheduler.js"
import { logProbabilityFromTop } from "./SamplingMath.js"
import type { RequestState, Sequence } from "./Sequence.js"
import { countExit, type Statistics, summarizeExits } from "./Statistics.js"

/** A row that is done with the network this step: it samples from `head` row `row`. */
export interface Finished {
  readonly seq: Sequence
  readonly head: HeadOutput
  readonly row: number
  readonly exitLayer: number
  readonly confidence: number
}

export const makeEmission = (deps: {
  readonly spec: ModelSpec
  readonly sampler: SamplerShape
  readonly scheduler: SchedulerShape<Sequence>
  readonly statistics: Statistics
  /** The live sequences by id; a sequence leaves it when it ends. */
  readonly sequences: Map<number, Sequence>
}) => {
  const { spec, sampler, scheduler, statistics, sequences } = deps
  const { dims } = spec
  const stopIds = new Set(spec.tokens.stop)

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

  /** Samples (or takes the forced) next token of a finished row, emits it, and ends the sequence when done. */
  const emit = ({ seq, head, row, exitLayer, confidence }: Finished) => {
    const { request } = seq
    const offset = row * dims.vocab
    const forced = request.forcedTokens?.[seq.generated]
    const top = Number(head.topToken[row])
    const id =
      forced ?? (request.usesLogits ? sampler.sample(head.logits!, offset, dims.vocab, request.sampling, seq.rng) : top)
    deliver(
      seq,
      id,
      forced !== undefined,
      exitLayer,
      confidence,
      logProbabilityFromTop(head.logits, offset, id, top, head.maxProb[row]!),
    )
  }

  /**
   * Emits the chosen next token `id` of `seq` and ends the sequence when it stops (a stop token, unless forced) or is
   * full; returns whether the sequence goes on.
   */
  const deliver = (
    seq: Sequence,
    id: number,
    forced: boolean,
    exitLayer: number,
    confidence: number,
    logprob: number,
  ): boolean => {
    const { request } = seq
    const stop = !forced && stopIds.has(id)
    seq.generated++
    statistics.token(exitLayer)
    countExit(seq.exitHistogram, exitLayer)
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
      logprob,
      finishReason,
      ...(finishReason !== null ? { summary: summarizeExits(seq.exitHistogram, dims.layers) } : {}),
    })
    if (finishReason !== null) {
      end(seq, Exit.void)
      return false
    }
    seq.tokens.push(id)
    return true
  }

  return { close, end, fail, emit, deliver }
}

export type Emission = ReturnType<typeof makeEmission>
