/**
 * The public API of every package, as its declarations give it: each namespace its index exports and each name in
 * it, values and types apart. A change to what a host app can import changes the snapshot, so it is made on purpose
 * (`npx vitest run test/public-api.test.ts -u`, and the diff reviewed).
 */
import { readdirSync, readFileSync } from "node:fs"
import { join } from "node:path"
import ts from "typescript"
import { describe, expect, it } from "vitest"
import { REPO_ROOT } from "./support/stories.js"

const PACKAGES = ["packages/core", "packages/tokenizer", "packages/onnx", "packages/convert", "packages/server"]

const describeExports = (): string => {
  const indexes = PACKAGES.map((p) => join(REPO_ROOT, p, "src/index.ts"))
  const program = ts.createProgram(indexes, {
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    customConditions: ["source"],
    strict: true,
    noEmit: true,
    skipLibCheck: true,
  })
  const checker = program.getTypeChecker()
  const kind = (symbol: ts.Symbol) => {
    const s = symbol.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(symbol) : symbol
    if (s.flags & ts.SymbolFlags.Class) return "class"
    if (s.flags & ts.SymbolFlags.Function) return "function"
    if (s.flags & ts.SymbolFlags.Variable) return s.flags & ts.SymbolFlags.TypeAlias ? "const+type" : "const"
    if (s.flags & ts.SymbolFlags.Interface) return "interface"
    if (s.flags & ts.SymbolFlags.TypeAlias) return "type"
    if (s.flags & ts.SymbolFlags.Module) return "namespace"
    return "other"
  }
  const lines: Array<string> = []
  for (const [i, index] of indexes.entries()) {
    const name = JSON.parse(readFileSync(join(REPO_ROOT, PACKAGES[i]!, "package.json"), "utf8")).name as string
    const moduleSymbol = checker.getSymbolAtLocation(program.getSourceFile(index)!)!
    for (const ns of checker.getExportsOfModule(moduleSymbol).sort((a, b) => a.name.localeCompare(b.name))) {
      const target = checker.getAliasedSymbol(ns)
      const members = checker.getExportsOfModule(target).sort((a, b) => a.name.localeCompare(b.name))
      lines.push(`${name} ${ns.name}`)
      for (const m of members) lines.push(`  ${m.name}: ${kind(m)}`)
    }
  }
  return `${lines.join("\n")}\n`
}

describe("public API", () => {
  it("lists each package's namespaces and their exports (a snapshot a change must update on purpose)", async () => {
    await expect(describeExports()).toMatchFileSnapshot("./__snapshots__/public-api.txt")
  })

  it("keeps internal modules out of every exports map", () => {
    for (const p of PACKAGES) {
      const exportsMap = JSON.parse(readFileSync(join(REPO_ROOT, p, "package.json"), "utf8")).exports
      expect(exportsMap["./internal/*"], p).toBeNull()
      const internal = readdirSync(join(REPO_ROOT, p, "src")).filter((f) => f === "internal")
      const index = readFileSync(join(REPO_ROOT, p, "src/index.ts"), "utf8")
      if (internal.length > 0) expect(index).not.toMatch(/internal\//)
    }
  })
})
