/**
 * The exit policy, as pure functions of what is known about the rows at an early exit.
 *
 * A row is scored at an exit when its threshold there is at most 1. A head-free measure (classifier, saturation)
 * has decided before the head runs: a row it holds back goes on and pays no head. Under `per-sequence` each row
 * decides for itself; under `all` (the paper's batch policy) the rows that use it leave together only when every
 * one of them is confident, so one that cannot exit, or that a head-free measure holds back, keeps them all.
 */
import type { ExitPolicy } from "../EarlyExit.js"

export interface ExitRow {
  /** The row's threshold at this exit; above 1 (Infinity): it is not scored here. */
  readonly threshold: number
  readonly policy: ExitPolicy
  /** The confidence of a head-free measure, when the row's measure is one (known before the head runs). */
  readonly headFree: number | undefined
  /** A gated decision: a row that passes the head-free measure exits only if the head's max probability reaches this. */
  readonly confirm: number | undefined
}

/** Which rows need the head at this exit, and which take their token from the step's final head call instead. */
export interface HeadPlan {
  /** Rows that passed a head-free measure with nothing to confirm: they exit, and share the final head (`deferred`). */
  readonly deferred: ReadonlyArray<number>
  /** Rows that the head must score (a head measure) or confirm (a gated decision), or that need a head of their own. */
  readonly headed: ReadonlyArray<number>
}

const scored = (row: ExitRow) => row.threshold <= 1
const passesHeadFree = (row: ExitRow) => row.headFree === undefined || row.headFree >= row.threshold

/**
 * Before the head: the rows that may still exit here. `sharedHead`: every exit shares the final head, so a row that
 * exits without needing a head to decide can take its token from the final head call.
 */
export const planHead = (rows: ReadonlyArray<ExitRow>, sharedHead: boolean): HeadPlan => {
  const allPossible = rows.every((row) => row.policy !== "all" || (scored(row) && passesHeadFree(row)))
  const deferred: Array<number> = []
  const headed: Array<number> = []
  rows.forEach((row, r) => {
    if (!scored(row) || !passesHeadFree(row) || (row.policy === "all" && !allPossible)) return
    if (sharedHead && row.headFree !== undefined && row.confirm === undefined) deferred.push(r)
    else headed.push(r)
  })
  return { deferred, headed }
}

/**
 * Whether a headed row is confident, from the head's confidence for it (its measure's, or the head's max probability
 * when it confirms a head-free decision).
 */
export const confidentAfterHead = (row: ExitRow, headConfidence: number, maxProb: number): boolean =>
  row.headFree !== undefined ? row.confirm === undefined || maxProb >= row.confirm : headConfidence >= row.threshold

/** After the head: the rows that take their token at this exit, given which rows are confident. */
export const exitingRows = (rows: ReadonlyArray<ExitRow>, confident: ReadonlyArray<boolean>): Array<number> => {
  const all = rows.flatMap((row, r) => (row.policy === "all" ? [r] : []))
  const allExit = all.length > 0 && all.every((r) => confident[r])
  return rows.flatMap((row, r) => ((row.policy === "all" ? allExit : confident[r]) ? [r] : []))
}
