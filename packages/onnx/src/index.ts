export * from "./ModelDirectory.js"
export * from "./OnnxModelRunner.js"
