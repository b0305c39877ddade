/**
 * Speedup-vs-quality chart as a standalone SVG string: no dependencies, deterministic for the same input,
 * so reports can be diffed and checked in.
 */

export interface ChartPoint {
  /** Curve the point belongs to, e.g. "per-sequence/fill @ batch 1". */
  readonly series: string
  /** Small annotation next to the marker, e.g. the exit threshold. */
  readonly label: string
  /** Relative perplexity increase over full depth in %, i.e. (ppl / pplFull − 1) · 100. */
  readonly x: number
  /** Speedup over full depth (1 = as fast as full depth). */
  readonly y: number
}

export interface ChartOptions {
  readonly title?: string
}

/** Tableau 10: distinguishable and colour-blind friendly enough for a handful of series. */
export const PALETTE: ReadonlyArray<string> = [
  "#4e79a7",
  "#f28e2b",
  "#e15759",
  "#76b7b2",
  "#59a14f",
  "#edc948",
  "#b07aa1",
  "#ff9da7",
  "#9c755f",
  "#bab0ac",
]

/** Quality budget drawn as a vertical guide: 2% perplexity increase. */
export const QUALITY_BUDGET_PCT = 2

export const escapeXml = (text: string): string =>
  text
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&apos;")

/**
 * About `count` evenly spaced round ticks (steps of 1, 2 or 5 · 10^k) whose first tick is ≤ min and last ≥ max.
 * Equal bounds are widened so there is always a non-degenerate axis.
 */
export const niceTicks = (min: number, max: number, count = 5): Array<number> => {
  if (!Number.isFinite(min) || !Number.isFinite(max)) throw new Error(`niceTicks: non-finite range [${min}, ${max}]`)
  let lo = Math.min(min, max)
  let hi = Math.max(min, max)
  if (!Number.isFinite(hi - lo)) throw new Error(`niceTicks: range [${min}, ${max}] is too wide`)
  // Spans this small relative to the values are degenerate; near zero a unit pad avoids subnormal steps.
  if (hi - lo < 1e-12 * Math.max(1, Math.abs(lo), Math.abs(hi))) {
    const pad = Math.abs(lo) < 1e-9 ? 1 : Math.abs(lo) * 0.1
    lo -= pad
    hi += pad
  }
  const raw = (hi - lo) / Math.max(1, Math.round(count) - 1)
  const exponent = Math.floor(Math.log10(raw))
  const fraction = raw / 10 ** exponent
  // Nearest round step rather than the next larger one keeps the tick count close to `count`.
  const nice = fraction < 1.5 ? 1 : fraction < 3 ? 2 : fraction < 7 ? 5 : 10
  const step = nice * 10 ** exponent
  // Round every tick to the step's precision so 0.1 + 0.2 style noise never reaches the labels.
  const decimals = Math.max(0, -Math.floor(Math.log10(step)))
  const snap = (v: number): number => Number(v.toFixed(Math.min(20, decimals)))
  const first = Math.floor(lo / step + 1e-9)
  const last = Math.ceil(hi / step - 1e-9)
  const ticks: Array<number> = []
  for (let k = first; k <= last; k++) ticks.push(snap(k * step))
  // The tolerance above avoids a spurious extra tick from FP noise; it must never cost coverage.
  if (ticks[0]! > lo) ticks.unshift(snap((first - 1) * step))
  if (ticks[ticks.length - 1]! < hi) ticks.push(snap((last + 1) * step))
  return ticks
}

const WIDTH = 960
const HEIGHT = 540
const MARGIN = { top: 56, right: 260, bottom: 64, left: 72 }
const PLOT_W = WIDTH - MARGIN.left - MARGIN.right
const PLOT_H = HEIGHT - MARGIN.top - MARGIN.bottom

/** Coordinates with two decimals: compact and stable across platforms. */
const fmt = (v: number): string => {
  const s = v.toFixed(2)
  return s === "-0.00" ? "0.00" : s
}

const tickLabel = (v: number): string => String(Number(v.toPrecision(12)))

interface Series {
  readonly name: string
  readonly color: string
  readonly points: ReadonlyArray<ChartPoint>
}

/** Groups by series in first-appearance order; points keep input order (the caller's sweep order). */
const groupSeries = (points: ReadonlyArray<ChartPoint>): Array<Series> => {
  const byName = new Map<string, Array<ChartPoint>>()
  for (const p of points) {
    const list = byName.get(p.series)
    if (list) list.push(p)
    else byName.set(p.series, [p])
  }
  return [...byName.entries()].map(([name, pts], i) => ({ name, color: PALETTE[i % PALETTE.length]!, points: pts }))
}

/** Data range widened to include the guides, with a little air so markers don't sit on the frame. */
const domain = (values: ReadonlyArray<number>, guide: number): [number, number] => {
  const lo = Math.min(guide, ...values)
  const hi = Math.max(guide, ...values)
  const pad = (hi - lo) * 0.04
  return [lo - pad, hi + pad]
}

export const speedupQualityChart = (points: ReadonlyArray<ChartPoint>, options: ChartOptions = {}): string => {
  // Non-finite values (e.g. a failed run) cannot be placed; drop them rather than corrupt the SVG.
  const usable = points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y))
  const series = groupSeries(usable)
  const [x0, x1] = domain(
    usable.map((p) => p.x),
    QUALITY_BUDGET_PCT,
  )
  const [y0, y1] = domain(
    usable.map((p) => p.y),
    1,
  )
  const xTicks = niceTicks(Math.min(0, x0), x1, 6)
  const yTicks = niceTicks(y0, y1, 6)
  const xMin = xTicks[0]!
  const xMax = xTicks[xTicks.length - 1]!
  const yMin = yTicks[0]!
  const yMax = yTicks[yTicks.length - 1]!
  const sx = (x: number): number => MARGIN.left + ((x - xMin) / (xMax - xMin)) * PLOT_W
  const sy = (y: number): number => MARGIN.top + PLOT_H - ((y - yMin) / (yMax - yMin)) * PLOT_H
  const bottom = MARGIN.top + PLOT_H
  const right = MARGIN.left + PLOT_W
  const title = options.title ?? "Speedup vs quality (early exit vs full depth)"

  const out: Array<string> = []
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${HEIGHT}" viewBox="0 0 ${WIDTH} ${HEIGHT}"` +
      ` font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif">`,
  )
  out.push(`<title>${escapeXml(title)}</title>`)
  out.push(`<rect x="0" y="0" width="${WIDTH}" height="${HEIGHT}" fill="#ffffff"/>`)
  out.push(
    `<text x="${fmt(WIDTH / 2)}" y="28" text-anchor="middle" font-size="18" font-weight="600">` +
      `${escapeXml(title)}</text>`,
  )

  // Grid and ticks.
  out.push(`<g class="grid" stroke="#e5e5e5" stroke-width="1">`)
  for (const t of xTicks) out.push(`<line x1="${fmt(sx(t))}" y1="${MARGIN.top}" x2="${fmt(sx(t))}" y2="${bottom}"/>`)
  for (const t of yTicks) out.push(`<line x1="${MARGIN.left}" y1="${fmt(sy(t))}" x2="${right}" y2="${fmt(sy(t))}"/>`)
  out.push(`</g>`)
  out.push(`<g class="ticks" font-size="12" fill="#333333">`)
  for (const t of xTicks) {
    out.push(`<text x="${fmt(sx(t))}" y="${bottom + 18}" text-anchor="middle">${escapeXml(tickLabel(t))}%</text>`)
  }
  for (const t of yTicks) {
    out.push(`<text x="${MARGIN.left - 8}" y="${fmt(sy(t) + 4)}" text-anchor="end">${escapeXml(tickLabel(t))}×</text>`)
  }
  out.push(`</g>`)
  out.push(
    `<rect x="${MARGIN.left}" y="${MARGIN.top}" width="${PLOT_W}" height="${PLOT_H}" fill="none" stroke="#333333"/>`,
  )

  // Guides: break-even speed and the quality budget.
  out.push(
    `<line class="ref-speedup" x1="${MARGIN.left}" y1="${fmt(sy(1))}" x2="${right}" y2="${fmt(sy(1))}"` +
      ` stroke="#666666" stroke-width="1.5" stroke-dasharray="6 4"/>`,
  )
  out.push(
    `<text x="${right - 4}" y="${fmt(sy(1) - 5)}" text-anchor="end" font-size="11" fill="#666666">` +
      `1.0× (full depth)</text>`,
  )
  const budgetX = fmt(sx(QUALITY_BUDGET_PCT))
  out.push(
    `<line class="ref-quality" x1="${budgetX}" y1="${MARGIN.top}" x2="${budgetX}" y2="${bottom}"` +
      ` stroke="#c0392b" stroke-width="1.5" stroke-dasharray="6 4"/>`,
  )
  out.push(
    `<text x="${fmt(sx(QUALITY_BUDGET_PCT) + 4)}" y="${MARGIN.top + 14}" font-size="11" fill="#c0392b">` +
      `${QUALITY_BUDGET_PCT}% ppl</text>`,
  )

  // Axis titles.
  out.push(
    `<text x="${fmt(MARGIN.left + PLOT_W / 2)}" y="${HEIGHT - 18}" text-anchor="middle" font-size="13">` +
      `relative perplexity increase vs full depth (%)</text>`,
  )
  const yTitleY = fmt(MARGIN.top + PLOT_H / 2)
  out.push(
    `<text x="20" y="${yTitleY}" text-anchor="middle" font-size="13" transform="rotate(-90 20 ${yTitleY})">` +
      `speedup over full depth (×)</text>`,
  )

  if (series.length === 0) {
    out.push(
      `<text x="${fmt(MARGIN.left + PLOT_W / 2)}" y="${fmt(MARGIN.top + PLOT_H / 2)}" text-anchor="middle"` +
        ` font-size="14" fill="#999999">no data</text>`,
    )
  }

  for (const s of series) {
    out.push(`<g class="series" fill="${s.color}" stroke="${s.color}">`)
    if (s.points.length >= 2) {
      const coords = s.points.map((p) => `${fmt(sx(p.x))},${fmt(sy(p.y))}`).join(" ")
      out.push(`<polyline points="${coords}" fill="none" stroke-width="2"/>`)
    }
    for (const p of s.points) {
      out.push(`<circle cx="${fmt(sx(p.x))}" cy="${fmt(sy(p.y))}" r="4" stroke="#ffffff" stroke-width="1"/>`)
      if (p.label !== "") {
        out.push(
          `<text x="${fmt(sx(p.x) + 6)}" y="${fmt(sy(p.y) - 6)}" font-size="10" stroke="none" fill="#333333">` +
            `${escapeXml(p.label)}</text>`,
        )
      }
    }
    out.push(`</g>`)
  }

  // Legend sits right of the plot so it never hides data.
  const legendX = right + 20
  out.push(`<g class="legend" font-size="12">`)
  series.forEach((s, i) => {
    const y = MARGIN.top + 10 + i * 22
    out.push(
      `<line x1="${legendX}" y1="${y}" x2="${legendX + 24}" y2="${y}" stroke="${s.color}" stroke-width="2"/>` +
        `<circle cx="${legendX + 12}" cy="${y}" r="4" fill="${s.color}"/>` +
        `<text x="${legendX + 32}" y="${y + 4}" fill="#222222">${escapeXml(s.name)}</text>`,
    )
  })
  out.push(`</g>`)
  out.push(`</svg>`)
  return out.join("\n")
}
