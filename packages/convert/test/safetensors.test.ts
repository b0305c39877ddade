import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "@effect/vitest"
import { Effect, Exit } from "effect"
import type { SafetensorsError } from "../src/Errors.js"
import { float32ToBfloat16Array, float32ToFloat16Array } from "../src/Float16.js"
import { encodeSafetensors, INDEX_FILE, openSafetensors } from "../src/Safetensors.js"

let dir = ""
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "offramp-safetensors-"))
})
afterAll(() => rm(dir, { recursive: true, force: true }))

const a = new Float32Array([1, -2, 0.5, 3.25, -0.125, 7])
const b = new Float32Array([0.1, 0.2, 0.3])

/** A file with a hand-written header and 24 bytes of data. */
const withHeader = (header: string) => {
  const json = new TextEncoder().encode(header)
  const bytes = new Uint8Array(8 + json.length + 24)
  new DataView(bytes.buffer).setBigUint64(0, BigInt(json.length), true)
  bytes.set(json, 8)
  return bytes
}

const readAll = (path: string) =>
  Effect.scoped(
    Effect.gen(function* () {
      const archive = yield* openSafetensors(path)
      const out: Record<string, Array<number>> = {}
      for (const name of archive.tensors.keys()) out[name] = Array.from(yield* archive.readFloat32(name))
      return { archive, out }
    }),
  )

const failure = (path: string) =>
  Effect.gen(function* () {
    const exit = yield* Effect.exit(readAll(path))
    if (!Exit.isFailure(exit) || exit.cause._tag !== "Fail") throw new Error("expected a typed failure")
    return exit.cause.error as SafetensorsError
  })

describe("safetensors", () => {
  it.effect("round-trips F32, F16 and BF16 tensors with metadata", () =>
    Effect.gen(function* () {
      const file = join(dir, "one.safetensors")
      yield* Effect.promise(() =>
        writeFile(
          file,
          encodeSafetensors(
            {
              a: { dtype: "F32", shape: [2, 3], data: a },
              half: { dtype: "F16", shape: [6], data: float32ToFloat16Array(a) },
              brain: { dtype: "BF16", shape: [3, 2], data: float32ToBfloat16Array(a) },
            },
            { format: "pt" },
          ),
        ),
      )
      const { archive, out } = yield* readAll(file)
      expect(archive.metadata).toEqual({ format: "pt" })
      expect(archive.tensors.get("a")!.shape).toEqual([2, 3])
      expect(archive.tensors.get("brain")!.dtype).toBe("BF16")
      // Every value of `a` is exact in all three formats.
      expect(out).toEqual({ a: Array.from(a), half: Array.from(a), brain: Array.from(a) })
    }),
  )

  it.effect("reads a sharded checkpoint through its index, from the directory", () =>
    Effect.gen(function* () {
      const sharded = join(dir, "sharded")
      yield* Effect.promise(async () => {
        await rm(sharded, { recursive: true, force: true })
        await mkdir(sharded)
        await writeFile(
          join(sharded, "s1.safetensors"),
          encodeSafetensors({ a: { dtype: "F32", shape: [6], data: a } }),
        )
        await writeFile(
          join(sharded, "s2.safetensors"),
          encodeSafetensors({ b: { dtype: "F32", shape: [3], data: b } }),
        )
        await writeFile(
          join(sharded, INDEX_FILE),
          JSON.stringify({ weight_map: { a: "s1.safetensors", b: "s2.safetensors" } }),
        )
      })
      const { archive, out } = yield* readAll(sharded)
      expect(archive.files).toHaveLength(2)
      expect(out.a).toEqual(Array.from(a))
      expect(out.b).toEqual(Array.from(b))

      yield* Effect.promise(() =>
        writeFile(
          join(sharded, INDEX_FILE),
          JSON.stringify({ weight_map: { a: "s1.safetensors", b: "s3.safetensors" } }),
        ),
      )
      const missing = yield* failure(sharded)
      expect(missing.reason).toBe("missing-shard")
      expect(missing.message).toContain("s3.safetensors")

      yield* Effect.promise(() =>
        writeFile(
          join(sharded, INDEX_FILE),
          JSON.stringify({ weight_map: { a: "s1.safetensors", b: "s1.safetensors" } }),
        ),
      )
      const misplaced = yield* failure(sharded)
      expect(misplaced.reason).toBe("header")
      expect(misplaced.message).toContain("has no such tensor")
    }),
  )

  it.effect("a truncated file fails as truncated, wherever it was cut", () =>
    Effect.gen(function* () {
      const whole = encodeSafetensors({ a: { dtype: "F32", shape: [6], data: a } })
      for (const keep of [whole.length - 1, whole.length - 20, 20, 4]) {
        const file = join(dir, `cut-${keep}.safetensors`)
        yield* Effect.promise(() => writeFile(file, whole.subarray(0, keep)))
        const error = yield* failure(file)
        expect(error._tag).toBe("SafetensorsError")
        expect(error.reason).toBe("truncated")
        expect(error.message).toMatch(/truncated/)
      }
    }),
  )

  it.effect("malformed headers fail with what is wrong", () =>
    Effect.gen(function* () {
      const cases: Array<[string, Uint8Array, RegExp]> = [
        ["json", withHeader("{not json"), /not valid JSON/],
        ["size", withHeader('{"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,8]}}'), /needs 24/],
        ["dtype", withHeader('{"x":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}'), /unknown dtype Q4/],
        ["huge", new Uint8Array([255, 255, 255, 255, 255, 255, 0, 0, 1, 2]), /not a safetensors file/],
      ]
      for (const [name, bytes, message] of cases) {
        const file = join(dir, `bad-${name}.safetensors`)
        yield* Effect.promise(() => writeFile(file, bytes))
        const error = yield* failure(file)
        expect(error.reason).toBe("header")
        expect(error.message).toMatch(message)
      }
    }),
  )

  it.effect("integer tensors are listed but refuse to be read as weights", () =>
    Effect.gen(function* () {
      const file = join(dir, "ints.safetensors")
      yield* Effect.promise(() =>
        writeFile(file, withHeader('{"a":{"dtype":"I32","shape":[6],"data_offsets":[0,24]}}')),
      )
      const error = yield* failure(file)
      expect(error.reason).toBe("dtype")
      expect(error.message).toContain("I32")
    }),
  )
})
