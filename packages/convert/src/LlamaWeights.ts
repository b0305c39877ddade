/**
 * The in-memory form of a Llama-family checkpoint that every reader produces and the graph writer consumes.
 * Matrices are row-major [out, in], as in both llama2.c and PyTorch checkpoints.
 * RoPE is always the Hugging Face "rotate half" layout; readers of interleaved checkpoints permute Q/K rows.
 */

export interface LlamaConfig {
  readonly dim: number
  readonly hiddenDim: number
  readonly layers: number
  readonly heads: number
  readonly kvHeads: number
  readonly headDim: number
  readonly vocab: number
  readonly contextLength: number
  readonly normEps: number
  readonly ropeTheta: number
}

export interface LlamaLayerWeights {
  readonly attnNorm: Float32Array
  readonly wq: Float32Array
  readonly wk: Float32Array
  readonly wv: Float32Array
  readonly wo: Float32Array
  readonly ffnNorm: Float32Array
  /** SwiGLU: down(silu(gate x) * up x). */
  readonly gate: Float32Array
  readonly down: Float32Array
  readonly up: Float32Array
}

export interface ExitHeadWeights {
  readonly norm: Float32Array
  /** [vocab, dim] */
  readonly lmHead: Float32Array
}

export interface LlamaWeights {
  readonly config: LlamaConfig
  /** [vocab, dim] */
  readonly embedding: Float32Array
  readonly layers: ReadonlyArray<LlamaLayerWeights>
  /** The final norm and LM head; shared by every exit unless `exitHeads` gives dedicated ones. */
  readonly finalHead: ExitHeadWeights
  /** Dedicated heads keyed by exit layer (1-based count of layers before the exit). */
  readonly exitHeads?: ReadonlyMap<number, ExitHeadWeights>
  /** RoPE inverse frequencies [headDim / 2]; scaling schemes are folded in by the reader. */
  readonly invFreq: Float32Array
}

/** The standard RoPE inverse frequencies theta^(-2i/d). */
export const ropeInvFreq = (headDim: number, theta: number): Float32Array =>
  Float32Array.from({ length: headDim / 2 }, (_, i) => 1 / theta ** ((2 * i) / headDim))

/**
 * Reorders the rows of a Q or K projection from interleaved RoPE pairs (2i, 2i+1) to rotate-half pairs
 * (i, i + d/2), head by head. Attention scores are unchanged because Q and K are permuted alike.
 */
export const interleavedToHalf = (w: Float32Array, heads: number, headDim: number, inDim: number): Float32Array => {
  const out = new Float32Array(w.length)
  const half = headDim / 2
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < half; i++) {
      for (const [from, to] of [
        [2 * i, i],
        [2 * i + 1, i + half],
      ] as const) {
        const src = (h * headDim + from) * inDim
        out.set(w.subarray(src, src + inDim), (h * headDim + to) * inDim)
      }
    }
  }
  return out
}

/** Transposes a row-major [rows, cols] matrix to [cols, rows] (ONNX MatMul wants [in, out]). */
export const transpose = (w: Float32Array, rows: number, cols: number): Float32Array => {
  const out = new Float32Array(w.length)
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = w[r * cols + c]!
  return out
}
