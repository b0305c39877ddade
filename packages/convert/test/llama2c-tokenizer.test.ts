import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { describe, expect, it } from "@effect/vitest"
import { Tokenizer } from "@huggingface/tokenizers"
import { Effect } from "effect"
import * as fc from "fast-check"
import { REFERENCE_IDS, REFERENCE_TEXT, STORIES_TOKENIZER as tokPath } from "../../../test/support/stories.js"
import {
  LLAMA2C_TOKENIZER_CONFIG,
  parseLlama2cTokenizer,
  readLlama2cTokenizer,
  toHuggingFaceTokenizerJson,
} from "../src/Llama2cTokenizer.js"

/**
 * llama2.c run.c's `encode`, written independently of the converter: its own file parser, BOS, dummy-prefix " ",
 * per-codepoint lookup with byte fallback (byte + 3), then repeatedly merge the adjacent pair whose concatenation
 * is the best-scoring piece (first one on ties).
 */
const makeReferenceEncoder = (bytes: Uint8Array) => {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const pieces: Array<string> = []
  const scores: Array<number> = []
  for (let offset = 4; offset < bytes.byteLength; ) {
    scores.push(view.getFloat32(offset, true))
    const len = view.getInt32(offset + 4, true)
    pieces.push(new TextDecoder().decode(bytes.subarray(offset + 8, offset + 8 + len)))
    offset += 8 + len
  }
  const lookup = new Map(pieces.map((piece, id) => [piece, id]))
  return (text: string): Array<number> => {
    const tokens = [1]
    if (text.length > 0) tokens.push(lookup.get(" ")!)
    for (const char of text) {
      const id = lookup.get(char)
      if (id !== undefined) tokens.push(id)
      else for (const byte of new TextEncoder().encode(char)) tokens.push(byte + 3)
    }
    for (;;) {
      let bestScore = -1e10
      let bestId = -1
      let bestIdx = -1
      for (let i = 0; i < tokens.length - 1; i++) {
        const id = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
        if (id !== undefined && scores[id] > bestScore) {
          bestScore = scores[id]
          bestId = id
          bestIdx = i
        }
      }
      if (bestIdx === -1) return tokens
      tokens.splice(bestIdx, 2, bestId)
    }
  }
}

const loadHf = Effect.gen(function* () {
  const vocab = yield* readLlama2cTokenizer(tokPath, { vocabSize: 512 })
  // A JSON round trip proves the object is plain data, as it will be when written to tokenizer.json.
  const json = JSON.parse(JSON.stringify(toHuggingFaceTokenizerJson(vocab)))
  return new Tokenizer(json, { ...LLAMA2C_TOKENIZER_CONFIG })
})

const VARIED = [
  "Once upon a time",
  "",
  " ",
  "  two  spaces  ",
  "a",
  "Hello, world!",
  "The cat sat on the mat. The dog ran.",
  'Lily said, "Let\'s go to the park!"',
  "It was 3:45 pm on 12/31/1999; 100% sure?",
  "1234567890",
  "line one\nline two\n\nline four\n",
  "\ttabbed\tline\r\nwindows",
  "café",
  "naïve résumé",
  "Ünïcödé ÄÖÜ ß",
  "smile 🙂 please",
  "🙂🙂",
  "日本語のテキスト",
  "Привет, мир",
  "e\u0301 combining",
  "x+y=z; a*b/c - (d^e) [f] {g} <h> |i| ~j` @k #l $m & _n_",
  "She was very happy. He was sad... Why?!",
  "They played and played until the sun went down.",
  "Tom's ball, Sue's doll, and Max's car.",
  "once UPON a TiMe",
  "a\u00a0non-breaking space",
  "trailing space ",
  " leading space",
  "----====____",
  "ends with a newline\n",
  "mixed 🙂café\n日本 42!",
  "Zoë's naïve coöperation — “quoted” ‘text’ …",
]

describe("llama2.c tokenizer conversion", () => {
  it.effect("encodes the README prompt like run.c", () =>
    Effect.gen(function* () {
      const hf = yield* loadHf
      expect(hf.encode("Once upon a time").ids).toEqual([1, 403, 407, 261, 378])
    }),
  )

  it.effect("decodes the reference run exactly", () =>
    Effect.gen(function* () {
      const hf = yield* loadHf
      const text = hf.decode(REFERENCE_IDS, { skip_special_tokens: true, clean_up_tokenization_spaces: false })
      expect(text).toBe(REFERENCE_TEXT)
      expect(hf.decode(REFERENCE_IDS, { skip_special_tokens: true })).toBe(REFERENCE_TEXT)
    }),
  )

  it.effect("matches an independent llama2.c encoder on varied text", () =>
    Effect.gen(function* () {
      const hf = yield* loadHf
      const reference = makeReferenceEncoder(yield* Effect.promise(() => readFile(tokPath)))
      expect(reference("Once upon a time")).toEqual([1, 403, 407, 261, 378])
      for (const text of [...VARIED, REFERENCE_TEXT]) {
        expect({ text, ids: hf.encode(text).ids }).toEqual({ text, ids: reference(text) })
      }
      // Byte fallback really happens for characters outside the 512-piece vocabulary.
      expect(hf.encode("🙂", { add_special_tokens: false }).ids).toEqual([410, 0xf0 + 3, 0x9f + 3, 0x99 + 3, 0x82 + 3])
    }),
  )

  it.effect("matches the independent encoder on random text", () =>
    Effect.gen(function* () {
      const hf = yield* loadHf
      const vocab = yield* readLlama2cTokenizer(tokPath)
      const reference = makeReferenceEncoder(yield* Effect.promise(() => readFile(tokPath)))
      const alphabet = [..."abcdehilmnorstuwy ABLOST.,!?'\"\n0123456789", "é", "ï", "🙂", "日", "\u0301"]
      // Whole pieces glued together exercise competing merges; "<s>"-like text is left out because HF splits
      // added special tokens out of the text and llama2.c does not.
      const chunk = fc.oneof(fc.constantFrom(...alphabet), fc.constantFrom(...vocab.pieces.slice(259)))
      const text = fc.array(chunk, { maxLength: 40 }).map((chunks) => chunks.join(""))
      fc.assert(
        fc.property(text, (t) => {
          expect(hf.encode(t).ids).toEqual(reference(t))
        }),
        { numRuns: 500 },
      )
    }),
  )

  it.effect("rejects truncated and corrupt files with a CheckpointError naming the path", () =>
    Effect.gen(function* () {
      const bytes = yield* Effect.promise(() => readFile(tokPath))
      const dir = yield* Effect.acquireRelease(
        Effect.promise(() => mkdtemp(join(tmpdir(), "offramp-tok-"))),
        (d) => Effect.promise(() => rm(d, { recursive: true, force: true })),
      )
      const truncated = join(dir, "tok512-truncated.bin")
      yield* Effect.promise(() => writeFile(truncated, bytes.subarray(0, bytes.byteLength - 3)))
      const error = yield* Effect.flip(readLlama2cTokenizer(truncated))
      expect(error._tag).toBe("CheckpointError")
      expect(error.path).toBe(truncated)
      expect(error.message).toMatch(/truncated: id 511 needs \d+ piece bytes/)

      // Cut at a record boundary: only the expected vocab size can tell.
      const vocab = yield* parseLlama2cTokenizer(bytes, tokPath)
      const boundary = bytes.byteLength - 8 - new TextEncoder().encode(vocab.pieces[511]).byteLength
      const short = yield* Effect.flip(
        parseLlama2cTokenizer(bytes.subarray(0, boundary), "short.bin", { vocabSize: 512 }),
      )
      expect(short.message).toMatch(/truncated: record of id 511/)
      expect(short.message).toContain("expected 512 records")

      const corrupt = new Uint8Array(bytes)
      new DataView(corrupt.buffer).setInt32(4 + 4, 1_000_000, true)
      const bad = yield* Effect.flip(parseLlama2cTokenizer(corrupt, "corrupt.bin"))
      expect(bad.message).toContain("id 0 at byte 8 has length 1000000")

      const missing = yield* Effect.flip(readLlama2cTokenizer(join(dir, "nope.bin")))
      expect(missing.message).toContain("cannot read")
      expect((yield* Effect.flip(parseLlama2cTokenizer(new Uint8Array(2), "tiny.bin"))).message).toContain("2 bytes")
      const extra = yield* Effect.flip(
        parseLlama2cTokenizer(new Uint8Array([...bytes, 0]), "x.bin", { vocabSize: 512 }),
      )
      expect(extra.message).toContain("1 trailing bytes")
    }).pipe(Effect.scoped),
  )
})
