/**
 * The Tokenizer service: text <-> token ids, and streaming detokenization.
 * The implementation on @huggingface/tokenizers lives in @offramp/tokenizer.
 */
import { Context, type Effect } from "effect"
import type { TokenizerError } from "./Errors.js"

/** Turns a growing sequence of generated ids into text deltas that never split a UTF-8 character. */
export interface DetokenizerStream {
  /** Feeds one generated id; returns the text that became final with it (possibly ""). */
  readonly push: (id: number) => string
  /** Returns whatever text is still held back (an incomplete character is emitted as U+FFFD). */
  readonly flush: () => string
}

export interface TokenizerShape {
  readonly vocabSize: number
  /**
   * Encodes text; with `addSpecialTokens` (default true) the model's BOS (and template) is added as the model
   * expects. With `parseSpecialTokens` (default true) the text of a special token (e.g. "</s>") becomes its id;
   * false encodes it as the text it is (for text a user wrote; added tokens that are not special still match).
   */
  readonly encode: (
    text: string,
    options?: { readonly addSpecialTokens?: boolean; readonly parseSpecialTokens?: boolean },
  ) => Effect.Effect<ReadonlyArray<number>, TokenizerError>
  /** Decodes ids to text, skipping special tokens. */
  readonly decode: (ids: ReadonlyArray<number>) => Effect.Effect<string, TokenizerError>
  /** Starts incremental detokenization of a continuation that follows `promptIds`. */
  readonly detokenizer: (promptIds: ReadonlyArray<number>) => DetokenizerStream
  readonly idToToken: (id: number) => string | undefined
  /**
   * The most UTF-8 bytes of input text one token can stand for, when the tokenizer guarantees a bound: a text of b
   * bytes then has at least ceil(b / maxTokenBytes) tokens, which rejects an over-long prompt without encoding it.
   * Undefined when no bound holds (a normalizer or pre-tokenizer that drops or shrinks text, an unknown token that
   * can swallow a word, an added token that strips the whitespace around it).
   */
  readonly maxTokenBytes: number | undefined
}

export class Tokenizer extends Context.Tag("@offramp/core/Tokenizer")<Tokenizer, TokenizerShape>() {}
