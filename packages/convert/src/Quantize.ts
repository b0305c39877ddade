/**
 * Block quantization of weight matrices in the layout of onnxruntime's contrib `MatMulNBits`:
 * B [N, K] (row-major [out, in], as in PyTorch) cut into blocks of `blockSize` along K, each block with its own
 * float scale and (asymmetric) zero point; w ≈ (q - zeroPoint) · scale.
 */

export interface Quantization {
  readonly bits: 4 | 8
  /** Values per block along K: a power of two ≥ 16 (MatMulNBits). */
  readonly blockSize: number
  /** Symmetric: no stored zero points (MatMulNBits then uses 2^(bits-1)); asymmetric: one per block. */
  readonly symmetric: boolean
  /** Search each block's range for the least squared error (default true); false: plain min/max rounding. */
  readonly search?: boolean
  /**
   * MatMulNBits' `accuracy_level`: the precision of the activations in its kernel. 0 (the default) and 1 compute in
   * float32, expanding the weights; 4 quantizes the activations to int8 per block and runs integer dot products
   * (VNNI/AVX-512 where the CPU has them, onnxruntime's fallback elsewhere). See BENCHMARKS.md for what each costs
   * and how fast it runs here.
   */
  readonly accuracyLevel?: 0 | 1 | 2 | 3 | 4
}

/** Range shrink factors tried per block. */
const SHRINKS = Array.from({ length: 13 }, (_, i) => 1 - i * 0.025)

export interface BlockQuantized extends Quantization {
  /** N: output features. */
  readonly rows: number
  /** K: input features. */
  readonly cols: number
  /** ceil(K / blockSize); the last block is zero-padded. */
  readonly blocks: number
  /** [N, blocks, blockSize · bits / 8]; 4-bit values two per byte, the even index in the low nibble. */
  readonly data: Uint8Array
  /** [N · blocks] */
  readonly scales: Float32Array
  /** Asymmetric only: 8-bit [N · blocks]; 4-bit [N · ceil(blocks / 2)], packed like the data. */
  readonly zeroPoints?: Uint8Array
}

export const validateQuantization = (q: Quantization): string | undefined =>
  q.bits !== 4 && q.bits !== 8
    ? `quantization bits must be 4 or 8, got ${q.bits}`
    : !Number.isInteger(q.blockSize) || q.blockSize < 16 || (q.blockSize & (q.blockSize - 1)) !== 0
      ? `quantization block size must be a power of two ≥ 16, got ${q.blockSize}`
      : q.accuracyLevel !== undefined && ![0, 1, 2, 3, 4].includes(q.accuracyLevel)
        ? `quantization accuracy level must be 0..4, got ${q.accuracyLevel}`
        : undefined

/** Quantizes a row-major [rows, cols] matrix block by block along its rows. */
export const quantizeBlocks = (w: Float32Array, rows: number, cols: number, q: Quantization): BlockQuantized => {
  if (w.length !== rows * cols) throw new Error(`quantize: ${w.length} values for [${rows}, ${cols}]`)
  const problem = validateQuantization(q)
  if (problem !== undefined) throw new Error(problem)
  const { bits, blockSize, symmetric } = q
  const blocks = Math.ceil(cols / blockSize)
  const levels = 2 ** bits
  const center = levels / 2
  const blobBytes = (blockSize * bits) / 8
  const data = new Uint8Array(rows * blocks * blobBytes)
  const scales = new Float32Array(rows * blocks)
  const zpStride = bits === 8 ? blocks : Math.ceil(blocks / 2)
  const zeroPoints = symmetric ? undefined : new Uint8Array(rows * zpStride)
  const codes = new Uint8Array(blockSize)
  for (let r = 0; r < rows; r++) {
    for (let b = 0; b < blocks; b++) {
      const start = r * cols + b * blockSize
      const count = Math.min(blockSize, cols - b * blockSize)
      let min = 0
      let max = 0
      let extreme = 0
      for (let i = 0; i < count; i++) {
        const v = w[start + i]!
        if (v < min) min = v
        if (v > max) max = v
        if (Math.abs(v) > Math.abs(extreme)) extreme = v
      }
      // Round-to-nearest with the block's full range clips nothing but wastes levels on outliers; trying a few
      // narrower ranges and keeping the least squared error is a cheap, data-free improvement (as in llama.cpp).
      let best = Number.POSITIVE_INFINITY
      let scale = 0
      let zero = center
      for (const shrink of q.search === false ? [1] : SHRINKS) {
        let s: number
        let z: number
        if (symmetric) {
          // As llama.cpp's Q4_0: the largest-magnitude value maps to -2^(bits-1), using the whole code range.
          s = Math.fround((extreme * shrink) / -center)
          z = center
        } else {
          // The range includes 0, so the zero point is a valid code and zero-padding is exact.
          s = Math.fround(((max - min) * shrink) / (levels - 1))
          z = s === 0 ? 0 : Math.min(levels - 1, Math.max(0, Math.round((-min * shrink) / s)))
        }
        const inverse = s === 0 ? 0 : 1 / s
        let error = 0
        for (let i = 0; i < count; i++) {
          const v = w[start + i]!
          const code = Math.min(levels - 1, Math.max(0, Math.round(v * inverse) + z))
          const d = (code - z) * s - v
          error += d * d
        }
        if (error < best) {
          best = error
          scale = s
          zero = z
        }
      }
      const inverse = scale === 0 ? 0 : 1 / scale
      codes.fill(zero)
      for (let i = 0; i < count; i++) {
        codes[i] = Math.min(levels - 1, Math.max(0, Math.round(w[start + i]! * inverse) + zero))
      }
      scales[r * blocks + b] = scale
      const blob = (r * blocks + b) * blobBytes
      if (bits === 8) data.set(codes, blob)
      else for (let i = 0; i < blobBytes; i++) data[blob + i] = codes[2 * i]! | (codes[2 * i + 1]! << 4)
      if (zeroPoints !== undefined) {
        if (bits === 8) zeroPoints[r * zpStride + b] = zero
        else zeroPoints[r * zpStride + (b >> 1)]! |= zero << ((b & 1) * 4)
      }
    }
  }
  return { bits, blockSize, symmetric, rows, cols, blocks, data, scales, ...(zeroPoints ? { zeroPoints } : {}) }
}

/** The matrix a quantized one stands for, row-major [rows, cols] (what MatMulNBits multiplies by). */
export const dequantizeBlocks = (q: BlockQuantized): Float32Array => {
  const { rows, cols, blocks, blockSize, bits } = q
  const out = new Float32Array(rows * cols)
  const blobBytes = (blockSize * bits) / 8
  const zpStride = bits === 8 ? blocks : Math.ceil(blocks / 2)
  for (let r = 0; r < rows; r++) {
    for (let b = 0; b < blocks; b++) {
      const scale = q.scales[r * blocks + b]!
      const zero =
        q.zeroPoints === undefined
          ? 2 ** (bits - 1)
          : bits === 8
            ? q.zeroPoints[r * zpStride + b]!
            : (q.zeroPoints[r * zpStride + (b >> 1)]! >> ((b & 1) * 4)) & 0xf
      const blob = (r * blocks + b) * blobBytes
      for (let i = 0; i < blockSize && b * blockSize + i < cols; i++) {
        const code = bits === 8 ? q.data[blob + i]! : (q.data[blob + (i >> 1)]! >> ((i & 1) * 4)) & 0xf
        out[r * cols + b * blockSize + i] = (code - zero) * scale
      }
    }
  }
  return out
}
