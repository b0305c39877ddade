/**
 * @offramp/onnx: Offramp on onnxruntime-node. `Offramp.layer({ model })` is the one layer a host app provides; the modules below it are for tools and tests that need the parts.
 */
export * as ModelDirectory from "./ModelDirectory.js"
export * as Offramp from "./Offramp.js"
export * as OnnxEngine from "./OnnxEngine.js"
export * as OnnxModelRunner from "./OnnxModelRunner.js"
export * as WorkerEngine from "./WorkerEngine.js"
