/**
 * Chat templates from tokenizer_config.json, and the transcript fallback.
 */
import { mkdtempSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Either } from "effect"
import { describe, expect, it } from "vitest"
import { makeChatRenderer, readChatTemplate, transcript } from "../src/ChatTemplate.js"

const dirWith = (config: unknown) => {
  const dir = mkdtempSync(join(tmpdir(), "offramp-chat-"))
  writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify(config))
  return dir
}

const turns = [
  { role: "system", content: "Be brief." },
  { role: "user", content: "Hi" },
]

describe("chat templates", () => {
  it("reads the template and special tokens (strings or AddedToken objects)", async () => {
    const dir = dirWith({
      chat_template: "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
      bos_token: { content: "<s>", lstrip: false },
      eos_token: "</s>",
    })
    const config = await Effect.runPromise(readChatTemplate(dir))
    expect(config).toEqual({
      template: "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
      bosToken: "<s>",
      eosToken: "</s>",
    })
    const renderer = Either.getOrThrow(makeChatRenderer(config))
    expect(renderer.render(turns)).toEqual(Either.right("<s>[system]Be brief.[user]Hi"))
  })

  it("picks the default of a list of named templates; add_generation_prompt is set", async () => {
    const dir = dirWith({
      chat_template: [
        { name: "tool_use", template: "tools" },
        { name: "default", template: "{% if add_generation_prompt %}GEN{% endif %}" },
      ],
    })
    const renderer = Either.getOrThrow(makeChatRenderer(await Effect.runPromise(readChatTemplate(dir))))
    expect(renderer.render(turns)).toEqual(Either.right("GEN"))
  })

  it("a template's raise_exception is a refusal, a broken template an error at load", () => {
    const strict = Either.getOrThrow(
      makeChatRenderer({
        template: "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}ok",
      }),
    )
    const refused = strict.render(turns)
    expect(Either.isLeft(refused) && refused.left).toMatch(/no system role/)
    expect(Either.isLeft(makeChatRenderer({ template: "{% for %}" }))).toBe(true)
  })

  it("no tokenizer_config.json, or no chat_template: the role: content transcript", async () => {
    const none = await Effect.runPromise(readChatTemplate(mkdtempSync(join(tmpdir(), "offramp-chat-"))))
    expect(none).toEqual({})
    const renderer = Either.getOrThrow(makeChatRenderer(none))
    expect(renderer.templated).toBe(false)
    expect(renderer.render(turns)).toEqual(Either.right("system: Be brief.\nuser: Hi\nassistant:"))
    expect(transcript(turns)).toBe("system: Be brief.\nuser: Hi\nassistant:")
  })
})
