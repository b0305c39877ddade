import { describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import fc from "fast-check"
import { GREEDY_TEMPERATURE } from "../src/Generation.js"
import {
  argmax,
  candidateTokens,
  logProbability,
  logProbabilityFromTop,
  nucleus,
  softmax,
  topKFilter,
  topPFilter,
} from "../src/internal/SamplingMath.js"
import { makeRng, makeSampler, Sampler, type SamplingParams } from "../src/Sampler.js"

const sampler = makeSampler()

const logitsOf = (probs: ReadonlyArray<number>) => Float32Array.from(probs, Math.log)

const draw = (logits: Float32Array, params: SamplingParams, n: number, seed = 7): Array<number> => {
  const rng = makeRng(seed)
  return Array.from({ length: n }, () => sampler.sample(logits, 0, logits.length, params, rng))
}

const counts = (ids: ReadonlyArray<number>, vocab: number) => {
  const c = new Array<number>(vocab).fill(0)
  for (const id of ids) c[id]!++
  return c
}

/** Pearson chi-square of observed counts against expected probabilities (cells with p = 0 must be empty). */
const chiSquare = (observed: ReadonlyArray<number>, probs: ReadonlyArray<number>) => {
  const n = observed.reduce((a, b) => a + b, 0)
  let chi = 0
  observed.forEach((o, i) => {
    const e = n * probs[i]!
    if (e === 0) expect(o).toBe(0)
    else chi += (o - e) ** 2 / e
  })
  return chi
}

// Logits with ties: multiples of 0.1 in [-20, 20].
const arbLogits = fc
  .array(fc.integer({ min: -200, max: 200 }), { minLength: 2, maxLength: 80 })
  .map((xs) => Float32Array.from(xs, (x) => x / 10))
const arbTemperature = fc.integer({ min: 1, max: 40 }).map((t) => t / 10)

/** Ids sorted by logit, best first, ties -> lowest id (written independently of the sampler). */
const ranked = (logits: ArrayLike<number>) =>
  Array.from(logits, (v, i) => ({ v, i }))
    .sort((a, b) => b.v - a.v || a.i - b.i)
    .map((x) => x.i)

describe("makeRng", () => {
  it("the same seed gives the same stream; different seeds differ", () => {
    const a = makeRng(42)
    const b = makeRng(42)
    const c = makeRng(43)
    const sa = Array.from({ length: 100 }, () => a.nextUint32())
    const sb = Array.from({ length: 100 }, () => b.nextUint32())
    const sc = Array.from({ length: 100 }, () => c.nextUint32())
    expect(sa).toEqual(sb)
    expect(sa).not.toEqual(sc)
    expect(new Set(sa).size).toBe(100)
    expect(makeRng(2 ** 40).nextUint32()).not.toBe(makeRng(0).nextUint32())
  })

  it("nextFloat is in [0, 1) and roughly uniform", () => {
    const rng = makeRng(1)
    const bins = new Array<number>(10).fill(0)
    let outside = 0
    for (let i = 0; i < 100_000; i++) {
      const u = rng.nextFloat()
      if (u < 0 || u >= 1) outside++
      else bins[Math.floor(u * 10)]!++
    }
    expect(outside).toBe(0)
    expect(chiSquare(bins, new Array(10).fill(0.1))).toBeLessThan(40)
  })

  it("without a seed, draws a random one and reports it", () => {
    const a = makeRng()
    const b = makeRng()
    expect(a.seed).not.toBe(b.seed)
    const replay = makeRng(a.seed)
    expect(replay.nextUint32()).toBe(a.nextUint32())
  })

  it("every seed's stream is independent from its first output (seeds 1..40 do not share a first draw)", () => {
    const seeds = Array.from({ length: 40 }, (_, i) => i + 1)
    expect(new Set(seeds.map((seed) => makeRng(seed).nextUint32())).size).toBe(40)
    // The first floats spread over [0, 1): 40 uniform draws land in ~26 of 40 bins, fewer than 18 has p < 1e-4.
    expect(new Set(seeds.map((seed) => Math.floor(makeRng(seed).nextFloat() * 40))).size).toBeGreaterThanOrEqual(18)
    // Seeds that differ only in their high word or only in their low word, and negative ones.
    const first = [0, 1, 2 ** 32, 2 ** 32 + 1, -1, -(2 ** 32), Number.MAX_SAFE_INTEGER].map((s) =>
      makeRng(s).nextUint32(),
    )
    expect(new Set(first).size).toBe(first.length)
    // Each output bit of the first draw is set for about half the seeds (seeded through a mixing function).
    const ones = new Array<number>(32).fill(0)
    for (let seed = 0; seed < 2000; seed++) {
      const x = makeRng(seed).nextUint32()
      for (let bit = 0; bit < 32; bit++) ones[bit]! += (x >>> bit) & 1
    }
    for (const count of ones) expect(Math.abs(count - 1000)).toBeLessThan(150)
  })

  it("the streams of one seed are independent, exact near 2^53, and reproducible", () => {
    const first = (seed: number, stream: number) => {
      const rng = makeRng(seed, stream)
      return Array.from({ length: 4 }, () => rng.nextUint32())
    }
    for (const seed of [0, 7, 2 ** 40, Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER - 1]) {
      const streams = Array.from({ length: 8 }, (_, i) => first(seed, i))
      expect(new Set(streams.map((s) => s[0])).size).toBe(8)
      for (let i = 0; i < 8; i++) expect(first(seed, i)).toEqual(streams[i])
    }
    // Stream i of seed s is not stream 0 of seed s + i (n samples of adjacent seeds would overlap), and near 2^53
    // where s + i is no longer exact, the streams stay apart.
    expect(first(5, 1)).not.toEqual(first(6, 0))
    const top = Number.MAX_SAFE_INTEGER
    expect(first(top, 1)).not.toEqual(first(top, 2))
    expect(first(top, 0)).not.toEqual(first(top - 1, 1))
    const rng = makeRng(top, 3)
    expect([rng.seed, rng.stream]).toEqual([top, 3])
  })
})

describe("Sampler", () => {
  const flat = new Float32Array(50).fill(0)
  const params: SamplingParams = { temperature: 1, topK: 0, topP: 1 }

  it("is reproducible per seed", () => {
    for (const p of [params, { temperature: 0.8, topK: 10, topP: 1 }, { temperature: 1.2, topK: 0, topP: 0.9 }]) {
      expect(draw(flat, p, 200, 5)).toEqual(draw(flat, p, 200, 5))
      expect(draw(flat, p, 200, 5)).not.toEqual(draw(flat, p, 200, 6))
    }
  })

  it("at temperature 1 on a flat row, seeds 1..40 and the 8 streams of one seed give many distinct first tokens", () => {
    const firstToken = (seed: number, stream = 0) => sampler.sample(flat, 0, flat.length, params, makeRng(seed, stream))
    // 40 uniform draws from 50 tokens: ~27.7 distinct on average, fewer than 20 has probability < 1e-4.
    expect(new Set(Array.from({ length: 40 }, (_, i) => firstToken(i + 1))).size).toBeGreaterThanOrEqual(20)
    // 8 draws from 50: ~7.5 distinct on average.
    expect(new Set(Array.from({ length: 8 }, (_, i) => firstToken(1234, i))).size).toBeGreaterThanOrEqual(5)
  })

  it("greedy is argmax with ties to the lowest id, reading one row of a batch buffer", () => {
    const batch = Float32Array.from([9, 1, 2, 3, 1, 5, 5, 0, 7, 7, 7, 7])
    const rng = makeRng(1)
    const greedy = { temperature: 0, topK: 0, topP: 1 }
    expect(sampler.sample(batch, 0, 4, greedy, rng)).toBe(0)
    expect(sampler.sample(batch, 4, 4, greedy, rng)).toBe(1)
    expect(sampler.sample(batch, 8, 4, greedy, rng)).toBe(0)
    fc.assert(
      fc.property(arbLogits, (logits) => {
        expect(sampler.sample(logits, 0, logits.length, { ...greedy, topK: 3, topP: 0.5 }, rng)).toBe(ranked(logits)[0])
        expect(argmax(logits)).toBe(ranked(logits)[0])
      }),
    )
  })

  it("samples a row in place exactly as a copy of it", () => {
    const rngData = makeRng(3)
    const batch = Float32Array.from({ length: 3 * 100 }, () => rngData.nextFloat() * 8)
    const row = batch.slice(100, 200)
    for (const p of [params, { temperature: 0.7, topK: 5, topP: 1 }, { temperature: 1, topK: 0, topP: 0.8 }]) {
      const a = makeRng(9)
      const b = makeRng(9)
      for (let i = 0; i < 100; i++)
        expect(sampler.sample(batch, 100, 100, p, a)).toBe(sampler.sample(row, 0, 100, p, b))
    }
  })

  it("never samples a masked (-Infinity) token", () => {
    const logits = Float32Array.from([Number.NEGATIVE_INFINITY, 0, Number.NEGATIVE_INFINITY, 0])
    for (const p of [params, { temperature: 1, topK: 3, topP: 1 }, { temperature: 1, topK: 0, topP: 0.99 }]) {
      expect(new Set(draw(logits, p, 500))).toEqual(new Set([1, 3]))
    }
  })

  it("top-k never returns a token outside the k largest logits", () => {
    fc.assert(
      fc.property(
        arbLogits,
        fc.integer({ min: 1, max: 100 }),
        arbTemperature,
        fc.integer(),
        (logits, k0, temperature, seed) => {
          const k = 1 + (k0 % logits.length)
          const allowed = new Set(ranked(logits).slice(0, k))
          expect(new Set(topKFilter(logits, k))).toEqual(allowed)
          const rng = makeRng(seed)
          for (let i = 0; i < 20; i++) {
            expect(allowed.has(sampler.sample(logits, 0, logits.length, { temperature, topK: k, topP: 1 }, rng))).toBe(
              true,
            )
          }
        },
      ),
    )
  })

  it("top-p keeps exactly the nucleus of fixed probabilities", () => {
    const probs = [0.5, 0.2, 0.15, 0.1, 0.05]
    const logits = logitsOf(probs)
    expect(Array.from(nucleus(probs, 0.7))).toEqual([0, 1])
    expect(Array.from(nucleus(probs, 0.71))).toEqual([0, 1, 2])
    expect(Array.from(topPFilter(logits, 0.7))).toEqual([0, 1])
    expect(Array.from(topPFilter(logits, 0.71))).toEqual([0, 1, 2])
    expect(Array.from(nucleus(probs, 0.01))).toEqual([0])
    expect(new Set(draw(logits, { temperature: 1, topK: 0, topP: 0.7 }, 2000))).toEqual(new Set([0, 1]))
    expect(new Set(draw(logits, { temperature: 1, topK: 0, topP: 0.71 }, 2000))).toEqual(new Set([0, 1, 2]))
    expect(new Set(draw(logits, { temperature: 1, topK: 0, topP: 0.01 }, 200))).toEqual(new Set([0]))
    // Ties at the boundary go to the lowest ids; a tiny vocabulary and topP still keep at least one token.
    expect(new Set(draw(new Float32Array(4), { temperature: 1, topK: 0, topP: 0.5 }, 500))).toEqual(new Set([0, 1]))
    expect(new Set(draw(new Float32Array(2), { temperature: 1, topK: 0, topP: 0.01 }, 100))).toEqual(new Set([0]))
    expect(new Set(draw(new Float32Array(1), { temperature: 1, topK: 0, topP: 0.5 }, 10))).toEqual(new Set([0]))
    // top-k first, then top-p over the renormalized top-k: [0.5, 0.2] / 0.7 -> 0.714..., so 0.7 keeps only {0}.
    expect(new Set(draw(logits, { temperature: 1, topK: 2, topP: 0.7 }, 2000))).toEqual(new Set([0]))
    expect(Array.from(candidateTokens(logits, { temperature: 1, topK: 2, topP: 0.7 }))).toEqual([0])
  })

  it("top-p (with or without top-k) never returns a token outside the nucleus", () => {
    fc.assert(
      fc.property(
        arbLogits,
        fc.integer({ min: 1, max: 99 }).map((p) => p / 100),
        fc.integer({ min: 0, max: 100 }),
        arbTemperature,
        fc.integer(),
        (logits, topP, k0, temperature, seed) => {
          const topK = k0 % (logits.length + 1)
          // The definition, computed independently in double precision (a hair of slack for rounding).
          const order = ranked(logits).slice(0, topK === 0 ? logits.length : topK)
          const max = logits[order[0]!]!
          const w = order.map((id) => Math.exp((logits[id]! - max) / temperature))
          const total = w.reduce((a, b) => a + b, 0)
          const allowed = new Set<number>()
          let cum = 0
          for (let j = 0; j < order.length && cum < (topP + 1e-5) * total; j++) {
            allowed.add(order[j]!)
            cum += w[j]!
          }
          const rng = makeRng(seed)
          for (let i = 0; i < 20; i++) {
            const id = sampler.sample(logits, 0, logits.length, { temperature, topK, topP }, rng)
            expect(allowed.has(id)).toBe(true)
          }
          for (const id of candidateTokens(logits, { temperature, topK, topP })) expect(allowed.has(id)).toBe(true)
        },
      ),
    )
  })

  it("empirical frequencies match the renormalized probabilities", () => {
    const probs = [0.4, 0.3, 0.15, 0.1, 0.05]
    const logits = logitsOf(probs)
    const n = 20_000
    // 4 (or fewer) degrees of freedom: chi-square above 25 has probability < 1e-4; the seed is fixed anyway.
    const cases: Array<[SamplingParams, Array<number>]> = [
      [{ temperature: 1, topK: 0, topP: 1 }, probs],
      [{ temperature: 1, topK: 3, topP: 1 }, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0]],
      [{ temperature: 1, topK: 0, topP: 0.8 }, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0]],
      [{ temperature: 1, topK: 4, topP: 0.6 }, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0]],
    ]
    for (const [p, expected] of cases) {
      expect(chiSquare(counts(draw(logits, p, n, 11), 5), expected)).toBeLessThan(25)
    }
    // A wider row (64 tokens, temperature 0.7): 63 degrees of freedom, mean 63, sd ~11.
    const r = makeRng(4)
    const wide = Float32Array.from({ length: 64 }, () => r.nextFloat() * 4)
    const expected = Array.from(softmax(wide, 0.7))
    const observed = counts(draw(wide, { temperature: 0.7, topK: 0, topP: 1 }, 50_000, 12), 64)
    expect(chiSquare(observed, expected)).toBeLessThan(130)
  })

  it("a higher temperature flattens the distribution", () => {
    const logits = logitsOf([0.4, 0.3, 0.15, 0.1, 0.05])
    const entropy = (p: Float64Array) => -p.reduce((s, x) => s + (x > 0 ? x * Math.log(x) : 0), 0)
    const temps = [0.25, 0.5, 1, 2, 4]
    const entropies = temps.map((t) => entropy(softmax(logits, t)))
    for (let i = 1; i < temps.length; i++) expect(entropies[i]!).toBeGreaterThan(entropies[i - 1]!)
    const topShare = temps.map((t) => counts(draw(logits, { temperature: t, topK: 0, topP: 1 }, 5000), 5)[0]! / 5000)
    for (let i = 1; i < temps.length; i++) expect(topShare[i]!).toBeLessThan(topShare[i - 1]!)
  })

  it.effect("is provided by Sampler.layer and validates params", () =>
    Effect.gen(function* () {
      const s = yield* Sampler
      const ok = { temperature: 0.7, topK: 40, topP: 0.95, seed: 3 }
      expect(yield* s.validate(ok)).toEqual(ok)
      for (const [bad, message] of [
        [{ temperature: -1, topK: 0, topP: 1 }, "temperature: temperature must be a finite number >= 0, got -1"],
        [
          { temperature: Number.NaN, topK: 0, topP: 1 },
          "temperature: temperature must be a finite number >= 0, got NaN",
        ],
        [{ temperature: 1, topK: 1.5, topP: 1 }, "topK: top_k must be an integer >= 0 (0 = off), got 1.5"],
        [{ temperature: 1, topK: 0, topP: 0 }, "topP: top_p must be in (0, 1] (1 = off), got 0"],
        [{ temperature: 1, topK: 0, topP: 1.1 }, "topP: top_p must be in (0, 1] (1 = off), got 1.1"],
        [{ temperature: 1, topK: 0, topP: 1, seed: 0.5 }, "seed: seed must be an integer, got 0.5"],
        [{ temperature: 1, topK: 0, topP: 1, seed: 1, stream: -1 }, "stream: stream must be an integer >= 0, got -1"],
      ] as const) {
        const error = yield* Effect.flip(s.validate(bad))
        expect(error.message).toBe(message)
      }
      const logits = logitsOf([0.1, 0.6, 0.3])
      expect(s.sample(logits, 0, 3, { temperature: 0, topK: 0, topP: 1 }, s.makeRng(1))).toBe(1)
    }).pipe(Effect.provide(Sampler.layer)),
  )

  it.effect("a temperature below GREEDY_TEMPERATURE is greedy (1 / T would overflow and sample garbage)", () =>
    Effect.gen(function* () {
      const s = yield* Sampler
      const logits = logitsOf([0.1, 0.2, 0.4, 0.3])
      for (const temperature of [5e-324, 1e-310, 1e-200, 9e-6]) {
        const params = yield* s.validate({ temperature, topK: 0, topP: 1 })
        expect(params.temperature).toBe(0)
        const rng = s.makeRng(5)
        for (let i = 0; i < 20; i++) expect(s.sample(logits, 0, 4, params, rng)).toBe(2)
      }
      expect((yield* s.validate({ temperature: GREEDY_TEMPERATURE, topK: 0, topP: 1 })).temperature).toBe(
        GREEDY_TEMPERATURE,
      )
    }).pipe(Effect.provide(Sampler.layer)),
  )
})

describe("logProbabilityFromTop", () => {
  it("equals log softmax computed over the whole row, given the row's top token and its probability", () => {
    fc.assert(
      fc.property(
        fc.array(fc.float({ min: -30, max: 30, noNaN: true }), { minLength: 2, maxLength: 64 }),
        fc.nat(),
        (values, pick) => {
          const logits = Float32Array.from(values)
          const top = logits.indexOf(Math.max(...logits))
          // The head's max probability, computed independently in float64 (the head graph does it in float32).
          const sum = logits.reduce((s, l) => s + Math.exp(l - logits[top]!), 0)
          const id = pick % logits.length
          const expected = logits[id]! - logits[top]! - Math.log(sum)
          expect(logProbabilityFromTop(logits, 0, id, top, 1 / sum)).toBeCloseTo(expected, 10)
          expect(logProbabilityFromTop(logits, 0, id, top, 1 / sum)).toBeCloseTo(
            logProbability(logits, 0, logits.length, id),
            10,
          )
        },
      ),
    )
  })
})
