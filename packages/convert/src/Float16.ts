/**
 * IEEE half precision (float16) and bfloat16 conversions for checkpoint reading and fp16 weight storage.
 */

const scratch = new Float32Array(1)
const scratchBits = new Uint32Array(scratch.buffer)

/** float32 → float16 bits, rounding to nearest even; overflow goes to ±Infinity, NaN stays NaN. */
export const float32ToFloat16Bits = (value: number): number => {
  scratch[0] = value
  const x = scratchBits[0]!
  const sign = (x >>> 16) & 0x8000
  const exp = (x >>> 23) & 0xff
  const mant = x & 0x7fffff
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x200 : 0)
  const e = exp - 127 + 15
  if (e >= 0x1f) return sign | 0x7c00
  if (e <= 0) {
    // Subnormal half: the value is (1.mant) · 2^(exp-127) = full · 2^-24 / 2^(14-e).
    const shift = 14 - e
    if (shift > 24) return sign
    const full = mant | 0x800000
    let q = full >>> shift
    const rest = full & ((1 << shift) - 1)
    const halfway = 1 << (shift - 1)
    if (rest > halfway || (rest === halfway && (q & 1) === 1)) q++
    return sign | q
  }
  let h = (e << 10) | (mant >>> 13)
  const rest = mant & 0x1fff
  // A carry out of the mantissa bumps the exponent, which is the right rounding (up to Infinity).
  if (rest > 0x1000 || (rest === 0x1000 && (h & 1) === 1)) h++
  return sign | h
}

/** float16 bits → number (exact). */
export const float16BitsToFloat32 = (h: number): number => {
  const sign = h & 0x8000 ? -1 : 1
  const exp = (h >>> 10) & 0x1f
  const mant = h & 0x3ff
  if (exp === 0) return sign * mant * 2 ** -24
  if (exp === 0x1f) return mant !== 0 ? Number.NaN : sign * Number.POSITIVE_INFINITY
  return sign * (1 + mant / 1024) * 2 ** (exp - 15)
}

let halfTable: Float32Array | undefined
/** All 65536 float16 values as float32, indexed by their bits; built once: a lookup is much faster than decoding. */
export const float16Table = (): Float32Array => {
  if (halfTable === undefined) {
    halfTable = new Float32Array(65536)
    for (let h = 0; h < 65536; h++) halfTable[h] = float16BitsToFloat32(h)
  }
  return halfTable
}

/** float16 values (as uint16 bits) → float32. */
export const float16ToFloat32Array = (bits: Uint16Array): Float32Array => {
  const table = float16Table()
  const out = new Float32Array(bits.length)
  for (let i = 0; i < bits.length; i++) out[i] = table[bits[i]!]!
  return out
}

/** bfloat16 values (as uint16 bits) → float32: bfloat16 is the upper half of a float32. */
export const bfloat16ToFloat32Array = (bits: Uint16Array): Float32Array => {
  const out = new Float32Array(bits.length)
  const outBits = new Uint32Array(out.buffer)
  for (let i = 0; i < bits.length; i++) outBits[i] = bits[i]! << 16
  return out
}

/** float32 → float16 bits. */
export const float32ToFloat16Array = (values: Float32Array): Uint16Array => {
  const out = new Uint16Array(values.length)
  for (let i = 0; i < values.length; i++) out[i] = float32ToFloat16Bits(values[i]!)
  return out
}

/** float32 → bfloat16 bits, rounding to nearest even (NaN stays NaN). */
export const float32ToBfloat16Array = (values: Float32Array): Uint16Array => {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length)
  const out = new Uint16Array(values.length)
  for (let i = 0; i < values.length; i++) {
    const x = bits[i]!
    if ((x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff) !== 0) {
      out[i] = (x >>> 16) | 0x40
      continue
    }
    out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16
  }
  return out
}
