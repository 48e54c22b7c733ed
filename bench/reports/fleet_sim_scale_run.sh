#!/usr/bin/env bash
# The sim-fleet scaling runs of bench/reports/fleet_sim_scale.md: doc-QA at 4, 16, 64 and 128 sim llama3-8b
# (H200 profile) workers, one sim-fleet process per router setting, cache_aware vs round_robin vs sglang-router.
# Per worker the same shape at every N: 2 documents of ~1.9k tokens (uniform popularity), 6000 KV tokens,
# 2 closed-loop users.
# Length of the load, one of:
#   * default: 6 s of modelled time (--duration = 6 x --time-scale real seconds). A bigger fleet then serves
#     fewer requests per document, and each document's first request is a cold miss whatever the router;
#   * REQUESTS_PER_DOC=R: until R x documents requests have completed, the same share of cold misses at every
#     N (--duration CAP_S stays the cap, default 1800 s); WARMUP_PER_DOC=W also reports the hit rate past the
#     first W x documents requests (the steady state).
# Usage: [ROUTERS=...] [REQUESTS_PER_DOC=R [WARMUP_PER_DOC=W]] bench/reports/fleet_sim_scale_run.sh OUT_ROOT "N:S ..."
#   (N workers at time scale S)
set -euo pipefail
out_root=${1:-/tmp/fsim}
plan=${2:-"4:1 16:8 64:20 128:40"}
routers=${ROUTERS:-cache_aware,round_robin,sglang-router}  # ROUTERS=... to choose
python=${PYTHON:-python}
for item in $plan; do
  n=${item%%:*}; s=${item##*:}
  length=(--duration $((6 * s)))
  if [[ -n "${REQUESTS_PER_DOC:-}" ]]; then
    length=(--duration "${CAP_S:-1800}" --requests-per-document "$REQUESTS_PER_DOC")
    [[ -n "${WARMUP_PER_DOC:-}" ]] && length+=(--warmup-requests-per-document "$WARMUP_PER_DOC")
  fi
  "$python" -m bench.fleet_bench --executor sim --sim-host one-process --time-scale "$s" \
    --workers "$n" --model llama3-8b --worker-arg=--sim-profile --worker-arg=h200-llama3-8b \
    --kv-cache-tokens 6000 --routers "$routers" --workload docqa --documents $((2 * n)) --doc-chars 8000 \
    --zipf 0 --users $((2 * n)) "${length[@]}" --max-tokens 16 --progress-s 60 \
    --out "$out_root/N$n"
done
