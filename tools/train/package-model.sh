#!/usr/bin/env bash
# Converts the trained checkpoint into the embedded default model (models/default), fits its exit classifiers and
# calibrates their thresholds on validation text, and prints the quality figures of models/README.md.
# Run after sweep.py (build/sweep/summary.json names the chosen run) or train.py (build/train/DONE) has finished.
set -euo pipefail
cd "$(dirname "$0")/../.."

offramp() { node apps/cli/bin/offramp.js "$@"; }

if [ -f build/sweep/summary.json ]; then
  chosen="$(node -e 'console.log(JSON.parse(require("fs").readFileSync("build/sweep/summary.json","utf8")).chosen)')"
  src="build/sweep/$chosen/model"
else
  src="build/train/model"
fi
for f in tokenizer.json tokenizer_config.json; do [ -f "$src/$f" ] || cp "build/train/model/$f" "$src/$f"; done

# MatMul weights int8 (MatMulNBits at accuracy level 4: int8 activations, integer dot products), the tied embedding in
# the same int8 blocks (its rows are the LM head's), the rest fp16: +0.05% perplexity against fp32, the same as with
# an fp16 embedding, and 1.7x fp32's decode speed at batch 1 (BENCHMARKS.md, "Weight formats").
offramp convert hf --dir "$src" --out models/default --dtype fp16 --quantize int8 --accuracy-level 4 --embedding quantized

# The held-out sample shipped with the model (public domain / CC0 text of the held-out split, never trained on).
head -c 60000 build/train/heldout.txt | sed '$d' > models/heldout-sample.txt

# Exit classifiers and thresholds come from the tail of the training corpus, which train.py holds back as its
# validation split (--val-frac 0.02, about 72k tokens): text the weights never trained on, and not the held-out
# sample the figures are measured on. The classifiers fit on its first 75% and are scored, and the thresholds
# calibrated, on the rest.
tail -c 280000 build/train/corpus.txt | tail -n +2 > build/train/calibration.txt
offramp calibrate --model models/default --text build/train/calibration.txt --classifiers --max-perplexity-increase 0.015 \
  --max-tokens 60000

offramp evaluate --model models/default --text models/heldout-sample.txt
offramp evaluate --model models/default --text models/heldout-sample.txt --max-tokens 2000
(cd models/default && sha256sum ./*)
du -sh models/default
