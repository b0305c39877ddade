/**
 * The worker's columnar wire form of token events: what the builder takes, through Schema serialization and a
 * structured clone (what postMessage does), reads back as the same events and ends in the same order.
 */
import { EngineStoppedError, InvalidRequestError } from "@offramp/core/Errors"
import type { GenerationSummary, TokenEvent } from "@offramp/core/Generation"
import { Schema } from "effect"
import * as fc from "fast-check"
import { describe, expect, it } from "vitest"
import { type GenerationEnd, readStepEvents, StepEvents, StepEventsBuilder } from "../src/internal/StepEvents.js"

const summary: fc.Arbitrary<GenerationSummary> = fc.record({
  tokens: fc.nat(4096),
  exitHistogram: fc.dictionary(fc.integer({ min: 1, max: 32 }).map(String), fc.nat(4096)),
  meanExitDepth: fc.double({ min: 1, max: 32, noNaN: true }),
  layersSkipped: fc.nat(),
  layers: fc.integer({ min: 1, max: 32 }),
})

/** Token events; one with a finish reason (a sample's last) may carry a summary. */
const tokenEvent: fc.Arbitrary<TokenEvent> = fc
  .tuple(
    fc.record({
      sample: fc.nat(7),
      index: fc.nat(4096),
      id: fc.nat(50_000),
      text: fc.string({ unit: "grapheme" }),
      exitLayer: fc.integer({ min: 1, max: 32 }),
      confidence: fc.double({ min: 0, max: 1, noNaN: true }),
      logprob: fc.double({ min: -100, max: 0, noNaN: true }),
      finishReason: fc.constantFrom(null, "stop" as const, "length" as const),
    }),
    fc.option(summary, { nil: undefined }),
  )
  .map(([event, s]) => (event.finishReason !== null && s !== undefined ? { ...event, summary: s } : event))

const crossThread = (step: StepEvents): StepEvents => {
  const wire = structuredClone(Schema.encodeSync(StepEvents)(step))
  return Schema.decodeUnknownSync(StepEvents)(wire)
}

describe("StepEvents", () => {
  it("events and ends survive the trip in order", () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.nat(20), fc.array(tokenEvent, { maxLength: 4 })), { maxLength: 24 }), (adds) => {
        const builder = new StepEventsBuilder()
        for (const [ticket, events] of adds) for (const event of events) builder.add(ticket, event)
        const ends: Array<GenerationEnd> = [
          { ticket: 3 },
          { ticket: 5, error: new InvalidRequestError({ message: "bad" }) },
          { ticket: 7, error: new EngineStoppedError({ message: "stopped" }) },
        ]
        for (const end of ends) builder.end(end)
        const read: Array<[number, TokenEvent]> = []
        const readEnds: Array<GenerationEnd> = []
        readStepEvents(
          crossThread(builder.take()),
          (ticket, event) => read.push([ticket, event]),
          (end) => readEnds.push(end),
        )
        expect(read).toEqual(adds.flatMap(([ticket, events]) => events.map((e) => [ticket, e])))
        expect(readEnds).toEqual(ends)
        expect(readEnds[1]!.error).toBeInstanceOf(InvalidRequestError)
        expect(builder.isEmpty).toBe(true)
      }),
    )
  })
})
