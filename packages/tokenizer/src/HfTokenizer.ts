/**
 * The Tokenizer service on @huggingface/tokenizers, with UTF-8-safe streaming detokenization.
 */
import { readFile } from "node:fs/promises"
import { dirname, join } from "node:path"
import { Tokenizer as HfCoreTokenizer } from "@huggingface/tokenizers"
import { type DetokenizerStream, Tokenizer, TokenizerError, type TokenizerShape } from "@offramp/core"
import { Effect, Layer } from "effect"

/** Ids of prompt context decoded before the first generated id (as vLLM: enough for any decoder look-behind). */
const PROMPT_CONTEXT = 5
const REPLACEMENT = "\uFFFD"
const BYTE_TOKEN = /^<0x([0-9A-Fa-f]{2})>$/

// Decoding with clean-up (" ," -> ",") would change text already streamed, so it is always off.
const DECODE_OPTIONS = { skip_special_tokens: true, clean_up_tokenization_spaces: false } as const

const errorMessage = (error: unknown): string => (error instanceof Error ? error.message : String(error))

const commonPrefixLength = (a: string, b: string): number => {
  let i = 0
  while (i < a.length && i < b.length && a[i] === b[i]) i++
  return i
}

/** Wraps a loaded @huggingface/tokenizers tokenizer as the Offramp `TokenizerShape`. */
const make = (hf: HfCoreTokenizer): TokenizerShape => {
  const tokens: Array<string | undefined> = []
  for (const [token, id] of hf.get_vocab(true)) tokens[id] = token
  const vocabSize = tokens.length
  const special = new Set<number>()
  for (const added of hf.get_added_tokens_decoder().values()) if (added.special) special.add(added.id)
  const invalidId = (id: number): string | undefined =>
    Number.isInteger(id) && id >= 0 && id < vocabSize && tokens[id] !== undefined
      ? undefined
      : `token id ${id} is not in the vocabulary (size ${vocabSize})`
  // tokenizers.js throws on an empty id array; an empty sequence is simply "".
  const decodeUnchecked = (ids: ReadonlyArray<number>): string =>
    ids.length === 0 ? "" : hf.decode([...ids], DECODE_OPTIONS)
  const isContinuationByte = (id: number): boolean => {
    const match = BYTE_TOKEN.exec(tokens[id] ?? "")
    return match !== null && (Number.parseInt(match[1], 16) & 0xc0) === 0x80
  }
  const throwIfInvalid = (ids: ReadonlyArray<number>): void => {
    for (const id of ids) {
      const problem = invalidId(id)
      // The stream API is synchronous; a bad id is a caller bug, so it surfaces as a defect.
      if (problem !== undefined) throw new TokenizerError({ message: `detokenizer: ${problem}` })
    }
  }

  const detokenizer = (promptIds: ReadonlyArray<number>): DetokenizerStream => {
    throwIfInvalid(promptIds)
    // The window starts in the prompt, on a character boundary, and holds a token with text: the decoder strips
    // one leading space of what it decodes, and that must fall on context, not on the first generated token.
    let start = Math.max(0, promptIds.length - PROMPT_CONTEXT)
    let hasText = promptIds.slice(start).some((id) => !special.has(id))
    while (start > 0 && (isContinuationByte(promptIds[start]) || !hasText)) {
      start--
      hasText ||= !special.has(promptIds[start])
    }
    // ids: the window; ids[0..read) is context whose text is `prefix` and was emitted (or is prompt).
    let ids = promptIds.slice(start)
    let read = ids.length
    let prefix = decodeUnchecked(ids)

    const advance = (text: string): string => {
      // A prompt that ends inside a character decodes with a U+FFFD that the continuation completes.
      const delta = text.slice(text.startsWith(prefix) ? prefix.length : commonPrefixLength(text, prefix))
      if (delta.length > 0) {
        ids = ids.slice(read)
        read = ids.length
        prefix = decodeUnchecked(ids)
      }
      return delta
    }

    return {
      push: (id) => {
        throwIfInvalid([id])
        ids.push(id)
        const text = decodeUnchecked(ids)
        // A trailing U+FFFD is (usually) a character whose remaining bytes have not been generated yet.
        return text.endsWith(REPLACEMENT) ? "" : advance(text)
      },
      flush: () => advance(decodeUnchecked(ids)),
    }
  }

  return {
    vocabSize,
    encode: (text, options) =>
      Effect.try({
        try: () => hf.encode(text, { add_special_tokens: options?.addSpecialTokens ?? true }).ids,
        catch: (error) => new TokenizerError({ message: `cannot encode text: ${errorMessage(error)}` }),
      }),
    decode: (ids) =>
      Effect.suspend(() => {
        for (const id of ids) {
          const problem = invalidId(id)
          if (problem !== undefined) return Effect.fail(new TokenizerError({ message: `cannot decode: ${problem}` }))
        }
        return Effect.try({
          try: () => decodeUnchecked(ids),
          catch: (error) => new TokenizerError({ message: `cannot decode: ${errorMessage(error)}` }),
        })
      }),
    detokenizer,
    idToToken: (id) => tokens[id],
  }
}

/**
 * Loads a tokenizer from a `tokenizer.json` object and an optional `tokenizer_config.json` object.
 * Clean-up of tokenization spaces is always off (it is lossy and would break streaming).
 */
export const fromJson = (json: unknown, config?: object): Effect.Effect<TokenizerShape, TokenizerError> =>
  Effect.try({
    try: () => make(new HfCoreTokenizer(json as object, { ...config, clean_up_tokenization_spaces: false })),
    catch: (error) => new TokenizerError({ message: `invalid tokenizer.json: ${errorMessage(error)}` }),
  })

/** Reads a JSON file; `undefined` when `optional` and the file does not exist. */
const readJson = (path: string, optional = false) =>
  Effect.tryPromise({
    try: async () => {
      const text = await readFile(path, "utf8").catch((error: NodeJS.ErrnoException) => {
        if (optional && error.code === "ENOENT") return undefined
        throw error
      })
      return text === undefined ? undefined : (JSON.parse(text) as unknown)
    },
    catch: (error) => new TokenizerError({ message: `cannot read ${path}: ${errorMessage(error)}` }),
  })

/** Loads `tokenizer.json` from `path`, with the `tokenizer_config.json` next to it when there is one. */
export const fromFile = (path: string): Effect.Effect<TokenizerShape, TokenizerError> =>
  Effect.gen(function* () {
    const json = yield* readJson(path)
    const configPath = join(dirname(path), "tokenizer_config.json")
    const config = yield* readJson(configPath, true)
    if (config !== undefined && (typeof config !== "object" || config === null || Array.isArray(config))) {
      return yield* new TokenizerError({ message: `${configPath} is not a JSON object` })
    }
    return yield* fromJson(json, config).pipe(
      Effect.mapError((e) => new TokenizerError({ message: `${path}: ${e.message}` })),
    )
  })

/** The `Tokenizer` service loaded from a `tokenizer.json` file. */
export const layer = (path: string): Layer.Layer<Tokenizer, TokenizerError> => Layer.effect(Tokenizer, fromFile(path))
