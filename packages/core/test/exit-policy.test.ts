import { describe, expect, it } from "@effect/vitest"
import fc from "fast-check"
import { confidentAfterHead, type ExitRow, exitingRows, planHead } from "../src/internal/ExitPolicy.js"

const row = (over: Partial<ExitRow> = {}): ExitRow => ({
  threshold: 0.8,
  policy: "per-sequence",
  headFree: undefined,
  confirm: undefined,
  ...over,
})

describe("ExitPolicy", () => {
  it("a head measure: every scored row needs the head; a row whose threshold is above 1 is not scored", () => {
    expect(planHead([row(), row({ threshold: 2 }), row()], true)).toEqual({ deferred: [], headed: [0, 2] })
  })

  it("a head-free measure: rows it holds back pay no head; rows it lets go share the final head", () => {
    const rows = [row({ headFree: 0.9 }), row({ headFree: 0.1 }), row({ headFree: 0.85 })]
    expect(planHead(rows, true)).toEqual({ deferred: [0, 2], headed: [] })
    // With a head per exit (dedicated heads), a row that exits needs its exit's own head for its token.
    expect(planHead(rows, false)).toEqual({ deferred: [], headed: [0, 2] })
  })

  it("a gated decision: a row that passes the head-free measure needs the head to confirm it", () => {
    const gated = row({ headFree: 0.9, confirm: 0.5 })
    expect(planHead([gated], true)).toEqual({ deferred: [], headed: [0] })
    expect(confidentAfterHead(gated, 0.9, 0.6)).toBe(true)
    expect(confidentAfterHead(gated, 0.9, 0.4)).toBe(false)
  })

  it("`all`: one row that cannot exit keeps the others, and they need no head", () => {
    const rows = [row({ policy: "all", headFree: 0.9 }), row({ policy: "all", headFree: 0.2 })]
    expect(planHead(rows, true)).toEqual({ deferred: [], headed: [] })
    const unscored = [row({ policy: "all" }), row({ policy: "all", threshold: Number.POSITIVE_INFINITY })]
    expect(planHead(unscored, true)).toEqual({ deferred: [], headed: [] })
  })

  it("`all` rows leave together only when all are confident; per-sequence rows decide alone", () => {
    const rows = [row({ policy: "all" }), row({ policy: "all" }), row()]
    expect(exitingRows(rows, [true, false, true])).toEqual([2])
    expect(exitingRows(rows, [true, true, false])).toEqual([0, 1])
  })

  it("properties: unscored rows never exit, `all` rows exit all or none, deferred rows passed their measure", () => {
    const arbitraryRow = fc.record({
      threshold: fc.oneof(fc.double({ min: 0, max: 1, noNaN: true }), fc.constant(Number.POSITIVE_INFINITY)),
      policy: fc.constantFrom("per-sequence" as const, "all" as const),
      headFree: fc.option(fc.double({ min: 0, max: 1, noNaN: true }), { nil: undefined }),
      confirm: fc.option(fc.double({ min: 0, max: 1, noNaN: true }), { nil: undefined }),
    })
    fc.assert(
      fc.property(
        fc.array(arbitraryRow, { maxLength: 12 }),
        fc.boolean(),
        fc.array(fc.boolean()),
        (rows, shared, coins) => {
          const { deferred, headed } = planHead(rows, shared)
          expect(new Set([...deferred, ...headed]).size).toBe(deferred.length + headed.length)
          for (const r of [...deferred, ...headed]) {
            expect(rows[r]!.threshold).toBeLessThanOrEqual(1)
            if (rows[r]!.headFree !== undefined) expect(rows[r]!.headFree).toBeGreaterThanOrEqual(rows[r]!.threshold)
          }
          for (const r of deferred) expect(shared && rows[r]!.confirm === undefined).toBe(true)
          // Confidence after the head: deferred rows are confident, headed ones by a coin, the rest are not.
          const confident = rows.map(
            (_, r) => deferred.includes(r) || (headed.includes(r) && coins[r % Math.max(1, coins.length)] === true),
          )
          const exiting = exitingRows(rows, confident)
          for (const r of exiting) expect(confident[r]).toBe(true)
          const all = rows.flatMap((x, r) => (x.policy === "all" ? [r] : []))
          const allOut = all.filter((r) => exiting.includes(r))
          expect(allOut.length === 0 || allOut.length === all.length).toBe(true)
        },
      ),
    )
  })
})
