/**
 * Broken model directories fail at load with a ModelLoadError that says what is wrong, never with the contents of a
 * file: a file name that leaves the directory, a model format this version does not read, graphs or a tokenizer that
 * disagree with model.json's vocabulary.
 */
import { cpSync, readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { openModelDirectory } from "@offramp/onnx/ModelDirectory"
import { onnxEngineLayer } from "@offramp/onnx/OnnxEngine"
import { makeOnnxModelRunner } from "@offramp/onnx/OnnxModelRunner"
import * as HfTokenizer from "@offramp/tokenizer/HfTokenizer"
import { Effect, Layer } from "effect"
import { beforeAll, describe, expect, it } from "vitest"
import { convertStories, tempDir } from "./support/stories.js"

let modelDir = ""
beforeAll(async () => {
  modelDir = join(tempDir("model-directory"), "m")
  await convertStories(modelDir)
})

/** A copy of the converted model with model.json edited and files written into it. */
const doctored = (
  // biome-ignore lint/suspicious/noExplicitAny: model.json is edited field by field
  edit: (spec: any) => void,
  files: Record<string, string> = {},
) => {
  const dir = join(tempDir("doctored"), "m")
  cpSync(modelDir, dir, { recursive: true })
  const spec = JSON.parse(readFileSync(join(dir, "model.json"), "utf8"))
  edit(spec)
  writeFileSync(join(dir, "model.json"), JSON.stringify(spec))
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text)
  return dir
}

const failure = <E>(effect: Effect.Effect<unknown, E>) => Effect.runPromise(Effect.flip(effect))

describe("model directories", () => {
  it("a file name outside the directory is refused before anything is read", async () => {
    for (const tokenizer of ["../../../../etc/passwd", "/etc/passwd", "../other/tokenizer.json"]) {
      const dir = doctored((spec) => {
        spec.files.tokenizer = tokenizer
      })
      const error = await failure(openModelDirectory(dir))
      expect(error._tag).toBe("ModelLoadError")
      expect(error.message).toContain(`model.json names the file ${JSON.stringify(tokenizer)}, which is not inside`)
      expect(error.message).not.toContain("root:")
    }
    const long = doctored((spec) => {
      spec.segments[0].file = `${"../".repeat(5000)}etc/passwd`
    })
    expect((await failure(openModelDirectory(long))).message.length).toBeLessThan(500)
  })

  it("a directory from an older (or newer) Offramp is refused with what to do", async () => {
    const older = await failure(
      openModelDirectory(
        doctored((spec) => {
          spec.formatVersion = 1
        }),
      ),
    )
    expect(older._tag).toBe("ModelLoadError")
    expect(older.message).toMatch(
      /older Offramp \(model format 1; this version reads format 2.*convert the checkpoint again/,
    )
    const newer = await failure(
      openModelDirectory(
        doctored((spec) => {
          spec.formatVersion = 3
        }),
      ),
    )
    expect(newer.message).toMatch(/model format 3, newer than this Offramp reads \(2\); upgrade Offramp/)
  })

  it("a tokenizer file that is not JSON is reported without its contents", async () => {
    const dir = doctored(() => undefined, { "notes.txt": "SECRET-TEXT-1234 is not JSON" })
    const error = await failure(HfTokenizer.fromFile(join(dir, "notes.txt")))
    expect(error.message).toContain("is not valid JSON")
    expect(error.message).not.toContain("SECRET")
  })

  it("graphs whose vocabulary is not model.json's are refused at load", async () => {
    for (const vocab of [511, 513]) {
      const dir = doctored((spec) => {
        spec.dims.vocab = vocab
      })
      const error = await failure(Effect.scoped(makeOnnxModelRunner(dir)))
      expect(error._tag).toBe("ModelLoadError")
      expect(error.message).toContain(`model.json says the vocabulary has ${vocab} tokens`)
      expect(error.message).toMatch(/gives 512 logits per token|has no embedding for token 512/)
    }
  })

  it("a tokenizer with more tokens than the model's vocabulary is refused at load", async () => {
    const tokenizer = JSON.parse(readFileSync(join(modelDir, "tokenizer.json"), "utf8"))
    tokenizer.added_tokens = [
      ...(tokenizer.added_tokens ?? []),
      {
        id: 600,
        content: "<extra>",
        single_word: false,
        lstrip: false,
        rstrip: false,
        normalized: false,
        special: true,
      },
    ]
    const dir = doctored(() => undefined, { "tokenizer.json": JSON.stringify(tokenizer) })
    const error = await failure(Layer.build(onnxEngineLayer(dir)).pipe(Effect.scoped))
    expect(error._tag).toBe("ModelLoadError")
    expect(error.message).toContain("the tokenizer has 601 tokens but model.json says the vocabulary has 512")
  })
})
