#!/usr/bin/env node
// TypeScript run through tsx, as the offramp CLI: no build step between a checkout and a working server.
import { register } from "tsx/esm/api"

register()
await import("../src/main.ts")
