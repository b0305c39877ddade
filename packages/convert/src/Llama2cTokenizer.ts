/**
 * Reads llama2.c's tokenizer file (`tokenizer.bin`, `tok512.bin`) and converts it into a Hugging Face
 * `tokenizer.json` whose BPE encoding reproduces llama2.c's `encode` (greedy best-score merges).
 *
 * File format: int32 max_token_length, then per id {float32 score, int32 len, len UTF-8 bytes}, little-endian.
 * The id layout is fixed by llama2.c: 0 `<unk>`, 1 BOS (stored "\n<s>\n"), 2 EOS ("\n</s>\n"), 3..258 the byte
 * tokens `<0x00>`..`<0xFF>`, then the SentencePiece pieces with " " where SentencePiece has "▁".
 */
import { readFile } from "node:fs/promises"
import { CheckpointError } from "@offramp/core/Errors"
import { Effect } from "effect"

export const LLAMA2C_UNK_ID = 0
export const LLAMA2C_BOS_ID = 1
export const LLAMA2C_EOS_ID = 2
/** Byte b is id b + 3 (run.c hardcodes this offset in its byte fallback). */
export const LLAMA2C_BYTE_OFFSET = 3

/** A llama2.c vocabulary as stored in the file. */
export interface Llama2cVocab {
  readonly path: string
  readonly maxTokenLength: number
  /** Pieces as llama2.c stores them: " " for "▁", "\n<s>\n" / "\n</s>\n" for ids 1 / 2, "<0xAB>" for bytes. */
  readonly pieces: ReadonlyArray<string>
  readonly scores: ReadonlyArray<number>
}

/** The subset of the Hugging Face `tokenizer.json` format that the conversion writes. */
export interface HuggingFaceTokenizerJson {
  readonly version: "1.0"
  readonly truncation: null
  readonly padding: null
  readonly added_tokens: ReadonlyArray<{
    readonly id: number
    readonly content: string
    readonly single_word: boolean
    readonly lstrip: boolean
    readonly rstrip: boolean
    readonly normalized: boolean
    readonly special: boolean
  }>
  readonly normalizer: unknown
  readonly pre_tokenizer: null
  readonly post_processor: unknown
  readonly decoder: unknown
  readonly model: {
    readonly type: "BPE"
    readonly dropout: null
    readonly unk_token: string
    readonly continuing_subword_prefix: null
    readonly end_of_word_suffix: null
    readonly fuse_unk: boolean
    readonly byte_fallback: boolean
    readonly ignore_merges: boolean
    readonly vocab: Readonly<Record<string, number>>
    readonly merges: ReadonlyArray<readonly [string, string]>
  }
}

const SPECIAL_PIECES = ["<unk>", "\n<s>\n", "\n</s>\n"] as const
const HF_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"] as const
const FIRST_PIECE_ID = LLAMA2C_BYTE_OFFSET + 256
// run.c sizes its merge buffer from max_token_length; anything far beyond this is a corrupt header.
const MAX_SANE_TOKEN_LENGTH = 1 << 16

const byteToken = (byte: number): string => `<0x${byte.toString(16).toUpperCase().padStart(2, "0")}>`

/**
 * Parses the bytes of a llama2.c tokenizer file. Without `vocabSize` it reads records up to the end of the file;
 * with it (the checkpoint header's vocab_size) it requires exactly that many records and no trailing bytes.
 */
export const parseLlama2cTokenizer = (
  bytes: Uint8Array,
  path: string,
  options?: { readonly vocabSize?: number },
): Effect.Effect<Llama2cVocab, CheckpointError> =>
  Effect.suspend(() => {
    const fail = (message: string) => Effect.fail(new CheckpointError({ path, message }))
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
    const utf8 = new TextDecoder("utf-8", { fatal: true })
    const vocabSize = options?.vocabSize
    if (bytes.byteLength < 4) {
      return fail(`llama2.c tokenizer file is ${bytes.byteLength} bytes; it must start with an int32 max_token_length`)
    }
    const maxTokenLength = view.getInt32(0, true)
    if (maxTokenLength <= 0 || maxTokenLength > MAX_SANE_TOKEN_LENGTH) {
      return fail(`max_token_length is ${maxTokenLength}; this is not a llama2.c tokenizer file or it is corrupt`)
    }
    const pieces: Array<string> = []
    const scores: Array<number> = []
    let offset = 4
    while (vocabSize === undefined ? offset < bytes.byteLength : pieces.length < vocabSize) {
      const id = pieces.length
      const left = bytes.byteLength - offset
      if (left < 8) {
        return fail(
          `truncated: record of id ${id} at byte ${offset} needs 8 header bytes (float32 score, int32 len), ` +
            `${left} left${vocabSize === undefined ? "" : ` (expected ${vocabSize} records)`}`,
        )
      }
      const score = view.getFloat32(offset, true)
      const len = view.getInt32(offset + 4, true)
      offset += 8
      if (!Number.isFinite(score)) return fail(`id ${id} at byte ${offset - 8} has a non-finite score ${score}`)
      if (len < 0 || len > maxTokenLength) {
        return fail(`id ${id} at byte ${offset - 4} has length ${len}, outside 0..max_token_length=${maxTokenLength}`)
      }
      if (len > bytes.byteLength - offset) {
        return fail(`truncated: id ${id} needs ${len} piece bytes at byte ${offset}, ${bytes.byteLength - offset} left`)
      }
      let piece: string
      try {
        piece = utf8.decode(bytes.subarray(offset, offset + len))
      } catch {
        return fail(`id ${id} at byte ${offset} is not valid UTF-8`)
      }
      offset += len
      pieces.push(piece)
      scores.push(score)
    }
    if (offset !== bytes.byteLength) {
      return fail(`${bytes.byteLength - offset} trailing bytes after the ${vocabSize} expected records`)
    }
    if (pieces.length < FIRST_PIECE_ID) {
      return fail(
        `only ${pieces.length} records; llama2.c's layout needs at least ${FIRST_PIECE_ID} (3 specials, 256 bytes)`,
      )
    }
    for (let id = 0; id < FIRST_PIECE_ID; id++) {
      const expected = id < LLAMA2C_BYTE_OFFSET ? SPECIAL_PIECES[id] : byteToken(id - LLAMA2C_BYTE_OFFSET)
      if (pieces[id] !== expected) {
        return fail(
          `id ${id} is ${JSON.stringify(pieces[id])}; llama2.c's layout has ${JSON.stringify(expected)} there`,
        )
      }
    }
    const seen = new Map<string, number>()
    for (let id = 0; id < pieces.length; id++) {
      const first = seen.get(pieces[id])
      if (first !== undefined) return fail(`ids ${first} and ${id} both store the piece ${JSON.stringify(pieces[id])}`)
      seen.set(pieces[id], id)
    }
    return Effect.succeed({ path, maxTokenLength, pieces, scores })
  })

/** Reads a llama2.c tokenizer file (see {@link parseLlama2cTokenizer}). */
export const readLlama2cTokenizer = (
  path: string,
  options?: { readonly vocabSize?: number },
): Effect.Effect<Llama2cVocab, CheckpointError> =>
  Effect.tryPromise({
    try: () => readFile(path),
    catch: (error) => new CheckpointError({ path, message: `cannot read the llama2.c tokenizer: ${String(error)}` }),
  }).pipe(Effect.flatMap((bytes) => parseLlama2cTokenizer(bytes, path, options)))

/** The Hugging Face token string of an id: SentencePiece's "▁" for spaces and the plain special tokens. */
const hfPiece = (vocab: Llama2cVocab, id: number): string =>
  id < LLAMA2C_BYTE_OFFSET ? HF_SPECIAL_TOKENS[id] : vocab.pieces[id].replaceAll(" ", "\u2581")

/**
 * Ordered BPE merges equivalent to llama2.c's encoder, which repeatedly merges the adjacent pair whose
 * concatenation is the highest-scoring piece: every split of every piece into two pieces, by score descending.
 * Only text pieces take part; specials and byte tokens never merge in llama2.c (their stored strings do not
 * concatenate into pieces).
 */
const mergesOf = (vocab: Llama2cVocab, hf: ReadonlyArray<string>): Array<readonly [string, string]> => {
  const textIds = new Map<string, number>()
  for (let id = FIRST_PIECE_ID; id < hf.length; id++) textIds.set(hf[id], id)
  const merges: Array<{ readonly pair: readonly [string, string]; readonly id: number; readonly split: number }> = []
  for (let id = FIRST_PIECE_ID; id < hf.length; id++) {
    const chars = Array.from(hf[id])
    for (let split = 1; split < chars.length; split++) {
      const left = chars.slice(0, split).join("")
      const right = chars.slice(split).join("")
      if (textIds.has(left) && textIds.has(right)) merges.push({ pair: [left, right], id, split })
    }
  }
  // Equal scores cannot be expressed as ranks; ties (none in tok512.bin) fall back to id order.
  merges.sort((a, b) => vocab.scores[b.id] - vocab.scores[a.id] || a.id - b.id || a.split - b.split)
  return merges.map((m) => m.pair)
}

/**
 * Converts a llama2.c vocabulary into a Hugging Face `tokenizer.json` object (Llama-2 style SentencePiece BPE:
 * dummy prefix, "▁" for spaces, byte fallback, BOS prepended by the post-processor).
 */
export const toHuggingFaceTokenizerJson = (vocab: Llama2cVocab): HuggingFaceTokenizerJson => {
  const hf = vocab.pieces.map((_, id) => hfPiece(vocab, id))
  const vocabJson: Record<string, number> = {}
  hf.forEach((piece, id) => {
    vocabJson[piece] = id
  })
  const bos = HF_SPECIAL_TOKENS[LLAMA2C_BOS_ID]
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: HF_SPECIAL_TOKENS.map((content, id) => ({
      id,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    })),
    // llama2.c prepends the dummy-prefix " " and does no pre-tokenization: the whole text is one BPE word.
    normalizer: {
      type: "Sequence",
      normalizers: [
        { type: "Prepend", prepend: "\u2581" },
        { type: "Replace", pattern: { String: " " }, content: "\u2581" },
      ],
    },
    pre_tokenizer: null,
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [
        { SpecialToken: { id: bos, type_id: 0 } },
        { Sequence: { id: "A", type_id: 0 } },
        { SpecialToken: { id: bos, type_id: 1 } },
        { Sequence: { id: "B", type_id: 1 } },
      ],
      special_tokens: { [bos]: { id: bos, ids: [LLAMA2C_BOS_ID], tokens: [bos] } },
    },
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: "\u2581" }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        // run.c drops the leading space of the first piece after BOS; this strips the dummy prefix likewise.
        { type: "Strip", content: " ", start: 1, stop: 0 },
      ],
    },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: HF_SPECIAL_TOKENS[LLAMA2C_UNK_ID],
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab: vocabJson,
      merges: mergesOf(vocab, hf),
    },
  }
}

/** The `tokenizer_config.json` object to go with {@link toHuggingFaceTokenizerJson}. */
export const LLAMA2C_TOKENIZER_CONFIG = {
  tokenizer_class: "LlamaTokenizer",
  bos_token: HF_SPECIAL_TOKENS[LLAMA2C_BOS_ID],
  eos_token: HF_SPECIAL_TOKENS[LLAMA2C_EOS_ID],
  unk_token: HF_SPECIAL_TOKENS[LLAMA2C_UNK_ID],
  add_bos_token: true,
  add_eos_token: false,
  // Clean-up would rewrite " ," to "," and break both llama2.c parity and streaming detokenization.
  clean_up_tokenization_spaces: false,
  legacy: true,
} as const
