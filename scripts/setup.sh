#!/usr/bin/env bash
# Creates .venv with the pinned CPU torch (so no CUDA wheels are pulled) and slimlm with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
