/**
 * Input and output names of the staged ONNX graphs: the contract between the converter and the runner.
 *
 * embed:   ids [R,T] int64 → hidden [R,T,D]
 * segment: hidden [R,T,D], positions [R,T] int64, block_table [R,MB] int32, attn_mask [R,T,MB·bs+T]
 *          (additive: 0 visible, -1e9 hidden; keys are the MB gathered blocks, then the T new rows),
 *          k_pool_<l>, v_pool_<l> [kvHeads, blocks, bs, headDim] (head-major) for each layer l of the segment
 *          → hidden_out [R,T,D], kv_new [R,T,2·n·kvHeads·headDim] (the new rows' K of each of the segment's n
 *          layers in order, then V of each)
 * head:    hidden [N,D] → logits [N,V], max_prob, margin, entropy [N], top_token [N] int64
 * kvfill:  hidden [R,T,D], positions [R,T] → kv_new as a segment's, for every layer after the exit
 * classifier (optional, per exit): hidden [N,D], previous_hidden [N,D] (the previous exit's state, the embedding
 *          before the first exit) → exit_prob [N], the probability that the exit's top token is full depth's
 */
export const GraphNames = {
  ids: "ids",
  hidden: "hidden",
  previousHidden: "previous_hidden",
  hiddenOut: "hidden_out",
  positions: "positions",
  blockTable: "block_table",
  attnMask: "attn_mask",
  kPool: (layer: number) => `k_pool_${layer}`,
  vPool: (layer: number) => `v_pool_${layer}`,
  kvNew: "kv_new",
  logits: "logits",
  maxProb: "max_prob",
  margin: "margin",
  entropy: "entropy",
  topToken: "top_token",
  exitProb: "exit_prob",
} as const

/** The additive mask value for a key a query must not see (exp underflows to exactly 0 in float32). */
export const MASKED = -1e9
