// After tsc: files that compiled code reads beside itself (not TypeScript, so tsc does not copy them).
import { cpSync } from "node:fs"

const assets = [["apps/cli/src/bench/heldout.txt", "apps/cli/dist/bench/heldout.txt"]]
for (const [from, to] of assets) cpSync(new URL(`../${from}`, import.meta.url), new URL(`../${to}`, import.meta.url))
