// The engine worker's entry (see WorkerEngine.ts). Node 20 worker threads do not inherit the parent's module hooks,
// so the worker registers tsx itself before it imports the TypeScript runner.
import { register } from "tsx/esm/api"

register()
await import("./engineWorker.ts")
