/**
 * The Tokenizer service on @huggingface/tokenizers, with UTF-8-safe streaming detokenization.
 */
import { readFile } from "node:fs/promises"
import { dirname, join } from "node:path"
import { Tokenizer as HfCoreTokenizer } from "@huggingface/tokenizers"
import { TokenizerError } from "@offramp/core/Errors"
import { type DetokenizerStream, Tokenizer, type TokenizerShape } from "@offramp/core/Tokenizer"
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

type JsonObject = { readonly [key: string]: unknown }
const isObject = (value: unknown): value is JsonObject =>
  typeof value === "object" && value !== null && !Array.isArray(value)
const utf8Length = (text: string) => Buffer.byteLength(text, "utf8")

/** GPT-2's byte-level alphabet: the character a ByteLevel pre-tokenizer writes for each byte. */
const BYTE_LEVEL_CHARS = (() => {
  let shifted = 0
  return Array.from({ length: 256 }, (_, b) =>
    String.fromCharCode((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174 ? b : 256 + shifted++),
  )
})()
const BYTE_FALLBACK_TOKENS = Array.from(
  { length: 256 },
  (_, b) => `<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`,
)

/**
 * Whether a normalizer or pre-tokenizer keeps every byte of the text: it only adds text (Prepend, ByteLevel,
 * Metaspace), splits it without dropping any (Digits, Punctuation, Split that keeps its delimiters), or replaces a
 * string with one at least as long. NFC, lowercasing, stripping and the like can shrink text, so they do not.
 */
const keepsEveryByte = (step: unknown, kind: "normalizers" | "pretokenizers"): boolean => {
  if (step === null || step === undefined) return true
  if (!isObject(step)) return false
  switch (step.type) {
    case "Sequence": {
      const steps = step[kind]
      return Array.isArray(steps) && steps.every((s) => keepsEveryByte(s, kind))
    }
    case "Replace":
      return (
        isObject(step.pattern) &&
        typeof step.pattern.String === "string" &&
        typeof step.content === "string" &&
        utf8Length(step.content) >= utf8Length(step.pattern.String)
      )
    case "Prepend":
      return kind === "normalizers"
    case "ByteLevel":
    case "Metaspace":
    case "Digits":
    case "Punctuation":
      return kind === "pretokenizers"
    case "Split":
      return kind === "pretokenizers" && step.invert !== true && String(step.behavior).toLowerCase() !== "removed"
    default:
      return false
  }
}

const hasByteLevel = (step: unknown): boolean =>
  isObject(step) &&
  (step.type === "ByteLevel" ||
    (step.type === "Sequence" && Array.isArray(step.pretokenizers) && step.pretokenizers.some(hasByteLevel)))

/**
 * `TokenizerShape.maxTokenBytes`: the longest token's UTF-8 length, when one token can never stand for more bytes of
 * the input than its own text has. That holds for a BPE whose normalizer and pre-tokenizer keep every byte, that turns
 * every byte into vocabulary tokens (a byte-level alphabet or byte fallback, all 256 present; every merge in the
 * vocabulary), so no unknown token or dropped character ever appears, and whose added tokens strip no whitespace.
 * A byte-level or "▁" character stands for one input byte but is longer in UTF-8, so the bound is only looser.
 */
const maxTokenBytesOf = (
  json: unknown,
  config: object | undefined,
  tokens: ReadonlyArray<string | undefined>,
): number | undefined => {
  if (!isObject(json) || !isObject(json.model) || json.model.type !== "BPE") return undefined
  const { model } = json
  // tokenizers.js options that trim or lowercase the text before the normalizer.
  const options: JsonObject = isObject(config) ? config : {}
  if (options.remove_space === true || options.do_lowercase_and_remove_accent === true) return undefined
  if (!keepsEveryByte(json.normalizer, "normalizers") || !keepsEveryByte(json.pre_tokenizer, "pretokenizers"))
    return undefined
  const added = Array.isArray(json.added_tokens) ? json.added_tokens : []
  if (added.some((t) => isObject(t) && (t.lstrip === true || t.rstrip === true))) return undefined
  const vocab = new Set(tokens.filter((t) => t !== undefined))
  const everyByte =
    (model.byte_fallback === true && BYTE_FALLBACK_TOKENS.every((t) => vocab.has(t))) ||
    (hasByteLevel(json.pre_tokenizer) && BYTE_LEVEL_CHARS.every((t) => vocab.has(t)))
  const merges = Array.isArray(model.merges) ? model.merges : []
  const mergesInVocab = merges.every((m) => {
    const pair = typeof m === "string" ? m.split(" ", 2) : m
    return Array.isArray(pair) && vocab.has(pair.join(""))
  })
  if (!everyByte || !mergesInVocab) return undefined
  let longest = 0
  for (const token of vocab) longest = Math.max(longest, utf8Length(token))
  return longest
}

/**
 * A tokenizer that encodes the text of special tokens as text. @huggingface/tokenizers has no option for it (no
 * `split_special_tokens`), so this is the same tokenizer without its special added tokens: the rest (normalizer,
 * pre-tokenizer, model, the other added tokens, the post-processor) is unchanged. It returns token strings; their ids
 * are the full tokenizer's, since a post-processor's special tokens (BOS) may be only among the added tokens.
 */
const withoutSpecialTokens = (json: unknown, config: object | undefined): HfCoreTokenizer => {
  const source = json as { readonly added_tokens?: ReadonlyArray<{ readonly special?: boolean }> }
  const added = (source.added_tokens ?? []).filter((token) => token.special !== true)
  return new HfCoreTokenizer({ ...source, added_tokens: added }, { ...config, clean_up_tokenization_spaces: false })
}

/** Wraps a loaded @huggingface/tokenizers tokenizer as the Offramp `TokenizerShape`. */
const make = (hf: HfCoreTokenizer, json: unknown, config: object | undefined): TokenizerShape => {
  const tokens: Array<string | undefined> = []
  const vocab = hf.get_vocab(true)
  for (const [token, id] of vocab) tokens[id] = token
  // Built on first use: most prompts a server gets are a user's.
  let plain: HfCoreTokenizer | undefined
  const encodeAsText = (text: string, addSpecialTokens: boolean): Array<number> => {
    plain ??= withoutSpecialTokens(json, config)
    return plain.tokenize(text, { add_special_tokens: addSpecialTokens }).map((token: string) => {
      const id = vocab.get(token)
      if (id === undefined) throw new Error(`the token ${JSON.stringify(token)} is not in the vocabulary`)
      return id
    })
  }
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
        try: () =>
          options?.parseSpecialTokens === false
            ? encodeAsText(text, options.addSpecialTokens ?? true)
            : hf.encode(text, { add_special_tokens: options?.addSpecialTokens ?? true }).ids,
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
    maxTokenBytes: maxTokenBytesOf(json, config, tokens),
  }
}

/**
 * Loads a tokenizer from a `tokenizer.json` object and an optional `tokenizer_config.json` object.
 * Clean-up of tokenization spaces is always off (it is lossy and would break streaming).
 */
export const fromJson = (json: unknown, config?: object): Effect.Effect<TokenizerShape, TokenizerError> =>
  Effect.try({
    try: () =>
      make(new HfCoreTokenizer(json as object, { ...config, clean_up_tokenization_spaces: false }), json, config),
    catch: (error) => new TokenizerError({ message: `invalid tokenizer.json: ${errorMessage(error)}` }),
  })

/**
 * Reads a JSON file; `undefined` when `optional` and the file does not exist. A parse error does not say where or
 * why: JSON.parse's message quotes the text, and the file may not be what it claims to be.
 */
const readJson = (path: string, optional = false) =>
  Effect.gen(function* () {
    const text = yield* Effect.tryPromise({
      try: () =>
        readFile(path, "utf8").catch((error: NodeJS.ErrnoException) => {
          if (optional && error.code === "ENOENT") return undefined
          throw error
        }),
      catch: (error) => new TokenizerError({ message: `cannot read ${path}: ${errorMessage(error)}` }),
    })
    if (text === undefined) return undefined
    return yield* Effect.try({
      try: () => JSON.parse(text) as unknown,
      catch: () => new TokenizerError({ message: `${path} is not valid JSON` }),
    })
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
