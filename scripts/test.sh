#!/usr/bin/env bash
# The whole test suite plus ruff, on a fresh machine. pytest's exit code 5 ("no tests collected") fails.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/ruff check slimlm tests || exit 1
.venv/bin/python -m pytest -q -p no:cacheprovider
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
