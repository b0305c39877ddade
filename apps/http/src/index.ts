/**
 * @offramp/http: the standalone OpenAI-compatible server as a command. `@offramp/http/command` has the command
 * alone (its flags, and a handler that imports the server when it runs).
 */
export * from "./command.js"
export * from "./serve.js"
