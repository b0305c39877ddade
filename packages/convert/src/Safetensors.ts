/**
 * Reader (and a small writer) for safetensors: an 8-byte little-endian header length, a JSON header
 * {name: {dtype, shape, data_offsets}, __metadata__}, then the tensor bytes. Sharded checkpoints have a
 * `model.safetensors.index.json` whose `weight_map` names each tensor's shard. Tensors are read one at a time
 * from open file handles, so a checkpoint larger than memory's spare room is never loaded whole.
 */
import { type FileHandle, open, readFile, stat, writeFile } from "node:fs/promises"
import { dirname, join } from "node:path"
import { Effect, type Scope } from "effect"
import { SafetensorsError } from "./Errors.js"
import { bfloat16ToFloat32Array, float16ToFloat32Array } from "./Float16.js"

/** Bytes per element of every safetensors dtype; only the float ones can be read as weights. */
const DTYPE_BYTES: Readonly<Record<string, number>> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U64: 8,
  U32: 4,
  U16: 2,
  U8: 1,
  BOOL: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
}

/** The spec caps the header at 100 MB; a larger length means a corrupt or non-safetensors file. */
const MAX_HEADER_BYTES = 100_000_000
export const INDEX_FILE = "model.safetensors.index.json"
export const SINGLE_FILE = "model.safetensors"

export interface TensorEntry {
  readonly name: string
  readonly dtype: string
  readonly shape: ReadonlyArray<number>
  /** The file holding the tensor. */
  readonly file: string
  /** Absolute byte offset of its data in the file. */
  readonly offset: number
  readonly byteLength: number
}

export interface SafetensorsHeader {
  readonly metadata: Readonly<Record<string, string>>
  readonly tensors: ReadonlyArray<TensorEntry>
}

export interface SafetensorsArchive {
  /** The file or shard index that was opened. */
  readonly path: string
  readonly files: ReadonlyArray<string>
  /** `__metadata__` of the (first) file. */
  readonly metadata: Readonly<Record<string, string>>
  readonly tensors: ReadonlyMap<string, TensorEntry>
  /** Reads a tensor as float32 (F32, F16, BF16 and F64 are converted). */
  readonly readFloat32: (name: string) => Effect.Effect<Float32Array, SafetensorsError>
}

const fail = (path: string, reason: SafetensorsError["reason"], message: string) =>
  new SafetensorsError({ path, reason, message })

const isRecord = (value: unknown): value is Record<string, unknown> =>
  typeof value === "object" && value !== null && !Array.isArray(value)

/**
 * Parses and checks a header: `json` is the header text, `dataBytes` the size of the data section (the file minus
 * 8 + header length). Offsets are checked against the data section, so a cut-off file is caught here.
 */
export const parseSafetensorsHeader = (
  file: string,
  json: string,
  headerBytes: number,
  dataBytes: number,
): Effect.Effect<SafetensorsHeader, SafetensorsError> =>
  Effect.gen(function* () {
    const parsed = yield* Effect.try({
      try: () => JSON.parse(json) as unknown,
      catch: (e) => fail(file, "header", `the safetensors header is not valid JSON (${(e as Error).message})`),
    })
    if (!isRecord(parsed)) return yield* fail(file, "header", "the safetensors header is not a JSON object")
    const metadata: Record<string, string> = {}
    const tensors: Array<TensorEntry> = []
    const dataStart = 8 + headerBytes
    for (const [name, value] of Object.entries(parsed)) {
      if (name === "__metadata__") {
        if (!isRecord(value)) return yield* fail(file, "header", "__metadata__ is not an object")
        for (const [k, v] of Object.entries(value)) metadata[k] = String(v)
        continue
      }
      const bad = (what: string) => fail(file, "header", `tensor ${name}: ${what}`)
      if (!isRecord(value)) return yield* bad("its header entry is not an object")
      const { dtype, shape, data_offsets: offsets } = value
      if (typeof dtype !== "string" || DTYPE_BYTES[dtype] === undefined) return yield* bad(`unknown dtype ${dtype}`)
      if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
        return yield* bad(`shape ${JSON.stringify(shape)} is not a list of sizes`)
      }
      if (
        !Array.isArray(offsets) ||
        offsets.length !== 2 ||
        !offsets.every((o) => Number.isInteger(o) && o >= 0) ||
        offsets[0] > offsets[1]
      ) {
        return yield* bad(`data_offsets ${JSON.stringify(offsets)} are not [begin, end]`)
      }
      const [begin, end] = offsets as [number, number]
      const expected = shape.reduce((a: number, b: number) => a * b, 1) * DTYPE_BYTES[dtype]!
      if (end - begin !== expected) {
        return yield* bad(`${end - begin} bytes of data for ${dtype} [${shape}], which needs ${expected}`)
      }
      if (end > dataBytes) {
        return yield* fail(
          file,
          "truncated",
          `tensor ${name} ends at byte ${dataStart + end} but the file has ${dataStart + dataBytes} bytes: ` +
            "the file is truncated (an interrupted download?); fetch it again",
        )
      }
      tensors.push({
        name,
        dtype,
        shape: shape as Array<number>,
        file,
        offset: dataStart + begin,
        byteLength: expected,
      })
    }
    return { metadata, tensors }
  })

const readExactly = (handle: FileHandle, file: string, target: Uint8Array, position: number) =>
  Effect.tryPromise({
    try: async () => {
      let done = 0
      while (done < target.byteLength) {
        const { bytesRead } = await handle.read(target, done, target.byteLength - done, position + done)
        if (bytesRead === 0) return false
        done += bytesRead
      }
      return true
    },
    catch: (e) => fail(file, "io", `cannot read: ${(e as Error).message}`),
  }).pipe(
    Effect.flatMap((complete) =>
      complete ? Effect.void : Effect.fail(fail(file, "truncated", "the file ended early: it is truncated")),
    ),
  )

interface OpenFile {
  readonly handle: FileHandle
  readonly header: SafetensorsHeader
}

/** Opens one .safetensors file in the scope and reads its header. */
const openFile = (file: string): Effect.Effect<OpenFile, SafetensorsError, Scope.Scope> =>
  Effect.gen(function* () {
    const handle = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () => open(file, "r"),
        catch: (e) => fail(file, "io", `cannot open: ${(e as Error).message}`),
      }),
      (h) => Effect.promise(() => h.close()),
    )
    const size = yield* Effect.tryPromise({
      try: () => handle.stat().then((s) => s.size),
      catch: (e) => fail(file, "io", `cannot stat: ${(e as Error).message}`),
    })
    if (size < 8) {
      return yield* fail(
        file,
        "truncated",
        `the file has ${size} bytes, less than the 8-byte header length: it is truncated or empty`,
      )
    }
    const prefix = new Uint8Array(8)
    yield* readExactly(handle, file, prefix, 0)
    const headerLength = new DataView(prefix.buffer).getBigUint64(0, true)
    if (headerLength > BigInt(MAX_HEADER_BYTES)) {
      return yield* fail(file, "header", `header length ${headerLength} is implausible: this is not a safetensors file`)
    }
    const headerBytes = Number(headerLength)
    if (8 + headerBytes > size) {
      return yield* fail(
        file,
        "truncated",
        `the header claims ${headerBytes} bytes but the file has ${size}: the file is truncated or not safetensors`,
      )
    }
    const json = new Uint8Array(headerBytes)
    yield* readExactly(handle, file, json, 8)
    const header = yield* parseSafetensorsHeader(
      file,
      new TextDecoder().decode(json),
      headerBytes,
      size - 8 - headerBytes,
    )
    return { handle, header }
  })

const toFloat32 = (entry: TensorEntry, bytes: Uint8Array): Float32Array => {
  const count = entry.byteLength / DTYPE_BYTES[entry.dtype]!
  switch (entry.dtype) {
    case "F32":
      return new Float32Array(bytes.buffer, bytes.byteOffset, count)
    case "F16":
      return float16ToFloat32Array(new Uint16Array(bytes.buffer, bytes.byteOffset, count))
    case "BF16":
      return bfloat16ToFloat32Array(new Uint16Array(bytes.buffer, bytes.byteOffset, count))
    default:
      return Float32Array.from(new Float64Array(bytes.buffer, bytes.byteOffset, count))
  }
}

/** Shard file names of an index, with each tensor's shard. */
const readIndex = (indexPath: string) =>
  Effect.gen(function* () {
    const text = yield* Effect.tryPromise({
      try: () => readFile(indexPath, "utf8"),
      catch: (e) => fail(indexPath, "io", `cannot read the shard index: ${(e as Error).message}`),
    })
    const parsed = yield* Effect.try({
      try: () => JSON.parse(text) as unknown,
      catch: (e) => fail(indexPath, "header", `the shard index is not valid JSON (${(e as Error).message})`),
    })
    const map = isRecord(parsed) ? parsed.weight_map : undefined
    if (!isRecord(map) || !Object.values(map).every((v) => typeof v === "string" && v.length > 0)) {
      return yield* fail(indexPath, "header", "the shard index has no weight_map of tensor name → shard file")
    }
    return map as Record<string, string>
  })

/**
 * Opens a checkpoint's tensors: a .safetensors file, a shard index (.json), or a directory holding
 * model.safetensors.index.json or model.safetensors. The files stay open until the scope closes.
 */
export const openSafetensors = (path: string): Effect.Effect<SafetensorsArchive, SafetensorsError, Scope.Scope> =>
  Effect.gen(function* () {
    const isDir = yield* Effect.promise(() =>
      stat(path).then(
        (s) => s.isDirectory(),
        () => false,
      ),
    )
    const exists = (p: string) =>
      Effect.promise(() =>
        stat(p).then(
          () => true,
          () => false,
        ),
      )
    let target = path
    if (isDir) {
      if (yield* exists(join(path, INDEX_FILE))) target = join(path, INDEX_FILE)
      else if (yield* exists(join(path, SINGLE_FILE))) target = join(path, SINGLE_FILE)
      else return yield* fail(path, "io", `no ${SINGLE_FILE} or ${INDEX_FILE} in ${path}`)
    }
    const opened = new Map<string, OpenFile>()
    const tensors = new Map<string, TensorEntry>()
    if (target.endsWith(".json")) {
      const map = yield* readIndex(target)
      const base = dirname(target)
      for (const shard of new Set(Object.values(map))) {
        const file = join(base, shard)
        if (!(yield* exists(file))) {
          return yield* fail(
            target,
            "missing-shard",
            `the shard index lists ${shard}, which is not in ${base}; download every shard of the checkpoint`,
          )
        }
        opened.set(file, yield* openFile(file))
      }
      for (const [name, shard] of Object.entries(map)) {
        const file = join(base, shard)
        const entry = opened.get(file)!.header.tensors.find((t) => t.name === name)
        if (entry === undefined) {
          return yield* fail(
            target,
            "header",
            `the shard index puts ${name} in ${shard}, but ${shard} has no such tensor`,
          )
        }
        tensors.set(name, entry)
      }
    } else {
      if (!(yield* exists(target))) return yield* fail(target, "io", `no such file: ${target}`)
      const file = yield* openFile(target)
      opened.set(target, file)
      for (const t of file.header.tensors) tensors.set(t.name, t)
    }
    const readFloat32 = (name: string) =>
      Effect.gen(function* () {
        const entry = tensors.get(name)
        if (entry === undefined) return yield* fail(target, "header", `no tensor named ${name}`)
        if (!["F32", "F16", "BF16", "F64"].includes(entry.dtype)) {
          return yield* fail(
            entry.file,
            "dtype",
            `tensor ${name} is ${entry.dtype}; only F32, F16, BF16 and F64 weights can be converted ` +
              "(dequantize the checkpoint first)",
          )
        }
        const bytes = new Uint8Array(entry.byteLength)
        yield* readExactly(opened.get(entry.file)!.handle, entry.file, bytes, entry.offset)
        return toFloat32(entry, bytes)
      })
    return {
      path: target,
      files: [...opened.keys()],
      metadata: opened.values().next().value?.header.metadata ?? {},
      tensors,
      readFloat32,
    }
  })

/** A tensor to write: float32 values stored as F32, F16 or BF16 (given as raw uint16 bits for the last two). */
export interface TensorToWrite {
  readonly dtype: "F32" | "F16" | "BF16"
  readonly shape: ReadonlyArray<number>
  readonly data: Float32Array | Uint16Array
}

/** Encodes tensors as one safetensors file (data in the given order, header padded to 8 bytes as the spec asks). */
export const encodeSafetensors = (
  tensors: Readonly<Record<string, TensorToWrite>>,
  metadata?: Readonly<Record<string, string>>,
): Uint8Array => {
  const header: Record<string, unknown> = metadata ? { __metadata__: metadata } : {}
  let offset = 0
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] }
    offset += t.data.byteLength
  }
  const json = new TextEncoder().encode(JSON.stringify(header))
  const headerBytes = new Uint8Array(Math.ceil(json.byteLength / 8) * 8).fill(0x20)
  headerBytes.set(json)
  const out = new Uint8Array(8 + headerBytes.byteLength + offset)
  new DataView(out.buffer).setBigUint64(0, BigInt(headerBytes.byteLength), true)
  out.set(headerBytes, 8)
  let cursor = 8 + headerBytes.byteLength
  for (const t of Object.values(tensors)) {
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), cursor)
    cursor += t.data.byteLength
  }
  return out
}

export const writeSafetensors = (
  path: string,
  tensors: Readonly<Record<string, TensorToWrite>>,
  metadata?: Readonly<Record<string, string>>,
): Effect.Effect<void, SafetensorsError> =>
  Effect.tryPromise({
    try: () => writeFile(path, encodeSafetensors(tensors, metadata)),
    catch: (e) => fail(path, "io", `cannot write: ${(e as Error).message}`),
  })
