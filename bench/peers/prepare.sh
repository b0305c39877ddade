#!/usr/bin/env bash
# Converts the weights for all three engines into bench/peers/models/ (ignored by git).
#   OFFRAMP_ROOT=../.. CHECKPOINT=/path/to/hf-checkpoint TOKENIZER=/path/to/tokenizer.json ./prepare.sh [default|smol|all]
# OFFRAMP_ROOT: an Offramp checkout with its packages built (npm install && npm run build); default: this repository.
# CHECKPOINT: the default model's Hugging Face checkpoint (config.json + model.safetensors); TOKENIZER: its
# tokenizer.json when the checkpoint has none (the default model's is in models/default/tokenizer.json).
set -euo pipefail
cd "$(dirname "$0")"
ROOT="${OFFRAMP_ROOT:-$(cd ../.. && pwd)}"
WHICH="${1:-all}"
OFFRAMP="node $ROOT/apps/cli/bin/offramp.js"
layers_of() { node -p 'require(process.argv[1]).num_hidden_layers' "$1"; }

if [[ "$WHICH" == default || "$WHICH" == all ]]; then
  : "${CHECKPOINT:?set CHECKPOINT to the Hugging Face checkpoint directory of the default model}"
  TOK="${TOKENIZER:-$CHECKPOINT/tokenizer.json}"
  out=models/default
  mkdir -p "$out"
  for t in f32 f16 q8_0 q4_0; do
    node convert-gguf.mjs --dir "$CHECKPOINT" --tokenizer "$TOK" --out "$out/$t.gguf" --type "$t" --name offramp-default
  done
  node convert-onnx.mjs --dir "$CHECKPOINT" --tokenizer "$TOK" --out "$out/transformersjs" --offramp "$ROOT"
  # Offramp's own conversions of the same checkpoint at full depth only, fp32 (as the peers' F32) and fp16 storage
  # (as the embedded default model). The embedded model itself is $ROOT/models/default.
  layers=$(layers_of "$(cd "$CHECKPOINT" && pwd)/config.json")
  $OFFRAMP convert hf --dir "$CHECKPOINT" --tokenizer "$TOK" --out "$out/offramp-fp32" --exits "$layers" --dtype fp32
fi

if [[ "$WHICH" == smol || "$WHICH" == all ]]; then
  out=models/smol
  mkdir -p "$out"
  node make-random-model.mjs --out "$out/ckpt" --seed 1
  for t in f32 f16 q8_0 q4_0; do
    node convert-gguf.mjs --dir "$out/ckpt" --out "$out/$t.gguf" --type "$t" --name random-smollm2-135m-shape
  done
  node convert-onnx.mjs --dir "$out/ckpt" --out "$out/transformersjs" --offramp "$ROOT"
  layers=$(layers_of "$PWD/$out/ckpt/config.json")
  $OFFRAMP convert hf --dir "$out/ckpt" --out "$out/offramp" --exits "$layers"
  $OFFRAMP convert hf --dir "$out/ckpt" --out "$out/offramp-fp16" --exits "$layers" --dtype fp16
  # Offramp's block-quantized MatMuls (onnxruntime MatMulNBits, accuracy level 4: int8 activations), the tied
  # embedding quantized too (as llama.cpp's Q8_0 / Q4_0 token_embd).
  for q in int8 int4; do
    $OFFRAMP convert hf --dir "$out/ckpt" --out "$out/offramp-$q" --exits "$layers" \
      --quantize "$q" --accuracy-level 4 --embedding quantized
  done
fi
