export * from "./ModelDirectory.js"
export * from "./OnnxEngine.js"
export * from "./OnnxModelRunner.js"
export * as WorkerEngine from "./WorkerEngine.js"
