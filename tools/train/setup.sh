#!/usr/bin/env bash
# Installs the Debian packages the Offramp training recipe needs (idempotent).
# Debian bookworm: python3-torch 1.13 imports only under /usr/bin/python3.
# python3-safetensors / python3-tokenizers do not exist in bookworm; the recipe
# writes safetensors and trains the BPE tokenizer itself. python3-regex gives the
# exact GPT-2 pre-tokenizer pattern (\p{L}, \p{N}); tokenizer.py falls back to re.
set -euo pipefail
PKGS=(python3-torch python3-numpy libopenblas0-pthread python3-regex)
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
else
  echo "setup: all packages already installed"
fi
/usr/bin/python3 -c 'import torch, numpy; print("setup: torch", torch.__version__, "numpy", numpy.__version__)'
