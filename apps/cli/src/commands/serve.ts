/**
 * `offramp serve`: the OpenAI-compatible server, with the same flags as the standalone `offramp-http`.
 */
import { serveCommand } from "@offramp/http"

export const serve = serveCommand("serve")
