#!/usr/bin/env node
// The compiled CLI (`npm run build` writes dist/; `npm install` in the repository runs it).
await import("../dist/main.js")
