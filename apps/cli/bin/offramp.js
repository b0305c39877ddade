#!/usr/bin/env node
// The compiled command, bundled into one module (`npm run build` writes it; `npm install` in the repository runs it).
await import("../dist/bundle/offramp.mjs")
