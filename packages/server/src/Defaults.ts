/**
 * The server's defaults, in a module of their own: a command line can show them in its help without loading the
 * server (whose chat templates load @huggingface/jinja). OpenAiServer and Serve export them too.
 */

/** The largest request body (bytes); larger ones get 413. */
export const DEFAULT_MAX_BODY_BYTES = 1024 * 1024
/** The most sequences waiting for their first token; more get 429. */
export const DEFAULT_MAX_QUEUED_SEQUENCES = 256
/** Loopback only. */
export const DEFAULT_HOST = "127.0.0.1"
export const DEFAULT_PORT = 8000
