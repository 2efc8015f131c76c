#!/usr/bin/env bash
# usage: scripts/bench/speculative.sh K ROUNDS METHOD...  (py-target, grounded 256/128, 16 concurrent)
cd "$(dirname "$0")/../.."
mkdir -p runs
K=$1; R=$2; shift 2
for m in "$@"; do
  extra=""
  [ "$m" = draft ] && extra="--draft-model models/py-draft"
  [ "$m" = medusa ] && extra="--draft-model models/py-target-medusa"
  echo "### $m K=$K"
  .venv/bin/slimlm bench throughput models/py-target --workload grounded --input-len 256 --output-len 128 \
    --concurrency 16 --repeats $R --speculative-method $m --num-speculative-tokens $K $extra --json 2>/dev/null > runs/spec_$m.json
  .venv/bin/python - "$m" <<'PY'
import json, sys
d = json.load(open(f"runs/spec_{sys.argv[1]}.json"))["speculative"]
for ph in ("batch1", "concurrent"):
    x = d[ph]
    print(ph, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in x.items() if k in ("measured_speedup", "predicted_speedup", "acceptance_rate", "mean_accepted_length")})
print("round_speedups", [round(v, 2) for v in d["batch1"].get("round_speedups", [])])
PY
done
