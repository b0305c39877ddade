/**
 * @offramp/core: the engine's services and types, one namespace per module (`Engine.layer`, `Engine.generate`,
 * `Sampler.greedyParams`, …). Each module is also importable on its own, as `@offramp/core/Engine`.
 */
export * as Calibration from "./Calibration.js"
export * as ConfidenceEvaluator from "./ConfidenceEvaluator.js"
export * as EarlyExit from "./EarlyExit.js"
export * as Engine from "./Engine.js"
export * as Errors from "./Errors.js"
export * as ExitClassifier from "./ExitClassifier.js"
export * as Generation from "./Generation.js"
export * as GraphNames from "./GraphNames.js"
export * as KvCache from "./KvCache.js"
export * as ModelRunner from "./ModelRunner.js"
export * as ModelSpec from "./ModelSpec.js"
export * as RowBatch from "./RowBatch.js"
export * as Sampler from "./Sampler.js"
export * as Scheduler from "./Scheduler.js"
export * as Speculation from "./Speculation.js"
export * as Tokenizer from "./Tokenizer.js"
