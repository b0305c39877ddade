import { describe, expect, it } from "@effect/vitest"
import * as fc from "fast-check"
import { dequantizeBlocks, quantizeBlocks, validateQuantization } from "../src/Quantize.js"

const sse = (a: Float32Array, b: Float32Array) => a.reduce((s, v, i) => s + (v - b[i]!) ** 2, 0)

const matrix = (rows: number, cols: number, seed: number) =>
  Float32Array.from({ length: rows * cols }, (_, i) => Math.sin((i + 1) * 12.9898 + seed) * (1 + (i % 7)))

describe("block quantization (MatMulNBits layout)", () => {
  it("packs 4-bit codes two per byte, even index low, with zero points packed per row", () => {
    // One row, K = 40: two blocks of 32 (the second zero-padded).
    const w = Float32Array.from({ length: 40 }, (_, i) => i - 10)
    const q = quantizeBlocks(w, 1, 40, { bits: 4, blockSize: 32, symmetric: false, search: false })
    expect(q.blocks).toBe(2)
    expect(q.data.length).toBe(2 * 16)
    expect(q.zeroPoints!.length).toBe(1)
    const zero0 = q.zeroPoints![0]! & 0xf
    const code = (i: number) => (q.data[i >> 1]! >> ((i & 1) * 4)) & 0xf
    // Block 0 spans [-10, 21]: -10 is code 0, 21 is code 15.
    expect(code(0)).toBe(0)
    expect(code(31)).toBe(15)
    expect(zero0).toBe(Math.round(10 / q.scales[0]!))
    // Padding encodes exactly zero.
    const back = dequantizeBlocks(q)
    expect(back.length).toBe(40)
    const zero1 = q.zeroPoints![0]! >> 4
    for (let i = 40; i < 64; i++) expect(((q.data[16 + ((i - 32) >> 1)]! >> ((i & 1) * 4)) & 0xf) === zero1).toBe(true)
  })

  it("symmetric blocks store no zero points and keep the largest-magnitude value exact", () => {
    const w = new Float32Array([0.5, -4, 1, 2, ...Array.from({ length: 28 }, (_, i) => i / 10)])
    const q = quantizeBlocks(w, 1, 32, { bits: 4, blockSize: 32, symmetric: true, search: false })
    expect(q.zeroPoints).toBeUndefined()
    expect(dequantizeBlocks(q)[1]).toBe(-4)
  })

  it("plain rounding is within half a step; the range search never does worse", () => {
    fc.assert(
      fc.property(
        fc.constantFrom(4 as const, 8 as const),
        fc.boolean(),
        fc.constantFrom(16, 32, 64),
        fc.integer({ min: 1, max: 4 }),
        fc.integer({ min: 1, max: 100 }),
        fc.integer(),
        (bits, symmetric, blockSize, rows, cols, seed) => {
          const w = matrix(rows, cols, seed)
          const plain = quantizeBlocks(w, rows, cols, { bits, blockSize, symmetric, search: false })
          const back = dequantizeBlocks(plain)
          for (let r = 0; r < rows; r++) {
            for (let c = 0; c < cols; c++) {
              const step = Math.abs(plain.scales[r * plain.blocks + Math.floor(c / blockSize)]!)
              // Symmetric: the value opposite the extreme may clip by one step.
              const bound = symmetric ? step * 1.0001 : step * 0.5001
              if (Math.abs(back[r * cols + c]! - w[r * cols + c]!) > bound + 1e-6) return false
            }
          }
          const searched = quantizeBlocks(w, rows, cols, { bits, blockSize, symmetric })
          return sse(dequantizeBlocks(searched), w) <= sse(back, w) * (1 + 1e-9)
        },
      ),
      { numRuns: 60 },
    )
  })

  it("8-bit error is about 16x smaller than 4-bit", () => {
    const w = matrix(8, 256, 3)
    const err = (bits: 4 | 8) =>
      sse(dequantizeBlocks(quantizeBlocks(w, 8, 256, { bits, blockSize: 32, symmetric: false })), w)
    expect(err(4) / err(8)).toBeGreaterThan(100)
  })

  it("rejects block sizes MatMulNBits does not take", () => {
    expect(validateQuantization({ bits: 4, blockSize: 32, symmetric: false })).toBeUndefined()
    expect(validateQuantization({ bits: 4, blockSize: 24, symmetric: false })).toMatch(/power of two/)
    expect(validateQuantization({ bits: 4, blockSize: 8, symmetric: false })).toMatch(/≥ 16/)
    expect(() => quantizeBlocks(new Float32Array(4), 2, 3, { bits: 8, blockSize: 16, symmetric: true })).toThrow()
  })
})
