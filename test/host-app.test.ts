/**
 * Offramp as a host app installs it: every workspace packs (`npm pack`), and examples/host-app, copied outside the
 * repository, installs the tarballs it needs (the npm registry as the only other source) and runs: tokens stream
 * from the default model with early exit, the generation's figures arrive, the Effect composition works, and the
 * process exits 0, with one copy of `effect` and no tsx anywhere; the installed `offramp` command answers `--help`
 * and `inspect` from its compiled bundle.
 */
import { execFile } from "node:child_process"
import { cpSync, existsSync, mkdirSync, readdirSync } from "node:fs"
import { join } from "node:path"
import { promisify } from "node:util"
import { describe, expect, it } from "vitest"
import { REPO_ROOT, tempDir } from "./support/stories.js"

const run = promisify(execFile)

/** The installed copies of a package anywhere under node_modules. */
const copiesOf = (root: string, name: string): Array<string> => {
  const found: Array<string> = []
  const walk = (dir: string) => {
    const modules = join(dir, "node_modules")
    if (!existsSync(modules)) return
    for (const entry of readdirSync(modules)) {
      const scoped = entry.startsWith("@") ? readdirSync(join(modules, entry)).map((e) => `${entry}/${e}`) : [entry]
      for (const pkg of scoped) {
        if (pkg === name) found.push(join(modules, pkg))
        walk(join(modules, pkg))
      }
    }
  }
  walk(root)
  return found
}

describe("host app", () => {
  it("installs the packed tarballs outside the repository and streams with early exit", async () => {
    const work = tempDir("host-app")
    const packs = join(work, "packs")
    mkdirSync(packs)
    const { stdout: packed } = await run("npm", ["pack", "--workspaces", "--pack-destination", packs, "--json"], {
      cwd: REPO_ROOT,
      maxBuffer: 64 * 1024 * 1024,
    })
    const tarballs = (JSON.parse(packed) as Array<{ name: string; filename: string }>).map((p) => ({
      name: p.name,
      file: join(packs, p.filename.replace(/^@/, "").replace("/", "-")),
    }))
    expect(tarballs.map((t) => t.name).sort()).toEqual([
      "@offramp/cli",
      "@offramp/convert",
      "@offramp/core",
      "@offramp/default-model",
      "@offramp/http",
      "@offramp/onnx",
      "@offramp/server",
      "@offramp/tokenizer",
    ])
    for (const t of tarballs) expect(existsSync(t.file), t.file).toBe(true)

    const app = join(work, "app")
    cpSync(join(REPO_ROOT, "examples/host-app"), app, { recursive: true, filter: (p) => !p.includes("node_modules") })
    // Every tarball: the library, the default model, and the command (which runs from compiled JavaScript alone).
    await run("npm", ["install", "--no-audit", "--no-fund", "--prefer-offline", ...tarballs.map((t) => t.file)], {
      cwd: app,
      env: { ...process.env, ONNXRUNTIME_NODE_INSTALL: "skip" },
      maxBuffer: 64 * 1024 * 1024,
    })
    expect(copiesOf(app, "effect")).toHaveLength(1)
    expect(copiesOf(app, "tsx")).toEqual([])

    // The installed command, with no tsx anywhere: `--help`, and `inspect` of the packed default model.
    const offramp = join(app, "node_modules/.bin/offramp")
    const help = await run(offramp, ["--help"], { cwd: app })
    expect(help.stdout).toMatch(/generate/)
    const modelDir = join(app, "node_modules/@offramp/default-model/model")
    const inspect = await run(offramp, ["inspect", modelDir], { cwd: app })
    expect(inspect.stdout).toMatch(/exits +after layers 2, 4, 6, 8/)

    const { stdout } = await run("npm", ["start", "--silent"], { cwd: app, maxBuffer: 64 * 1024 * 1024 })
    // The story, then its figures: fewer than 8 layers on average, so early exit happened.
    const figures = stdout.match(/(\d+) tokens, mean depth ([\d.]+) of 8 layers, (\d+) layers skipped, exits (\{.*\})/)
    expect(figures, stdout).not.toBeNull()
    expect(Number(figures![1])).toBe(48)
    expect(Number(figures![2])).toBeLessThan(8)
    expect(Number(figures![3])).toBeGreaterThan(0)
    const histogram = JSON.parse(figures![4]!) as Record<string, number>
    expect(Object.values(histogram).reduce((a, b) => a + b, 0)).toBe(48)
    expect(stdout.indexOf(figures![0])).toBeGreaterThan(20) // the story's text came first
    expect(stdout).toMatch(/^a: The little dog.+$/m)
    expect(stdout).toMatch(/^b: The old king.+$/m)
    expect(stdout).toMatch(/^refused: maxTokens: max tokens must be a positive integer/m)
  }, 600_000)
})
