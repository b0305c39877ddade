/**
 * @offramp/convert: converters from llama2.c and Hugging Face checkpoints to staged early-exit models, one namespace per module.
 */
export * as ClassifierGraph from "./ClassifierGraph.js"
export * as Errors from "./Errors.js"
export * as Float16 from "./Float16.js"
export * as GraphBuilder from "./GraphBuilder.js"
export * as HfCheckpoint from "./HfCheckpoint.js"
export * as Llama2cCheckpoint from "./Llama2cCheckpoint.js"
export * as Llama2cTokenizer from "./Llama2cTokenizer.js"
export * as LlamaGraphs from "./LlamaGraphs.js"
export * as LlamaWeights from "./LlamaWeights.js"
export * as Quantize from "./Quantize.js"
export * as Safetensors from "./Safetensors.js"
export * as StagedModelWriter from "./StagedModelWriter.js"
export * as WeightFormat from "./WeightFormat.js"
