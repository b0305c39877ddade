import fc from "fast-check"
import { describe, expect, it } from "vitest"
import { type ChartPoint, escapeXml, niceTicks, PALETTE, speedupQualityChart } from "../src/bench/chart.js"
import { lcsLength, median, perplexity, rougeL, summarize, tokenMatchRate } from "../src/bench/quality.js"

const tokens = fc.array(fc.integer({ min: 0, max: 6 }), { maxLength: 40 })

describe("rougeL", () => {
  it("matches a hand-computed example", () => {
    // LCS of [1,2,3,4,5] and [1,3,5,6] is [1,3,5].
    const s = rougeL([1, 2, 3, 4, 5], [1, 3, 5, 6])
    expect(lcsLength([1, 2, 3, 4, 5], [1, 3, 5, 6])).toBe(3)
    expect(s.precision).toBeCloseTo(0.75, 12)
    expect(s.recall).toBeCloseTo(0.6, 12)
    expect(s.f1).toBeCloseTo((2 * 0.75 * 0.6) / (0.75 + 0.6), 12)
  })

  it("handles interleaved and disjoint sequences", () => {
    expect(lcsLength([1, 2, 1, 2], [2, 1, 2, 1])).toBe(3)
    expect(rougeL([1, 2, 3], [4, 5, 6])).toEqual({ precision: 0, recall: 0, f1: 0 })
  })

  it("defines the empty cases", () => {
    expect(rougeL([], [])).toEqual({ precision: 1, recall: 1, f1: 1 })
    expect(rougeL([1], [])).toEqual({ precision: 0, recall: 0, f1: 0 })
    expect(rougeL([], [1])).toEqual({ precision: 0, recall: 0, f1: 0 })
  })

  it("has symmetric F1 and swapped precision/recall", () => {
    fc.assert(
      fc.property(tokens, tokens, (a, b) => {
        const ab = rougeL(a, b)
        const ba = rougeL(b, a)
        expect(ab.f1).toBeCloseTo(ba.f1, 12)
        expect(ab.precision).toBeCloseTo(ba.recall, 12)
      }),
    )
  })

  it("keeps LCS ≤ min length and scores within [0, 1]", () => {
    fc.assert(
      fc.property(tokens, tokens, (a, b) => {
        const lcs = lcsLength(a, b)
        expect(lcs).toBeLessThanOrEqual(Math.min(a.length, b.length))
        const s = rougeL(a, b)
        for (const v of [s.precision, s.recall, s.f1]) {
          expect(v).toBeGreaterThanOrEqual(0)
          expect(v).toBeLessThanOrEqual(1)
        }
      }),
    )
  })

  it("gives 1 for identical sequences", () => {
    fc.assert(
      fc.property(tokens, (a) => {
        expect(lcsLength(a, a)).toBe(a.length)
        expect(rougeL(a, [...a])).toEqual({ precision: 1, recall: 1, f1: 1 })
      }),
    )
  })
})

describe("tokenMatchRate", () => {
  it("counts equal positions over the longer length", () => {
    expect(tokenMatchRate([1, 2, 3], [1, 2, 3])).toBe(1)
    expect(tokenMatchRate([1, 2, 3, 4], [1, 9, 3, 4])).toBe(0.75)
    expect(tokenMatchRate([1, 2, 3, 4], [1, 2])).toBe(0.5)
    expect(tokenMatchRate([1, 2], [1, 2, 3, 4])).toBe(0.5)
    expect(tokenMatchRate([], [])).toBe(1)
    expect(tokenMatchRate([1], [])).toBe(0)
    // A one-token shift destroys positional agreement even though ROUGE-L stays high.
    expect(tokenMatchRate([1, 2, 3, 4], [0, 1, 2, 3, 4])).toBe(0)
  })

  it("stays within [0, 1]", () => {
    fc.assert(
      fc.property(tokens, tokens, (a, b) => {
        const r = tokenMatchRate(a, b)
        expect(r).toBeGreaterThanOrEqual(0)
        expect(r).toBeLessThanOrEqual(1)
      }),
    )
  })
})

describe("perplexity", () => {
  it("equals V for uniform log-probs over V", () => {
    for (const v of [2, 7, 32000]) {
      const lp = new Float64Array(50).fill(-Math.log(v))
      expect(Math.abs(perplexity(lp) - v)).toBeLessThan(1e-9 * v)
      expect(Math.abs(perplexity(Array.from(lp)) - v)).toBeLessThan(1e-9 * v)
    }
  })

  it("is 1 for certain predictions and throws on empty input", () => {
    expect(perplexity([0, 0, 0])).toBe(1)
    expect(() => perplexity([])).toThrow(/empty/)
    expect(() => perplexity(new Float64Array(0))).toThrow(/empty/)
  })
})

describe("median / summarize", () => {
  it("computes robust summaries", () => {
    expect(median([3, 1, 2])).toBe(2)
    expect(median([4, 1, 3, 2])).toBe(2.5)
    const input = [5, 1, 4]
    expect(summarize(input)).toEqual({ median: 4, mean: 10 / 3, min: 1, max: 5 })
    expect(input).toEqual([5, 1, 4])
    expect(() => median([])).toThrow(/empty/)
    expect(() => summarize([])).toThrow(/empty/)
  })
})

describe("niceTicks", () => {
  const isRound = (v: number): boolean => {
    if (v === 0) return true
    // Mantissa of a round tick is 1, 2 or 5 times a power of ten times an integer: few significant digits.
    return Number(v.toPrecision(6)) === v
  }

  it("returns round steps covering the range", () => {
    expect(niceTicks(0, 10, 6)).toEqual([0, 2, 4, 6, 8, 10])
    expect(niceTicks(0.93, 1.87, 5)).toEqual([0.8, 1, 1.2, 1.4, 1.6, 1.8, 2])
    expect(niceTicks(0, 0.3, 4)).toEqual([0, 0.1, 0.2, 0.3])
  })

  it("widens equal bounds", () => {
    const t = niceTicks(1, 1, 5)
    expect(t.length).toBeGreaterThanOrEqual(2)
    expect(t[0]!).toBeLessThan(1)
    expect(t[t.length - 1]!).toBeGreaterThan(1)
    expect(niceTicks(0, 0).length).toBeGreaterThanOrEqual(2)
  })

  it("is increasing, round and covering for arbitrary ranges", () => {
    fc.assert(
      fc.property(
        fc.double({ min: -1e6, max: 1e6, noNaN: true }),
        fc.double({ min: -1e6, max: 1e6, noNaN: true }),
        fc.integer({ min: 2, max: 10 }),
        (a, b, count) => {
          const lo = Math.min(a, b)
          const hi = Math.max(a, b)
          const t = niceTicks(lo, hi, count)
          expect(t.length).toBeGreaterThanOrEqual(2)
          expect(t.length).toBeLessThanOrEqual(count * 3 + 2)
          for (let i = 1; i < t.length; i++) expect(t[i]!).toBeGreaterThan(t[i - 1]!)
          expect(t[0]!).toBeLessThanOrEqual(lo)
          expect(t[t.length - 1]!).toBeGreaterThanOrEqual(hi)
          for (const v of t) expect(isRound(v)).toBe(true)
        },
      ),
    )
  })
})

/** Minimal well-formedness check: tags balance and every attribute value is quoted. */
const assertXmlish = (svg: string): void => {
  expect(svg.startsWith("<svg")).toBe(true)
  expect(svg.endsWith("</svg>")).toBe(true)
  const stack: Array<string> = []
  for (const m of svg.matchAll(/<(\/?)([a-zA-Z][\w-]*)((?:\s+[\w:-]+="[^"<>]*")*)\s*(\/?)>/g)) {
    const [, close, name, , selfClose] = m
    if (selfClose) continue
    if (close) expect(stack.pop()).toBe(name)
    else stack.push(name!)
  }
  expect(stack).toEqual([])
  // Any '<' not starting a recognised tag would be unescaped text.
  const stripped = svg.replace(/<(\/?)([a-zA-Z][\w-]*)((?:\s+[\w:-]+="[^"<>]*")*)\s*(\/?)>/g, "")
  expect(stripped).not.toMatch(/[<>]/)
  expect(stripped).not.toMatch(/&(?!amp;|lt;|gt;|quot;|apos;)/)
}

const samplePoints: ReadonlyArray<ChartPoint> = [
  { series: "per-sequence/fill @ batch 1", label: "t=0.9", x: 0.4, y: 1.15 },
  { series: "per-sequence/fill @ batch 1", label: "t=0.8", x: 1.1, y: 1.32 },
  { series: "per-sequence/fill @ batch 1", label: "t=0.7", x: 3.5, y: 1.58 },
  { series: 'per-token <copy> & "more"', label: "t<0.9 & 'x'", x: 0.2, y: 0.95 },
  { series: 'per-token <copy> & "more"', label: "t=0.8", x: 2.4, y: 1.21 },
  { series: "single", label: "", x: -0.5, y: 1.05 },
]

describe("speedupQualityChart", () => {
  it("renders a well-formed SVG with one polyline per multi-point series", () => {
    const svg = speedupQualityChart(samplePoints, { title: "Q&A <bench>" })
    assertXmlish(svg)
    expect(svg.match(/<polyline /g)?.length).toBe(2)
    for (const m of svg.matchAll(/<polyline points="([^"]*)"/g)) {
      expect(m[1]!.split(" ").length).toBeGreaterThanOrEqual(2)
    }
    expect(svg.match(/<circle /g)?.length).toBe(samplePoints.length + 3)
    expect(svg).toContain(escapeXml('per-token <copy> & "more"'))
    expect(svg).toContain("per-token &lt;copy&gt; &amp; &quot;more&quot;")
    expect(svg).toContain("t&lt;0.9 &amp; &apos;x&apos;")
    expect(svg).toContain("Q&amp;A &lt;bench&gt;")
    expect(svg).toContain('stroke-dasharray="6 4"')
    for (const c of PALETTE.slice(0, 3)) expect(svg).toContain(c)
    expect(svg).not.toContain("NaN")
  })

  it("is deterministic", () => {
    expect(speedupQualityChart(samplePoints)).toBe(speedupQualityChart([...samplePoints]))
  })

  it("uses distinct colours across many series", () => {
    const pts: Array<ChartPoint> = []
    for (let i = 0; i < 8; i++) {
      pts.push({ series: `s${i}`, label: "", x: i, y: 1 + i / 10 }, { series: `s${i}`, label: "", x: i + 1, y: 1.1 })
    }
    const svg = speedupQualityChart(pts)
    const colours = new Set([...svg.matchAll(/<g class="series" fill="(#[0-9a-f]{6})"/g)].map((m) => m[1]))
    expect(colours.size).toBe(8)
    expect(svg.match(/<polyline /g)?.length).toBe(8)
  })

  it("handles a single point, equal coordinates and no points", () => {
    for (const pts of [
      [{ series: "a", label: "t=1", x: 2, y: 1 }],
      [
        { series: "a", label: "", x: 0, y: 1 },
        { series: "a", label: "", x: 0, y: 1 },
      ],
      [],
      [{ series: "bad", label: "", x: Number.NaN, y: Number.POSITIVE_INFINITY }],
    ] satisfies ReadonlyArray<ReadonlyArray<ChartPoint>>) {
      const svg = speedupQualityChart(pts)
      assertXmlish(svg)
      expect(svg).not.toMatch(/NaN|Infinity/)
    }
  })
})
