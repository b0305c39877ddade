/**
 * Chat messages → one prompt string: the model's Jinja chat template from `tokenizer_config.json`
 * (rendered with @huggingface/jinja as transformers' `apply_chat_template` does), or, when the model has none,
 * a plain "role: content" transcript that ends with "assistant:".
 */
import { readFile } from "node:fs/promises"
import { join } from "node:path"
import { Template } from "@huggingface/jinja"
import { ModelLoadError } from "@offramp/core/Errors"
import { Effect, Either } from "effect"

export interface ChatTemplateConfig {
  /** The Jinja source; absent: the transcript fallback. */
  readonly template?: string
  readonly bosToken?: string
  readonly eosToken?: string
}

/** A message with its content already flattened to text. */
export interface ChatTurn {
  readonly role: string
  readonly content: string
  readonly name?: string
}

export interface ChatRenderer {
  /** True when the model's own template is used. */
  readonly templated: boolean
  readonly bosToken: string | undefined
  /** The prompt, or why the template refused the conversation (its `raise_exception`). */
  readonly render: (turns: ReadonlyArray<ChatTurn>) => Either.Either<string, string>
}

export const TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

/** Special tokens in tokenizer_config.json are a string or an AddedToken object `{ content }`. */
const tokenText = (value: unknown): string | undefined => {
  if (typeof value === "string") return value
  if (typeof value === "object" && value !== null && "content" in value && typeof value.content === "string") {
    return value.content
  }
  return undefined
}

/** `chat_template` is a string, or a list of named templates of which "default" is the chat one. */
const templateText = (value: unknown): string | undefined => {
  if (typeof value === "string") return value
  if (!Array.isArray(value)) return undefined
  const named = value.filter(
    (t): t is { name: string; template: string } =>
      typeof t === "object" && t !== null && typeof t.name === "string" && typeof t.template === "string",
  )
  return (named.find((t) => t.name === "default") ?? named[0])?.template
}

/** Reads the chat template and special tokens from the model directory (none: the fallback). */
export const readChatTemplate = (modelDir: string): Effect.Effect<ChatTemplateConfig, ModelLoadError> =>
  Effect.gen(function* () {
    const path = join(modelDir, TOKENIZER_CONFIG_FILE)
    const text = yield* Effect.promise(() => readFile(path, "utf8").catch(() => undefined))
    if (text === undefined) return {}
    const config = yield* Effect.try({
      try: () => JSON.parse(text) as unknown,
      catch: () => new ModelLoadError({ path, message: "not valid JSON" }),
    })
    if (typeof config !== "object" || config === null || Array.isArray(config)) {
      return yield* new ModelLoadError({ path, message: "not a JSON object" })
    }
    const fields = config as Record<string, unknown>
    const template = templateText(fields.chat_template)
    const bosToken = tokenText(fields.bos_token)
    const eosToken = tokenText(fields.eos_token)
    return {
      ...(template !== undefined ? { template } : {}),
      ...(bosToken !== undefined ? { bosToken } : {}),
      ...(eosToken !== undefined ? { eosToken } : {}),
    }
  })

/** The fallback: one "role: content" line per message, then "assistant:" for the model to continue. */
export const transcript = (turns: ReadonlyArray<ChatTurn>): string =>
  `${turns.map((t) => `${t.role}: ${t.content}`).join("\n")}\nassistant:`

const errorMessage = (error: unknown) => (error instanceof Error ? error.message : String(error))

/** Compiles the template once; a template that does not parse is a model error, found at startup. */
export const makeChatRenderer = (config: ChatTemplateConfig): Either.Either<ChatRenderer, string> => {
  const source = config.template
  if (source === undefined) {
    return Either.right({ templated: false, bosToken: config.bosToken, render: (t) => Either.right(transcript(t)) })
  }
  return Either.try({
    try: () => new Template(source),
    catch: (error) => `the chat template does not parse: ${errorMessage(error)}`,
  }).pipe(
    Either.map(
      (template): ChatRenderer => ({
        templated: true,
        bosToken: config.bosToken,
        render: (turns) =>
          Either.try({
            try: () =>
              template.render({
                messages: turns.map((t) => ({ ...t })),
                add_generation_prompt: true,
                bos_token: config.bosToken ?? "",
                eos_token: config.eosToken ?? "",
              }),
            catch: (error) => `the chat template rejected the messages: ${errorMessage(error)}`,
          }),
      }),
    ),
  )
}
