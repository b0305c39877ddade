/**
 * Opens a staged model directory: reads and validates model.json and checks that every file it names is inside the
 * directory and exists.
 */
import { access, readFile, stat } from "node:fs/promises"
import { isAbsolute, join, relative, resolve, sep } from "node:path"
import { describeParseError, ModelLoadError, truncateForMessage } from "@offramp/core/Errors"
import { FORMAT_VERSION, ModelSpec } from "@offramp/core/ModelSpec"
import { Effect, Schema } from "effect"

export interface ModelDirectory {
  readonly path: string
  readonly spec: ModelSpec
  /** Every file of the model with its size in bytes. */
  readonly files: ReadonlyArray<{ readonly name: string; readonly bytes: number }>
}

/** The files model.json refers to, each once. */
export const modelFiles = (spec: ModelSpec): ReadonlyArray<string> => [
  ...new Set([
    spec.files.tokenizer,
    spec.files.embed,
    ...spec.segments.map((s) => s.file),
    ...spec.exits.flatMap((e) => [e.head, ...(e.kvfill ? [e.kvfill] : []), ...(e.classifier ? [e.classifier] : [])]),
  ]),
]

export const openModelDirectory = (path: string): Effect.Effect<ModelDirectory, ModelLoadError> =>
  Effect.gen(function* () {
    const fail = (message: string) => new ModelLoadError({ path, message })
    const isDir = yield* Effect.promise(() =>
      stat(path).then(
        (s) => s.isDirectory(),
        () => false,
      ),
    )
    if (!isDir) {
      return yield* fail(`no model directory at ${path} (convert a checkpoint with \`offramp convert\` first)`)
    }
    const specPath = join(path, "model.json")
    const text = yield* Effect.tryPromise({
      try: () => readFile(specPath, "utf8"),
      catch: () => fail(`${specPath} is missing: this is not an Offramp model directory`),
    })
    const json = yield* Effect.try({
      try: () => JSON.parse(text) as unknown,
      // Only where: JSON.parse's message quotes the text.
      catch: (e) =>
        fail(
          `${specPath} is not valid JSON${/ at position \d+( \(line \d+ column \d+\))?/.exec(String(e))?.[0] ?? ""}`,
        ),
    })
    const version = (json as { formatVersion?: unknown } | null)?.formatVersion
    if (typeof version === "number" && version !== FORMAT_VERSION) {
      return yield* fail(
        version < FORMAT_VERSION
          ? `${path} was converted by an older Offramp (model format ${version}; this version reads format ${FORMAT_VERSION}, whose attention graphs read a head-major KV cache); convert the checkpoint again with \`offramp convert\``
          : `${path} is in model format ${version}, newer than this Offramp reads (${FORMAT_VERSION}); upgrade Offramp`,
      )
    }
    const spec = yield* Schema.decodeUnknown(ModelSpec)(json, { onExcessProperty: "ignore" }).pipe(
      Effect.mapError((e) => fail(`${specPath} does not match the model format: ${describeParseError(e)}`)),
    )
    // A file name is a path relative to the directory that stays inside it (symbolic links inside are followed).
    const root = resolve(path)
    for (const name of modelFiles(spec)) {
      const rel = relative(root, resolve(root, name))
      if (rel === "" || rel === ".." || rel.startsWith(`..${sep}`) || isAbsolute(rel)) {
        return yield* fail(
          `model.json names the file ${JSON.stringify(truncateForMessage(name))}, which is not inside ${path}; ` +
            "a model's files must be in its directory",
        )
      }
    }
    const files = yield* Effect.forEach(modelFiles(spec), (name) =>
      Effect.tryPromise({
        try: async () => {
          await access(join(path, name))
          return { name, bytes: (await stat(join(path, name))).size }
        },
        catch: () => fail(`${name} is listed in model.json but missing from ${path}; convert the model again`),
      }),
    )
    return { path, spec, files }
  })

/** The tokenizer's ids must all be ids the model has logits and embeddings for. */
export const checkTokenizerVocab = (
  path: string,
  spec: ModelSpec,
  tokenizerVocab: number,
): Effect.Effect<void, ModelLoadError> =>
  tokenizerVocab <= spec.dims.vocab
    ? Effect.void
    : Effect.fail(
        new ModelLoadError({
          path: join(path, spec.files.tokenizer),
          message: `the tokenizer has ${tokenizerVocab} tokens but model.json says the vocabulary has ${spec.dims.vocab}; the tokenizer does not belong to this model`,
        }),
      )
