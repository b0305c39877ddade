// The `offramp` command as one ES module (apps/cli/dist/bundle/offramp.mjs): Node then parses one file instead of
// the ~900 modules of effect, @effect/cli and the packages, so `offramp --help` starts in a fraction of the time.
// Native and data-carrying packages stay outside: onnxruntime-node, the tokenizers, onnx-proto, the chat-template
// engine, and @offramp/default-model and @offramp/onnx's worker, which find their files beside their own modules.
import { build } from "esbuild"

await build({
  entryPoints: [new URL("../apps/cli/dist/main.js", import.meta.url).pathname],
  outfile: new URL("../apps/cli/dist/bundle/offramp.mjs", import.meta.url).pathname,
  bundle: true,
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
  // CommonJS dependencies inside an ES module bundle call require().
  banner: {
    js: "import { createRequire as __createRequire } from 'node:module'; const require = __createRequire(import.meta.url);",
  },
  logLevel: "warning",
})
