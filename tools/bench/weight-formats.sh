#!/usr/bin/env bash
# Weight formats of the default model's checkpoint: perplexity (offramp evaluate) and full-depth decode speed,
# variants interleaved round by round.
# Usage: bash tools/bench/weight-formats.sh CHECKPOINT_DIR (a Hugging Face checkpoint; the default model's is what
# tools/train writes, e.g. build/sweep/<chosen>/model)
set -euo pipefail
cd "$(dirname "$0")/../.."
src="${1:?give the Hugging Face checkpoint directory}"
out=build/quant
mkdir -p $out
off() { node apps/cli/bin/offramp.js "$@"; }
declare -A flags=(
  [fp32]="--dtype fp32"
  [fp16]="--dtype fp16"
  [int8-l0]="--dtype fp16 --quantize int8 --accuracy-level 0"
  [int8-l4]="--dtype fp16 --quantize int8 --accuracy-level 4"
  [int4-l0]="--dtype fp16 --quantize int4 --accuracy-level 0"
  [int4-l4]="--dtype fp16 --quantize int4 --accuracy-level 4"
)
variants="fp32 fp16 int8-l0 int8-l4 int4-l0 int4-l4"
for v in $variants; do
  [ -f $out/$v/model.json ] || off convert hf --dir $src --out $out/$v --exits 2,4,6 ${flags[$v]} > /dev/null
  off evaluate --model $out/$v --text models/heldout-sample.txt --json > $out/$v.eval.json
done
for round in 1 2 3 4 5; do
  for v in $variants; do
    off bench --model $out/$v --streams 1,16 --max-tokens 64 --repeats 1 --json > $out/$v.bench.$round.json
  done
done
# Per format: files, full-depth perplexity, and the median over rounds of the decode rate's ratio to fp32's in the
# same round (with every round's ratio).
node -e '
const fs = require("fs")
const vs = process.argv[1].split(" ")
const rounds = [1, 2, 3, 4, 5]
const rate = (v, i, s) => JSON.parse(fs.readFileSync(`build/quant/${v}.bench.${i}.json`)).runs.find((r) => r.streams === s).decodeTokensPerSecond
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]
const size = (d) => fs.readdirSync(d).reduce((n, f) => n + fs.statSync(`${d}/${f}`).size, 0)
for (const v of vs) {
  const ppl = JSON.parse(fs.readFileSync(`build/quant/${v}.eval.json`)).exits.at(-1).perplexity
  const ratios = (s) => rounds.map((i) => rate(v, i, s) / rate("fp32", i, s))
  const cell = (s) => `${median(ratios(s)).toFixed(2)}x (${ratios(s).map((x) => x.toFixed(2)).join(", ")})`
  console.log(`| ${v} | ${(size(`build/quant/${v}`) / 1e6).toFixed(1)} MB | ${ppl.toFixed(2)} | ${cell(1)} | ${cell(16)} |`)
}' "$variants"
