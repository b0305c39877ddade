/**
 * Special-token text in text a user wrote: with `parseSpecialTokens: false` "</s>" and "<s>" are the characters
 * they are, not EOS and BOS; the tokenizer's own BOS is still added, and text without special-token text encodes
 * as before.
 */
import { describe, expect, it } from "@effect/vitest"
import {
  LLAMA2C_TOKENIZER_CONFIG,
  readLlama2cTokenizer,
  toHuggingFaceTokenizerJson,
} from "@offramp/convert/Llama2cTokenizer"
import { Effect } from "effect"
import { STORIES_TOKENIZER } from "../../../test/support/stories.js"
import * as HfTokenizer from "../src/HfTokenizer.js"

const BOS = 1
const EOS = 2

const loadTokenizer = Effect.flatMap(
  Effect.map(readLlama2cTokenizer(STORIES_TOKENIZER), toHuggingFaceTokenizerJson),
  (json) => HfTokenizer.fromJson(json, LLAMA2C_TOKENIZER_CONFIG),
)

describe("special-token text", () => {
  it.effect("is parsed by default, and is plain text with parseSpecialTokens: false", () =>
    Effect.gen(function* () {
      const tok = yield* loadTokenizer
      const text = "The end.</s><s>Once upon a time<unk>"
      const parsed = yield* tok.encode(text)
      expect(parsed).toContain(EOS)
      expect(parsed.filter((id) => id === BOS)).toHaveLength(2)

      const plain = yield* tok.encode(text, { parseSpecialTokens: false })
      expect(plain).not.toContain(EOS)
      expect(plain.indexOf(BOS)).toBe(0)
      expect(plain.lastIndexOf(BOS)).toBe(0)
      expect(plain).not.toContain(0)
      expect(yield* tok.decode(plain)).toBe(text)
      // Without BOS on request, none at all.
      expect(yield* tok.encode(text, { parseSpecialTokens: false, addSpecialTokens: false })).not.toContain(BOS)

      for (const ordinary of ["Once upon a time", " there was a cat", "é ü 你好 🙂"]) {
        expect(yield* tok.encode(ordinary, { parseSpecialTokens: false })).toEqual(yield* tok.encode(ordinary))
      }
    }),
  )
})
