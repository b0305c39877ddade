/**
 * Stop strings are cut exactly however the text is split into tokens, and the held-back text is released as soon
 * as it can no longer become a stop string.
 */
import type { TokenEvent } from "@offramp/core/Generation"
import fc from "fast-check"
import { describe, expect, it } from "vitest"
import { Choice } from "../src/internal/choice.js"

const event = (text: string, index: number, finishReason: TokenEvent["finishReason"] = null): TokenEvent => ({
  sample: 0,
  index,
  id: index,
  text,
  exitLayer: 5,
  confidence: 1,
  logprob: -0.5,
  finishReason,
})

/** Feeds `pieces` as token texts (the last one ends the generation by length) and collects what is released. */
const run = (pieces: ReadonlyArray<string>, stops: ReadonlyArray<string>) => {
  const choice = new Choice(0, stops)
  const deltas: Array<string> = []
  pieces.forEach((piece, i) => {
    const delta = choice.push(event(piece, i, i === pieces.length - 1 ? "length" : null))
    if (delta) deltas.push(delta.text)
  })
  return { choice, deltas }
}

/** What the client must see: the text up to the earliest stop string. */
const expected = (text: string, stops: ReadonlyArray<string>) => {
  const cuts = stops.map((s) => text.indexOf(s)).filter((i) => i >= 0)
  return cuts.length === 0 ? text : text.slice(0, Math.min(...cuts))
}

const letters = fc.string({ unit: fc.constantFrom("a", "b", "c", " "), maxLength: 40 })

describe("stop strings", () => {
  it("the released text is the text up to the first stop string, for any split into tokens", () => {
    fc.assert(
      fc.property(
        fc.array(fc.string({ unit: fc.constantFrom("a", "b", "c", " "), maxLength: 4 }), {
          minLength: 1,
          maxLength: 20,
        }),
        fc.array(fc.string({ unit: fc.constantFrom("a", "b", "c", " "), minLength: 1, maxLength: 4 }), {
          maxLength: 4,
        }),
        (pieces, stops) => {
          const text = pieces.join("")
          const { choice, deltas } = run(pieces, stops)
          const want = expected(text, stops)
          expect(deltas.join("")).toBe(want)
          expect(choice.text).toBe(want)
          expect(choice.finishReason).toBe(
            want.length < text.length || stops.some((s) => text.includes(s)) ? "stop" : "length",
          )
        },
      ),
      { numRuns: 2000 },
    )
  })

  it("holds back only what could still become a stop string", () => {
    const choice = new Choice(0, ["END"])
    expect(choice.push(event("The E", 0))!.text).toBe("The ")
    expect(choice.push(event("N", 1))!.text).toBe("")
    expect(choice.push(event("ding", 2))!.text).toBe("ENding")
    const last = choice.push(event(" END here", 3))!
    expect(last.text).toBe(" ")
    expect(last.finishReason).toBe("stop")
    expect(choice.push(event("more", 4))).toBeUndefined()
    expect(choice.tokens).toBe(4)
  })

  it("a match does not end the text while an earlier stop string may still complete", () => {
    // fast-check's counterexample: "a" matches at 1, but " a " starts at 0 and completes with the next token.
    expect(run([" a", " ", ""], ["a", " a "]).deltas.join("")).toBe("")
    const choice = new Choice(0, ["a", " a "])
    expect(choice.push(event(" a", 0))!).toMatchObject({ text: "", finishReason: null })
    expect(choice.push(event("b", 1))!).toMatchObject({ text: " ", finishReason: "stop" })
    // Where the generation ends first, only the complete match counts.
    expect(run([" a"], ["a", " a "]).choice.text).toBe(" ")
  })

  it("log-probabilities go with the released text; a stop token's is left out", () => {
    const choice = new Choice(0, ["!"])
    choice.push(event("Hi", 0))
    choice.push(event(" there!", 1))
    expect(choice.logprobs.map((l) => [l.token, l.offset])).toEqual([
      ["Hi", 0],
      [" there!", 2],
    ])
    const eos = new Choice(0, [])
    eos.push(event("ok", 0))
    eos.push(event("", 1, "stop"))
    expect(eos.logprobs.map((l) => l.token)).toEqual(["ok"])
    expect(eos.finishReason).toBe("stop")
  })

  it("without stop strings nothing is held", () => {
    fc.assert(
      fc.property(letters, (text) => {
        const choice = new Choice(0, [])
        expect(choice.push(event(text, 0))!.text).toBe(text)
      }),
    )
  })
})
