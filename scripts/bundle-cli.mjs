// The `offramp` command as ES modules (entry apps/cli/dist/bundle/offramp.mjs): Node then parses a few files instead
// of the ~900 modules of effect, @effect/cli and the packages, so `offramp --help` starts in a fraction of the time.
// Code splitting: each command's implementation (apps/cli/src/handlers/*, @offramp/http's serve.js) is imported
// dynamically when the command runs, so it lands in a chunk of its own (shared code in shared chunks) that `--help`
// and the other commands never load, nor the packages outside the bundle that only those chunks import.
// Native and data-carrying packages stay outside: onnxruntime-node, the tokenizers, onnx-proto, the chat-template
// engine, and @offramp/default-model and @offramp/onnx's worker, which find their files beside their own modules.
import { rmSync, writeFileSync } from "node:fs"
import { build } from "esbuild"

const outdir = new URL("../apps/cli/dist/bundle", import.meta.url).pathname
// Chunk names carry content hashes: clear the chunks of earlier builds, which would otherwise pile up (and be packed).
rmSync(outdir, { recursive: true, force: true })

const result = await build({
  entryPoints: { offramp: new URL("../apps/cli/dist/main.js", import.meta.url).pathname },
  outdir,
  entryNames: "[name]",
  // Chunks beside the entry: code that finds files relative to its module (bench's ../bench/heldout.txt) finds
  // them from any of them.
  chunkNames: "[name]-[hash]",
  outExtension: { ".js": ".mjs" },
  bundle: true,
  splitting: true,
  platform: "node",
  format: "esm",
  target: "node20",
  sourcemap: false,
  external: [
    "onnxruntime-node",
    "@huggingface/tokenizers",
    "@huggingface/jinja",
    "onnx-proto",
    "@offramp/default-model",
  ],
  // CommonJS dependencies inside an ES module bundle call require(); the banner goes at the top of every chunk.
  banner: {
    js: "import { createRequire as __createRequire } from 'node:module'; const require = __createRequire(import.meta.url);",
  },
  // OFFRAMP_BUNDLE_METAFILE=path writes esbuild's metafile there: which chunk holds and imports what.
  metafile: process.env.OFFRAMP_BUNDLE_METAFILE !== undefined,
  logLevel: "warning",
})
if (result.metafile) writeFileSync(process.env.OFFRAMP_BUNDLE_METAFILE, JSON.stringify(result.metafile))
