#!/usr/bin/env bash
# usage: scripts/bench/serve.sh MODEL POISSON_RATE [PORT]
# issue 5's figures: rate inf (64 prompts), a Poisson rate (64 prompts), server vs offline at 16 streams.
cd "$(dirname "$0")/../.."
mkdir -p runs
M=$1; R=$2; P=${3:-8012}; S=.venv/bin/slimlm
$S serve "$M" --port $P > /tmp/serve_bench.log 2>&1 &
pid=$!
for i in $(seq 120); do curl -sf localhost:$P/health >/dev/null && break; sleep 1; done
if ! curl -sf localhost:$P/health >/dev/null; then
  echo "the server did not come up in 120 s; its log:" >&2; cat /tmp/serve_bench.log >&2; kill $pid 2>/dev/null; exit 1
fi
echo "### $M rate inf"; $S bench serve --url http://localhost:$P --num-prompts 64 --request-rate inf 2>/dev/null
echo "### $M rate $R"; $S bench serve --url http://localhost:$P --num-prompts 64 --request-rate $R 2>/dev/null
echo "### $M 16 streams vs offline"; $S bench serve --url http://localhost:$P --num-prompts 32 --max-concurrency 16 --offline-baseline "$M" --rounds 3 2>/dev/null
kill -TERM $pid; wait $pid
