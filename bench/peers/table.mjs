// Markdown table of a run.mjs result file: node table.mjs results/default.json
import { readFileSync } from "node:fs"

const doc = JSON.parse(readFileSync(process.argv[2], "utf8"))
const engines = Object.keys(doc.results[0].engines)
const fmt = (x) => Math.round(x).toLocaleString("en-US")
const lines = [`| measurement | ${engines.join(" | ")} |`, `| --- | ${engines.map(() => "---:").join(" | ")} |`]
for (const r of doc.results) {
  const what =
    r.kind === "decode"
      ? `decode tok/s, ${r.streams} stream${r.streams > 1 ? "s" : ""} × ${r.maxTokens}`
      : `prefill tok/s, ${r.promptTokens}-token prompt`
  lines.push(`| ${what} | ${engines.map((e) => `**${fmt(r.engines[e].median)}**`).join(" | ")} |`)
  lines.push(`| (all runs) | ${engines.map((e) => r.engines[e].runs.map(Math.round).join(" · ")).join(" | ")} |`)
}
console.log(lines.join("\n"))
