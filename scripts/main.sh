#!/usr/bin/env bash
# The main job, until the compression issue turns it into `slimlm demo`: a random-initialised model of
# the published smollm2-135m shape (its output is noise: random weights say nothing about quality),
# generated from and benchmarked against transformers on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/slimlm new-model smollm2-135m runs/smollm2-135m --exist-ok
.venv/bin/slimlm generate runs/smollm2-135m --prompt "def fibonacci(n):" --max-tokens 32
.venv/bin/slimlm bench throughput runs/smollm2-135m --input-len 128 --output-len 64 --concurrency 32 --baseline hf
