/**
 * vitest's global setup: `npm run build` (incremental), so the tests that run the compiled `offramp` and
 * `offramp-http` run what the sources say.
 */
import { execFileSync } from "node:child_process"
import { fileURLToPath } from "node:url"

export default function setup() {
  execFileSync("npm", ["run", "build", "--silent"], {
    cwd: fileURLToPath(new URL("../..", import.meta.url)),
    stdio: "inherit",
  })
}
