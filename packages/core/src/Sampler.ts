/**
 * The Sampler service: picks the next token from one row of logits (greedy, temperature, top-k, top-p), with a
 * seeded per-sequence RNG so that a request with a seed is reproducible.
 *
 * `sample` runs once per token on rows of up to 32k+ logits, so it is synchronous and reuses scratch buffers: only
 * the top-k candidates (or, for top-p alone, the tokens that can possibly be in the nucleus) are ever sorted.
 */
import { Context, Effect, Layer, Schema } from "effect"
import { describeParseError, InvalidRequestError } from "./Errors.js"
import { SamplingParamsSchema, type SamplingRequest } from "./Generation.js"
import { type Scratch, sampleRow } from "./internal/SamplingMath.js"

export interface SamplingParams {
  /** 0 = greedy: the argmax (ties -> lowest id), which the engine takes from the exit head's in-graph top token. */
  readonly temperature: number
  /** Keep only the k most likely tokens; 0 = off. */
  readonly topK: number
  /** Nucleus sampling: keep the smallest set of most likely tokens with cumulative probability >= topP; 1 = off. */
  readonly topP: number
  /** Seed of the sequence's RNG; a random one when absent. */
  readonly seed?: number
  /**
   * The seed's first stream for this request (default 0): sample i draws from stream `stream + i`. A batch of
   * prompts with one seed gives each prompt its own streams (the server passes the choice index of its first sample).
   */
  readonly stream?: number
}

/** Greedy decoding; also the default of every sampling parameter a request leaves out. */
export const greedyParams: SamplingParams = { temperature: 0, topK: 0, topP: 1 }

/** A request's sampling parameters, with greedy's for what it leaves out (all of them when it has none). */
export const resolveSampling = (request: SamplingRequest | undefined): SamplingParams => ({
  ...greedyParams,
  ...request,
})

/** A small, fast PRNG; one per sequence. */
export interface Rng {
  readonly seed: number
  /** Which of the seed's independent streams this is (see `SamplingParams.stream`). */
  readonly stream: number
  /** Uniform in [0, 2^32). */
  nextUint32(): number
  /** Uniform in [0, 1) with 53 random bits. */
  nextFloat(): number
}

const MASK64 = (1n << 64n) - 1n
const GOLDEN_GAMMA = 0x9e3779b97f4a7c15n

/**
 * splitmix64's output function (Steele, Lea & Flood): a bijection of 64-bit words in which each input bit flips
 * about half the output bits.
 */
const mix64 = (x: bigint): bigint => {
  let z = ((x ^ (x >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64
  return z ^ (z >> 31n)
}

/**
 * The 128-bit xoshiro state of stream `stream` of `seed`, in exact 64-bit arithmetic: the seed and the stream are
 * mixed as separate words (sample i of seed s is not the stream of seed s + i), then two splitmix64 outputs from that
 * point fill the state, as Vigna recommends for seeding xoshiro. Every bit of seed and stream reaches the first output.
 */
const seedState = (seed: number, stream: number): [number, number, number, number] => {
  let z = mix64(mix64(BigInt.asUintN(64, BigInt(seed))) ^ BigInt.asUintN(64, BigInt(stream)))
  const words: Array<number> = []
  for (let i = 0; i < 2; i++) {
    z = (z + GOLDEN_GAMMA) & MASK64
    const out = mix64(z)
    words.push(Number(out & 0xffffffffn), Number(out >> 32n))
  }
  return words as [number, number, number, number]
}

const rotl = (x: number, k: number) => (x << k) | (x >>> (32 - k))

/** xoshiro128** (Blackman & Vigna): 128-bit state, period 2^128 - 1. */
class Xoshiro128 implements Rng {
  private s0: number
  private s1: number
  private s2: number
  private s3: number

  constructor(
    readonly seed: number,
    readonly stream: number,
  ) {
    ;[this.s0, this.s1, this.s2, this.s3] = seedState(seed, stream)
    // The all-zero state is a fixed point.
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1
  }

  nextUint32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0
    const t = this.s1 << 9
    this.s2 ^= this.s0
    this.s3 ^= this.s1
    this.s1 ^= this.s2
    this.s0 ^= this.s3
    this.s2 ^= t
    this.s3 = rotl(this.s3, 11)
    return result
  }

  nextFloat(): number {
    const a = this.nextUint32() >>> 5
    const b = this.nextUint32() >>> 6
    return (a * 67108864 + b) / 9007199254740992
  }
}

/**
 * Stream `stream` (default 0) of a seed: every (seed, stream) pair gives an independent generator from its first
 * output. Without a seed, a random one (exposed as `rng.seed`, so `makeRng(rng.seed, rng.stream)` replays the run).
 */
export const makeRng = (seed?: number, stream = 0): Rng =>
  new Xoshiro128(
    seed === undefined ? Math.floor(Math.random() * Number.MAX_SAFE_INTEGER) : Math.trunc(seed),
    Math.trunc(stream),
  )

/**
 * Checks params once per request, so `sample` can trust them (the same check and messages as a GenerationRequest's),
 * and fills in greedy's value for what they leave out.
 */
export const validateSamplingParams = (params: SamplingRequest): Effect.Effect<SamplingParams, InvalidRequestError> =>
  Schema.decodeUnknown(SamplingParamsSchema)(params).pipe(
    Effect.mapBoth({
      onFailure: (e) => new InvalidRequestError({ message: describeParseError(e) }),
      onSuccess: resolveSampling,
    }),
  )

export interface SamplerShape {
  /** Samples one token from logits[offset .. offset+vocab) (one row of a batch buffer); returns its id. */
  readonly sample: (logits: Float32Array, offset: number, vocab: number, params: SamplingParams, rng: Rng) => number
  /** A sequence's RNG: stream `stream` of `seed` when a seed is given (see `makeRng`), random otherwise. */
  readonly makeRng: (seed?: number, stream?: number) => Rng
  readonly validate: (params: SamplingRequest) => Effect.Effect<SamplingParams, InvalidRequestError>
}

/** A sampler with its own scratch buffers, for code that runs outside a Layer (e.g. a worker). */
export const makeSampler = (): SamplerShape => {
  const scratch: Scratch = { ids: new Int32Array(0), weights: new Float64Array(0), work: new Float64Array(0) }
  return {
    sample: (logits, offset, vocab, params, rng) => sampleRow(scratch, logits, offset, vocab, params, rng),
    makeRng,
    validate: validateSamplingParams,
  }
}

export class Sampler extends Context.Tag("@offramp/core/Sampler")<Sampler, SamplerShape>() {
  static readonly layer: Layer.Layer<Sampler> = Layer.sync(Sampler, makeSampler)
}
