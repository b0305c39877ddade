/**
 * How a conversion stores weights in the ONNX files. Compute is always float32: float16 weights are cast at load
 * and quantized ones are expanded inside onnxruntime's `MatMulNBits`.
 */
import type { ModelSpec } from "@offramp/core/ModelSpec"
import type { Quantization } from "./Quantize.js"

export interface WeightFormat {
  /** Float weights: the embedding, and the MatMul weights unless quantized. Norms and RoPE tables stay float32. */
  readonly float: "float32" | "float16"
  /** Block quantization of the big MatMul weights (attention, MLP, LM heads). */
  readonly quantization?: Quantization
  /**
   * With quantization: the embedding table in the same blocks ("quantized": the rows of a tied embedding are then
   * the LM head's own quantized weights, as llama.cpp keeps them), or in `float` storage ("float", the default).
   */
  readonly embedding?: "float" | "quantized"
}

export const FP32: WeightFormat = { float: "float32" }

/** The default block along K for quantized weights: small blocks keep int4 usable on small models. */
export const DEFAULT_BLOCK_SIZE = 32

/** The `weights` entry of model.json for a format. */
export const weightStorage = (fmt: WeightFormat): NonNullable<ModelSpec["weights"]> => {
  const q = fmt.quantization
  const float = fmt.float === "float16" ? "fp16" : "fp32"
  return q === undefined
    ? { matmul: float, embedding: float }
    : {
        matmul: q.bits === 8 ? "int8" : "int4",
        embedding: fmt.embedding === "quantized" ? (q.bits === 8 ? "int8" : "int4") : float,
        blockSize: q.blockSize,
        symmetric: q.symmetric,
      }
}
