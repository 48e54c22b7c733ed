#!/usr/bin/env bash
# The sim-vs-GPU check of issue 10, on the CPU box: the doc-QA workload and router settings of
# bench/reports/fleet_gpu_docqa_h200.md (4 llama3-8b workers, 48 documents of 16,000 chars, Zipf 0.8, 32 output
# tokens, 64 closed-loop users, 40 s, cache_aware and round_robin) on 4 sim workers with PROFILE, then a markdown
# table sim vs GPU per router (req/s, hit rate, ratio, within 15%?).
#
# Usage: bench/reports/fleet_sim_vs_gpu.sh PROFILE OUT_DIR [LABEL]
#   PROFILE: a calibration JSON (`radixfleet bench calibrate --out ...`) or a built-in name (h200-llama3-8b)
#   writes OUT_DIR/fleet.json (+ csv, png, logs/) and OUT_DIR/fleet_sim_vs_gpu.md; about 2 x (40 x TIME_SCALE
#   + 30) seconds: 11 minutes at the default TIME_SCALE 4.
# Environment: KV_TOKENS (default 84000: about what each GPU worker had at --mem-fraction 0.2),
#   TIME_SCALE (integer, default 4: all 4 sim workers in one process, every modelled step 4x longer and the load
#   40 x 4 s, i.e. the GPU run's 40 s in modelled time; the figures are converted back. At TIME_SCALE=1 the
#   workers run a process each and the host's own step time on this 2-core box, shared with other work,
#   moves the result: the same profile gave cache_aware 47.8 and 56.9 req/s on two runs),
#   WORKERS_PER_GPU (default 4: the GPU run's 4 workers shared one H200, so the 4 sim workers share one modelled
#   GPU, their steps' GPU parts queued on it: `sim-fleet --workers-per-gpu`; 1: a modelled GPU each),
#   ROUTERS (cache_aware,round_robin).
set -euo pipefail
profile=${1:?usage: $0 PROFILE OUT_DIR [LABEL]}
out=${2:?usage: $0 PROFILE OUT_DIR [LABEL]}
label=${3:-"profile $profile"}
cd "$(dirname "$0")/../.."
scale=${TIME_SCALE:-4}
[[ "$scale" =~ ^[1-9][0-9]*$ ]] || { echo "$0: TIME_SCALE must be a whole number >= 1, got '$scale'" >&2; exit 2; }
per_gpu=${WORKERS_PER_GPU:-4}
host=(--sim-host one-process --time-scale "$scale" --worker-arg=--workers-per-gpu --worker-arg="$per_gpu")
if [[ "$scale" == 1 ]]; then
  [[ "$per_gpu" == 1 ]] || { echo "$0: WORKERS_PER_GPU needs the one-process sim host: TIME_SCALE above 1" >&2; exit 2; }
  host=(--sim-host auto)
fi
python=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" -m bench.fleet_bench --executor sim --workers 4 --model llama3-8b \
  --worker-arg=--sim-profile --worker-arg="$profile" --kv-cache-tokens "${KV_TOKENS:-84000}" \
  "${host[@]}" --workload docqa --documents 48 --doc-chars 16000 --zipf 0.8 --max-tokens 32 \
  --users 64 --duration $((40 * scale)) --routers "${ROUTERS:-cache_aware,round_robin}" --out "$out"
"$python" bench/reports/fleet_sim_vs_gpu_compare.py "$out/fleet.json" "$out/fleet_sim_vs_gpu.md" --label "$label"
