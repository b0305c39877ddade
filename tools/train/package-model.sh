#!/usr/bin/env bash
# Converts the trained checkpoint into the embedded default model (models/default), calibrates its exit
# thresholds on a slice of the training corpus, and prints the quality figures of models/README.md.
# Run after train.py has finished (build/train/DONE).
set -euo pipefail
cd "$(dirname "$0")/../.."

offramp() { node apps/cli/bin/offramp.js "$@"; }

# fp16 storage halves the files; onnxruntime folds the casts at load, so compute stays fp32.
offramp convert hf --dir build/train/model --out models/default --dtype fp16

# The held-out sample shipped with the model (public domain / CC0 text of the held-out split, never trained on).
head -c 60000 build/train/heldout.txt | sed '$d' > models/heldout-sample.txt

# Calibration reads training text, never the held-out sample the figures are measured on.
head -c 400000 build/train/corpus.txt > build/train/calibration.txt
offramp calibrate --model models/default --text build/train/calibration.txt --target 0.95

offramp evaluate --model models/default --text models/heldout-sample.txt
offramp evaluate --model models/default --text models/heldout-sample.txt --max-tokens 2000
(cd models/default && sha256sum ./*)
du -sh models/default
