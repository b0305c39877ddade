/**
 * `offramp serve`: the OpenAI-compatible server, with the same flags as the standalone `offramp-http` (whose command
 * module imports the server only when it runs).
 */
import { serveCommand } from "@offramp/http/command"

export const serve = serveCommand("serve")
