/**
 * @offramp/server: the OpenAI-compatible HTTP API as an @effect/platform router, one namespace per module.
 */
export * as ApiError from "./ApiError.js"
export * as ChatTemplate from "./ChatTemplate.js"
export * as Metrics from "./Metrics.js"
export * as OpenAiServer from "./OpenAiServer.js"
export * as Protocol from "./Protocol.js"
export * as Router from "./Router.js"
export * as Serve from "./Serve.js"
export * as ServerState from "./ServerState.js"
