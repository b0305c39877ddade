import { mkdtemp, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { describe, expect, it } from "@effect/vitest"
import {
  LLAMA2C_TOKENIZER_CONFIG,
  readLlama2cTokenizer,
  toHuggingFaceTokenizerJson,
} from "@offramp/convert/Llama2cTokenizer"
import { Tokenizer, type TokenizerShape } from "@offramp/core/Tokenizer"
import { Effect } from "effect"
import * as fc from "fast-check"
import { REFERENCE_IDS, REFERENCE_TEXT, STORIES_TOKENIZER as tokPath } from "../../../test/support/stories.js"
import * as HfTokenizer from "../src/HfTokenizer.js"

const FFFD = "\uFFFD"

const tokenizerJson = Effect.map(readLlama2cTokenizer(tokPath), toHuggingFaceTokenizerJson)
const loadTokenizer = Effect.flatMap(tokenizerJson, (json) => HfTokenizer.fromJson(json, LLAMA2C_TOKENIZER_CONFIG))

/** Streams `generated` after `prompt`; returns every push delta and the flushed rest. */
const stream = (tok: TokenizerShape, prompt: ReadonlyArray<number>, generated: ReadonlyArray<number>) => {
  const detok = tok.detokenizer(prompt)
  const deltas = generated.map((id) => detok.push(id))
  return { deltas, flushed: detok.flush() }
}

/** The continuation's text: decode(prompt ++ generated) past decode(prompt). */
const continuation = (tok: TokenizerShape, prompt: ReadonlyArray<number>, generated: ReadonlyArray<number>) => {
  const before = Effect.runSync(tok.decode(prompt))
  const all = Effect.runSync(tok.decode([...prompt, ...generated]))
  expect(all.startsWith(before)).toBe(true)
  return all.slice(before.length)
}

const byteIds = (text: string): Array<number> => Array.from(new TextEncoder().encode(text), (b) => b + 3)

/** One code point that is neither U+FFFD nor "▁" (SentencePiece's space, which decodes to " "). */
const codePoint = fc.string({ unit: "binary", minLength: 1, maxLength: 1 }).filter((c) => c !== FFFD && c !== "\u2581")
const textPieceId = fc.integer({ min: 259, max: 511 })
const specialId = fc.integer({ min: 0, max: 2 })
/** Valid UTF-8 only: text pieces, specials, and whole characters spelled as byte tokens. */
const validChunk = fc.oneof(
  textPieceId.map((id) => [id]),
  specialId.map((id) => [id]),
  codePoint.map(byteIds),
)
/** Anything: random ids (bytes 3..258 weighted up) and characters cut short. */
const anyChunk = fc.oneof(
  fc.integer({ min: 0, max: 511 }).map((id) => [id]),
  fc.integer({ min: 3, max: 258 }).map((id) => [id]),
  codePoint.map(byteIds),
  codePoint.chain((c) => fc.integer({ min: 1, max: 3 }).map((n) => byteIds(c).slice(0, n))),
)
const ids = (chunk: fc.Arbitrary<Array<number>>) => fc.array(chunk, { maxLength: 40 }).map((chunks) => chunks.flat())
const promptText = fc.string({ unit: "grapheme", maxLength: 20 }).filter((t) => !/<\/?s>|<unk>|\u2581/.test(t))

describe("HfTokenizer", () => {
  it.effect("streams the README continuation: ',' then ' there'", () =>
    Effect.gen(function* () {
      const tok = yield* loadTokenizer
      const prompt = yield* tok.encode("Once upon a time")
      expect(prompt).toEqual([1, 403, 407, 261, 378])
      const detok = tok.detokenizer(prompt)
      expect(detok.push(432)).toBe(",")
      expect(detok.push(383)).toBe(" there")
      expect(detok.flush()).toBe("")
      expect(tok.vocabSize).toBe(512)
      expect(tok.idToToken(410)).toBe("\u2581")
      expect(tok.idToToken(512)).toBeUndefined()
    }),
  )

  it.effect("streams the reference run exactly", () =>
    Effect.gen(function* () {
      const tok = yield* loadTokenizer
      expect(yield* tok.decode(REFERENCE_IDS)).toBe(REFERENCE_TEXT)
      for (const promptLength of [0, 1, 5, 20]) {
        const prompt = REFERENCE_IDS.slice(0, promptLength)
        const { deltas, flushed } = stream(tok, prompt, REFERENCE_IDS.slice(promptLength))
        const expected = continuation(tok, prompt, REFERENCE_IDS.slice(promptLength))
        expect(deltas.join("") + flushed).toBe(expected)
        expect(flushed).toBe("")
        expect(deltas.some((d) => d.includes(FFFD))).toBe(false)
      }
      // Each generated token emits its own text at once (no byte tokens in this run except "\n").
      const { deltas } = stream(tok, REFERENCE_IDS.slice(0, 5), REFERENCE_IDS.slice(5, 10))
      expect(deltas).toEqual([",", " there", " was", " a", " little"])
    }),
  )

  it.effect("holds back an incomplete character until its last byte", () =>
    Effect.gen(function* () {
      const tok = yield* loadTokenizer
      const prompt = yield* tok.encode("It")
      const detok = tok.detokenizer(prompt)
      // U+2019 RIGHT SINGLE QUOTATION MARK is E2 80 99; U+1F642 is F0 9F 99 82.
      expect(byteIds("\u2019s 🙂").map((id) => detok.push(id))).toEqual(["", "", "\u2019", "s", " ", "", "", "", "🙂"])
      // An invalid sequence is emitted, as U+FFFD, once a later token shows it cannot complete.
      expect(detok.push(0xe2 + 3)).toBe("")
      expect(detok.push(410)).toBe(`${FFFD} `)
      expect(detok.push(0xf0 + 3)).toBe("")
      expect(detok.flush()).toBe(FFFD)
      // A prompt that ends inside a character: the continuation completes it.
      const cut = tok.detokenizer([...prompt, 0xe2 + 3, 0x80 + 3])
      expect(cut.push(0x99 + 3)).toBe("\u2019")
    }),
  )

  it.effect("stream == whole decode for random prompts and continuations", () =>
    Effect.gen(function* () {
      const tok = yield* loadTokenizer
      const check = (prompt: ReadonlyArray<number>, generated: ReadonlyArray<number>, valid: boolean) => {
        const expected = continuation(tok, prompt, generated)
        const detok = tok.detokenizer(prompt)
        let streamed = ""
        for (const id of generated) {
          const delta = detok.push(id)
          if (valid) expect(delta).not.toContain(FFFD)
          streamed += delta
          // Text once emitted is final.
          expect(expected.startsWith(streamed)).toBe(true)
        }
        const flushed = detok.flush()
        if (valid) expect(flushed).toBe("")
        expect(streamed + flushed).toBe(expected)
      }
      const encoded = promptText.chain((text) =>
        fc.boolean().map((bos) => [...Effect.runSync(tok.encode(text, { addSpecialTokens: bos }))]),
      )
      fc.assert(
        fc.property(encoded, ids(validChunk), (p, g) => check(p, g, true)),
        { numRuns: 300 },
      )
      fc.assert(
        fc.property(encoded, ids(anyChunk), (p, g) => check(p, g, false)),
        { numRuns: 500 },
      )
      // Prompts of raw valid ids too (specials, byte-spelled characters), including a prompt that is only BOS.
      fc.assert(
        fc.property(ids(validChunk), ids(anyChunk), (p, g) => check(p, g, false)),
        { numRuns: 300 },
      )
      check([1], [410, 410, 383, 2, 383], true)
      // Context reaches back past special tokens, so the first token's leading space survives.
      check([403, 2, 2, 2, 2, 2, 2], [383, 2, 383], true)
      expect(stream(tok, [403, 2, 2, 2, 2, 2, 2], [383]).deltas).toEqual([" there"])
    }),
  )

  it.effect("round-trips text through encode and decode", () =>
    Effect.gen(function* () {
      const tok = yield* loadTokenizer
      const texts = [
        "",
        "Once upon a time",
        " leading and trailing spaces ",
        "  double  spaces",
        "tabs\tand\nnewlines\r\n",
        "café naïve résumé Ünïcödé",
        "e\u0301 a\u0308 n\u0303 combining marks",
        "emoji 🙂🎉👩‍👩‍👧 flags 🇺🇸",
        "日本語 中文 한국어",
        "Привет, мир! Γειά σου",
        "\u0000 nul and \u007f del",
        "mixed: 3.14 <tag> & \"quotes\" 'single' `back`",
      ]
      for (const text of texts) {
        expect(yield* tok.decode(yield* tok.encode(text))).toBe(text)
        expect(yield* tok.decode(yield* tok.encode(text, { addSpecialTokens: false }))).toBe(text)
      }
      expect((yield* tok.encode("Once upon a time", { addSpecialTokens: false }))[0]).toBe(403)
      fc.assert(
        fc.property(fc.string({ unit: "binary", maxLength: 40 }), fc.string({ unit: "grapheme" }), (a, b) => {
          const text = (a + b).replaceAll("\u2581", "").replace(/<\/?s>|<unk>/g, "")
          expect(Effect.runSync(tok.decode(Effect.runSync(tok.encode(text))))).toBe(text)
        }),
        { numRuns: 300 },
      )
    }),
  )

  it.effect("loads from a file as the Tokenizer service and reports bad input as TokenizerError", () =>
    Effect.gen(function* () {
      const dir = yield* Effect.acquireRelease(
        Effect.promise(() => mkdtemp(join(tmpdir(), "offramp-hftok-"))),
        (d) => Effect.promise(() => rm(d, { recursive: true, force: true })),
      )
      const path = join(dir, "tokenizer.json")
      const json = yield* tokenizerJson
      yield* Effect.promise(() => writeFile(path, JSON.stringify(json)))
      yield* Effect.promise(() =>
        writeFile(join(dir, "tokenizer_config.json"), JSON.stringify(LLAMA2C_TOKENIZER_CONFIG)),
      )

      const ids = yield* Effect.flatMap(Tokenizer, (tok) => tok.encode("Once upon a time")).pipe(
        Effect.provide(HfTokenizer.layer(path)),
      )
      expect(ids).toEqual([1, 403, 407, 261, 378])

      const tok = yield* HfTokenizer.fromFile(path)
      const badId = yield* Effect.flip(tok.decode([1, 512]))
      expect(badId._tag).toBe("TokenizerError")
      expect(badId.message).toContain("token id 512 is not in the vocabulary (size 512)")
      expect(yield* Effect.flip(tok.decode([0.5]))).toMatchObject({ _tag: "TokenizerError" })
      expect(yield* tok.decode([])).toBe("")
      expect(() => tok.detokenizer([1]).push(-1)).toThrow(/token id -1/)

      const missing = yield* Effect.flip(HfTokenizer.fromFile(join(dir, "nope.json")))
      expect(missing.message).toContain("nope.json")
      yield* Effect.promise(() => writeFile(join(dir, "broken.json"), "{"))
      expect((yield* Effect.flip(HfTokenizer.fromFile(join(dir, "broken.json")))).message).toContain("broken.json")
      const invalid = yield* Effect.flip(HfTokenizer.fromJson({ model: {} }))
      expect(invalid.message).toContain("invalid tokenizer.json")
    }).pipe(Effect.scoped),
  )
})
