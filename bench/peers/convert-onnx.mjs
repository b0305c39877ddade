// Hugging Face Llama checkpoint → a transformers.js model folder: onnx/model.onnx with past key values (the layout of
// Optimum's "text-generation-with-past" exports that transformers.js 4.x loads: inputs input_ids, attention_mask,
// position_ids, past_key_values.{i}.key/value [batch, kv_heads, past, head_dim], num_logits_to_keep; outputs logits,
// present.{i}.key/value),
// config.json (model_type "llama"), generation_config.json and the tokenizer files.
//   node convert-onnx.mjs --dir CHECKPOINT [--tokenizer tokenizer.json] --out DIR [--offramp ../..]
// The graph is built with Offramp's own GraphBuilder (packages/convert/dist, so the Offramp checkout must be built)
// and the same fused operators as Offramp's graphs (SimplifiedLayerNormalization, com.microsoft RotaryEmbedding), so
// that the comparison is of the engines, not of two graph styles. Compute is float32.
import { copyFileSync, existsSync, mkdirSync, writeFileSync } from "node:fs"
import { join, resolve } from "node:path"
import { pathToFileURL } from "node:url"
import { argv, readCheckpoint } from "./lib/checkpoint.mjs"

const args = argv(process.argv.slice(2))
if (!args.dir || !args.out) throw new Error("usage: --dir CHECKPOINT --out DIR [--tokenizer FILE] [--offramp ROOT]")
const offramp = resolve(args.offramp ?? process.env.OFFRAMP_ROOT ?? "../..")
const { GraphBuilder, float } = await import(pathToFileURL(join(offramp, "packages/convert/dist/GraphBuilder.js")).href)

const { config: c, tensors, tokenizerPath, tokenizerConfig, config } = readCheckpoint(args.dir, args.tokenizer)
const t = (name) => {
  const x = tensors.get(name)
  if (!x) throw new Error(`missing tensor ${name}`)
  return x.data
}
const transpose = (w, rows, cols) => {
  const out = new Float32Array(w.length)
  for (let r = 0; r < rows; r++) for (let k = 0; k < cols; k++) out[k * rows + r] = w[r * cols + k]
  return out
}

const g = new GraphBuilder("llama_with_past")
const ids = g.input("input_ids", "int64", ["batch", "seq"])
const attn = g.input("attention_mask", "int64", ["batch", "total"])
const pos = g.input("position_ids", "int64", ["batch", "seq"])
const past = []
for (let l = 0; l < c.layers; l++)
  past.push({
    k: g.input(`past_key_values.${l}.key`, "float32", ["batch", c.kvHeads, "past", c.headDim]),
    v: g.input(`past_key_values.${l}.value`, "float32", ["batch", c.kvHeads, "past", c.headDim]),
  })

// x @ W^T for a row-major [out, in] matrix.
const linear = (x, w, out, inp, name) => g.node("MatMul", [x, g.weight(name, transpose(w, out, inp), [inp, out])])
const rmsNorm = (x, w, name) =>
  g.node("SimplifiedLayerNormalization", [x, g.weight(name, w, [w.length])], { axis: -1, epsilon: float(c.eps) })

// RoPE tables [context, headDim/2], as Offramp's (inv_freq in float32, angle rounded to float32).
const half = c.headDim / 2
const cos = new Float32Array(c.context * half)
const sin = new Float32Array(c.context * half)
for (let p = 0; p < c.context; p++)
  for (let i = 0; i < half; i++) {
    const invFreq = Math.fround(1 / c.theta ** ((2 * i) / c.headDim))
    const angle = Math.fround(p * invFreq)
    cos[p * half + i] = Math.cos(angle)
    sin[p * half + i] = Math.sin(angle)
  }
const ropeCos = g.weight("rope_cos", cos, [c.context, half])
const ropeSin = g.weight("rope_sin", sin, [c.context, half])
const rope = (x, heads) =>
  g.contrib("RotaryEmbedding", [x, pos, ropeCos, ropeSin], { interleaved: 0, num_heads: heads })

// Additive mask [batch, 1, 1, seq, total]: key j is visible to query i (at position past + i) iff j <= past + i and
// attention_mask[b, j] = 1.
const scalarAt = (shapeOf, index) => g.node("Gather", [g.node("Shape", [shapeOf]), g.ints([index], [])], { axis: 0 })
const pastLen = scalarAt(past[0].k, 2)
const seqLen = scalarAt(ids, 1)
const totalLen = g.node("Add", [pastLen, seqLen])
const one = g.ints([1], [])
const zero = g.ints([0], [])
const qPos = g.node("Unsqueeze", [g.node("Range", [pastLen, totalLen, one]), g.ints([1])]) // [seq, 1]
const kPos = g.node("Range", [zero, totalLen, one]) // [total]
const future = g.node("Greater", [kPos, qPos]) // [seq, total]
const padded = g.node("Unsqueeze", [g.node("Equal", [attn, g.ints([0], [])]), g.ints([1])]) // [batch, 1, total]
const hidden = g.node("Or", [future, padded]) // [batch, seq, total]
const mask = g.node("Unsqueeze", [g.node("Where", [hidden, g.scalar(-1e9), g.scalar(0)]), g.ints([1, 2])]) // [batch, 1, 1, seq, total]

const embedding = t("model.embed_tokens.weight")
const table = g.weight("embed_tokens", embedding, [c.vocab, c.dim])
let x = g.node("Gather", [table, ids], { axis: 0 })
const group = c.heads / c.kvHeads
const qDim = c.heads * c.headDim
const kvDim = c.kvHeads * c.headDim
for (let l = 0; l < c.layers; l++) {
  const p = `model.layers.${l}.`
  const h = rmsNorm(x, t(`${p}input_layernorm.weight`), `l${l}_attn_norm`)
  const q = rope(linear(h, t(`${p}self_attn.q_proj.weight`), qDim, c.dim, `l${l}_q`), c.heads)
  const k = rope(linear(h, t(`${p}self_attn.k_proj.weight`), kvDim, c.dim, `l${l}_k`), c.kvHeads)
  const v = linear(h, t(`${p}self_attn.v_proj.weight`), kvDim, c.dim, `l${l}_v`)
  const heads = (y) =>
    g.node("Transpose", [g.node("Reshape", [y, g.ints([0, 0, c.kvHeads, c.headDim])])], { perm: [0, 2, 1, 3] })
  const keys = g.node("Concat", [past[l].k, heads(k)], { axis: 2 }) // [batch, kv, total, hd]
  const values = g.node("Concat", [past[l].v, heads(v)], { axis: 2 })
  g.output(`present.${l}.key`, keys, "float32", ["batch", c.kvHeads, "total", c.headDim])
  g.output(`present.${l}.value`, values, "float32", ["batch", c.kvHeads, "total", c.headDim])
  const qScaled = g.node("Mul", [q, g.scalar(1 / Math.sqrt(c.headDim))])
  const qGrouped = g.node("Transpose", [g.node("Reshape", [qScaled, g.ints([0, 0, c.kvHeads, group, c.headDim])])], {
    perm: [0, 2, 3, 1, 4],
  }) // [batch, kv, group, seq, hd]
  const keysT = g.node("Unsqueeze", [g.node("Transpose", [keys], { perm: [0, 1, 3, 2] }), g.ints([2])]) // [b,kv,1,hd,T]
  const valuesU = g.node("Unsqueeze", [values, g.ints([2])]) // [b,kv,1,T,hd]
  const scores = g.node("Add", [g.node("MatMul", [qGrouped, keysT]), mask])
  const context = g.node("MatMul", [g.node("Softmax", [scores], { axis: -1 }), valuesU]) // [b,kv,group,seq,hd]
  const merged = g.node("Reshape", [g.node("Transpose", [context], { perm: [0, 3, 1, 2, 4] }), g.ints([0, 0, qDim])])
  const x1 = g.node("Add", [x, linear(merged, t(`${p}self_attn.o_proj.weight`), c.dim, qDim, `l${l}_o`)])
  const h2 = rmsNorm(x1, t(`${p}post_attention_layernorm.weight`), `l${l}_ffn_norm`)
  const gate = linear(h2, t(`${p}mlp.gate_proj.weight`), c.ffn, c.dim, `l${l}_gate`)
  const up = linear(h2, t(`${p}mlp.up_proj.weight`), c.ffn, c.dim, `l${l}_up`)
  const act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), up])
  x = g.node("Add", [x1, linear(act, t(`${p}mlp.down_proj.weight`), c.dim, c.ffn, `l${l}_down`)])
}
// num_logits_to_keep (transformers.js sets 1 while generating when the graph declares it): logits of the last k
// positions only, all of them for 0, as Optimum's exports with that input.
const keep = g.input("num_logits_to_keep", "int64", [])
const keepFrom = g.node("Where", [g.node("Greater", [keep, zero]), g.node("Sub", [seqLen, keep]), zero])
const lastRows = g.node("Slice", [
  x,
  g.node("Unsqueeze", [keepFrom, g.ints([0])]),
  g.node("Unsqueeze", [seqLen, g.ints([0])]),
  g.ints([1]),
])
const normed = rmsNorm(lastRows, t("model.norm.weight"), "final_norm")
const lmHead = c.tied
  ? g.node("Transpose", [table], { perm: [1, 0] }) // folded into one initializer by onnxruntime at load
  : g.weight("lm_head", transpose(t("lm_head.weight"), c.vocab, c.dim), [c.dim, c.vocab])
g.output("logits", g.node("MatMul", [normed, lmHead]), "float32", ["batch", "kept", c.vocab])

mkdirSync(join(args.out, "onnx"), { recursive: true })
writeFileSync(join(args.out, "onnx", "model.onnx"), g.encode())
const hf = { ...config.hf, model_type: "llama", architectures: ["LlamaForCausalLM"] }
hf["transformers.js_config"] = { dtype: "fp32", use_external_data_format: false }
writeFileSync(join(args.out, "config.json"), JSON.stringify(hf, null, 2))
writeFileSync(
  join(args.out, "generation_config.json"),
  JSON.stringify({ bos_token_id: c.bos, eos_token_id: c.eos, do_sample: false }, null, 2),
)
copyFileSync(tokenizerPath, join(args.out, "tokenizer.json"))
const tokCfg = join(args.dir, "tokenizer_config.json")
if (existsSync(tokCfg)) copyFileSync(tokCfg, join(args.out, "tokenizer_config.json"))
else writeFileSync(join(args.out, "tokenizer_config.json"), JSON.stringify(tokenizerConfig, null, 2))
console.log(JSON.stringify({ out: args.out, layers: c.layers, vocab: c.vocab }))
