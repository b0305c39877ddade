/**
 * `maxTokenBytes`: a text of b bytes has at least ceil(b / maxTokenBytes) tokens (what lets the server refuse an
 * over-long prompt without tokenizing it), and tokenizers for which no such bound holds report none.
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "@effect/vitest"
import {
  LLAMA2C_TOKENIZER_CONFIG,
  readLlama2cTokenizer,
  toHuggingFaceTokenizerJson,
} from "@offramp/convert/Llama2cTokenizer"
import type { TokenizerShape } from "@offramp/core/Tokenizer"
import { Effect } from "effect"
import * as fc from "fast-check"
import { REPO_ROOT, STORIES_TOKENIZER } from "../../../test/support/stories.js"
import * as HfTokenizer from "../src/HfTokenizer.js"

const DEFAULT_JSON = JSON.parse(readFileSync(join(REPO_ROOT, "models/default/tokenizer.json"), "utf8"))
const byteLevel = Effect.runSync(HfTokenizer.fromJson(DEFAULT_JSON))
const llama2c = await Effect.runPromise(
  Effect.flatMap(Effect.map(readLlama2cTokenizer(STORIES_TOKENIZER), toHuggingFaceTokenizerJson), (json) =>
    HfTokenizer.fromJson(json, LLAMA2C_TOKENIZER_CONFIG),
  ),
)

const utf8Length = (text: string) => new TextEncoder().encode(text).length
const count = (tok: TokenizerShape, text: string) => Effect.runSync(tok.encode(text)).length
const lowerBound = (tok: TokenizerShape, text: string) => Math.ceil(utf8Length(text) / tok.maxTokenBytes!)

/** Texts that pack many bytes into few tokens: runs of the vocabulary's longest tokens, and arbitrary Unicode. */
const texts = (tok: TokenizerShape) => {
  const pieces = Array.from({ length: tok.vocabSize }, (_, id) => Effect.runSync(tok.decode([id])))
    .filter((t) => t !== "")
    .sort((a, b) => utf8Length(b) - utf8Length(a))
    .slice(0, 64)
  return fc.array(
    fc.oneof(
      fc.constantFrom(...pieces),
      fc.string({ unit: "binary", maxLength: 8 }),
      fc.constantFrom(" ", "  ", "\n", "\u2581", "é", "😀"),
    ),
    { maxLength: 60 },
  )
}

describe("maxTokenBytes", () => {
  it("bounds the tokens of any text from below, for a byte-level BPE and a byte-fallback BPE", () => {
    expect(byteLevel.maxTokenBytes).toBe(17)
    expect(llama2c.maxTokenBytes).toBeGreaterThan(1)
    for (const tok of [byteLevel, llama2c]) {
      fc.assert(
        fc.property(texts(tok), (parts) => {
          const text = parts.join("")
          expect(count(tok, text)).toBeGreaterThanOrEqual(lowerBound(tok, text))
        }),
        { numRuns: 300 },
      )
    }
  })

  it("is undefined where a token can stand for more text than its own", () => {
    const variant = (patch: object, config?: object) =>
      Effect.runSync(HfTokenizer.fromJson({ ...DEFAULT_JSON, ...patch }, config)).maxTokenBytes
    // A normalizer that deletes text: 1000 spaces are 0 tokens, not at least 1000 / 17.
    const deletes = { normalizer: { type: "Replace", pattern: { String: " " }, content: "" } }
    expect(
      Effect.runSync(
        Effect.flatMap(HfTokenizer.fromJson({ ...DEFAULT_JSON, ...deletes }), (t) =>
          t.encode(" ".repeat(1000), { addSpecialTokens: false }),
        ),
      ),
    ).toEqual([])
    expect(variant(deletes)).toBeUndefined()
    expect(variant({ normalizer: { type: "NFKC" } })).toBeUndefined()
    expect(
      variant({
        normalizer: { type: "Sequence", normalizers: [{ type: "Prepend", prepend: "_" }, { type: "Lowercase" }] },
      }),
    ).toBeUndefined()
    expect(variant({ pre_tokenizer: { type: "Whitespace" } })).toBeUndefined()
    expect(variant({ pre_tokenizer: { type: "Split", pattern: { String: " " }, behavior: "Removed" } })).toBeUndefined()
    expect(
      variant({
        added_tokens: [
          ...DEFAULT_JSON.added_tokens,
          { ...DEFAULT_JSON.added_tokens[1], id: 4096, content: "<x>", lstrip: true },
        ],
      }),
    ).toBeUndefined()
    expect(variant({}, { remove_space: true })).toBeUndefined()
    // Without the byte-level pre-tokenizer a character outside the vocabulary has no token of its own.
    expect(variant({ pre_tokenizer: null })).toBeUndefined()
    expect(variant({ model: { ...DEFAULT_JSON.model, type: "WordPiece", unk_token: "<|eos|>" } })).toBeUndefined()
    // Non-shrinking steps keep the bound.
    expect(
      variant({
        normalizer: {
          type: "Sequence",
          normalizers: [
            { type: "Prepend", prepend: " " },
            { type: "Replace", pattern: { String: "a" }, content: "aa" },
          ],
        },
      }),
    ).toBe(17)
  })
})
