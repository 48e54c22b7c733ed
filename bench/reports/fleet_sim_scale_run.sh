#!/usr/bin/env bash
# The sim-fleet scaling runs of bench/reports/fleet_sim_scale.md: doc-QA at 4, 16, 64 and 128 sim llama3-8b
# (H200 profile) workers, one sim-fleet process per router setting, cache_aware vs round_robin vs sglang-router.
# Per worker the same shape at every N: 2 documents of ~1.9k tokens (uniform popularity), 6000 KV tokens,
# 2 closed-loop users, 6 s of modelled time (so --duration = 6 x --time-scale real seconds).
# Usage: bench/reports/fleet_sim_scale_run.sh OUT_ROOT "N:S N:S ..."   (N workers at time scale S)
set -euo pipefail
out_root=${1:-/tmp/fsim}
plan=${2:-"4:1 16:8 64:20 128:40"}
routers=${ROUTERS:-cache_aware,round_robin,sglang-router}  # ROUTERS=... to choose
for item in $plan; do
  n=${item%%:*}; s=${item##*:}
  python -m bench.fleet_bench --executor sim --sim-host one-process --time-scale "$s" \
    --workers "$n" --model llama3-8b --worker-arg=--sim-profile --worker-arg=h200-llama3-8b \
    --kv-cache-tokens 6000 --routers "$routers" --workload docqa --documents $((2 * n)) --doc-chars 8000 \
    --zipf 0 --users $((2 * n)) --duration $((6 * s)) --max-tokens 16 --progress-s 60 \
    --out "$out_root/N$n"
done
