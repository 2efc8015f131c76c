#!/usr/bin/env bash
# The main job: `slimlm demo` on the shipped py-target (models/py-target, trained by slimlm on the Python
# standard library). It compresses the model with every method (RTN, GPTQ, AWQ, SmoothQuant, NF4),
# measures perplexity and KL divergence against the bf16 model, batch-1 decode speed and size, and prints
# the trade-off table (also written to runs/demo/tradeoff.json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/slimlm demo --model models/py-target --out runs/demo/tradeoff.json
