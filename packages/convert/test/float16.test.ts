import { describe, expect, it } from "@effect/vitest"
import * as fc from "fast-check"
import {
  bfloat16ToFloat32Array,
  float16BitsToFloat32,
  float16ToFloat32Array,
  float32ToBfloat16Array,
  float32ToFloat16Array,
  float32ToFloat16Bits,
} from "../src/Float16.js"

describe("float16", () => {
  it("every half value survives half → float32 → half", () => {
    const all = Uint16Array.from({ length: 65536 }, (_, i) => i)
    const back = float32ToFloat16Array(float16ToFloat32Array(all))
    for (let h = 0; h < 65536; h++) {
      const nan = (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0
      if (nan) expect(Number.isNaN(float16BitsToFloat32(back[h]!))).toBe(true)
      else expect(back[h]).toBe(h)
    }
  })

  it("decodes known values", () => {
    expect(float16BitsToFloat32(0x3c00)).toBe(1)
    expect(float16BitsToFloat32(0xc000)).toBe(-2)
    expect(float16BitsToFloat32(0x7bff)).toBe(65504)
    expect(float16BitsToFloat32(0x0001)).toBe(2 ** -24)
    expect(float16BitsToFloat32(0x7c00)).toBe(Number.POSITIVE_INFINITY)
    expect(Object.is(float16BitsToFloat32(0x8000), -0)).toBe(true)
  })

  it("rounds to nearest even, overflows to infinity and underflows through subnormals", () => {
    expect(float32ToFloat16Bits(1 + 2 ** -11)).toBe(0x3c00) // halfway, even stays
    expect(float32ToFloat16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02) // halfway, odd rounds up
    expect(float32ToFloat16Bits(65519)).toBe(0x7bff)
    expect(float32ToFloat16Bits(65520)).toBe(0x7c00)
    expect(float32ToFloat16Bits(-1e6)).toBe(0xfc00)
    expect(float32ToFloat16Bits(2 ** -25)).toBe(0) // halfway to the smallest subnormal, even is 0
    expect(float32ToFloat16Bits(1.5 * 2 ** -25)).toBe(1)
    expect(float32ToFloat16Bits(3 * 2 ** -25)).toBe(2) // 1.5 ulp: ties to even
    expect(float32ToFloat16Bits(2 ** -14 - 2 ** -25)).toBe(0x0400) // rounds up into the normals
    expect(float32ToFloat16Bits(Number.NaN) & 0x7e00).toBe(0x7e00)
  })

  it("is within half an ulp of any value in range", () => {
    fc.assert(
      fc.property(fc.float({ min: -60000, max: 60000, noNaN: true }), (x) => {
        const y = float16BitsToFloat32(float32ToFloat16Bits(x))
        const ulp = Math.abs(x) < 2 ** -14 ? 2 ** -24 : 2 ** (Math.floor(Math.log2(Math.abs(x))) - 10)
        return Math.abs(y - x) <= ulp / 2 + 1e-30
      }),
    )
  })
})

describe("bfloat16", () => {
  it("is the upper half of a float32, rounded to nearest even", () => {
    const values = new Float32Array([1, -2.5, 3.140625, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1e30, -1e-30])
    const back = bfloat16ToFloat32Array(float32ToBfloat16Array(values))
    expect(Array.from(back.slice(0, 3))).toEqual([1, -2.5, 3.140625])
    expect(back[3]).toBe(1) // halfway, even stays
    expect(back[4]).toBe(1 + 2 ** -6) // halfway, odd rounds up
    expect(Math.abs(back[5]! / 1e30 - 1)).toBeLessThan(2 ** -8)
    expect(Math.abs(back[6]! / -1e-30 - 1)).toBeLessThan(2 ** -8)
    expect(Number.isNaN(bfloat16ToFloat32Array(float32ToBfloat16Array(new Float32Array([Number.NaN])))[0])).toBe(true)
  })
})
