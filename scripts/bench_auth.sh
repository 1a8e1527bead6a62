#!/usr/bin/env bash
# Cost of cluster authentication, measured with the cluster benchmark (a real scheduler,
# servers and workers as processes), interleaved run by run so machine drift hits both
# alike: "off" = MESHPOST_CLUSTER_TOKEN="" (unauthenticated), "on" = a token. Prints each
# run's p50 and, per transport, the median of per-round ratios on/off.
# MODE=payload compares a token (off) with a token plus payload MACs (on,
# MESHPOST_AUTH_PAYLOAD=1; tcp only, the same-host path has no per-message MAC).
#   ROUNDS=5 ITERS=2000 TRANSPORTS="tcp cma" bash scripts/bench_auth.sh [build dir]
#   MODE=payload ROUNDS=5 ITERS=2000 TRANSPORTS=tcp bash scripts/bench_auth.sh [build dir]
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-build}/meshpost_cluster_bench"
rounds="${ROUNDS:-5}"
iters="${ITERS:-2000}"
transports="${TRANSPORTS:-tcp cma}"
token=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
if [[ "${MODE:-token}" == payload ]]; then
  off_env=(MESHPOST_CLUSTER_TOKEN="$token" MESHPOST_AUTH_PAYLOAD=0)
  on_env=(MESHPOST_CLUSTER_TOKEN="$token" MESHPOST_AUTH_PAYLOAD=1)
else
  off_env=(MESHPOST_CLUSTER_TOKEN="")
  on_env=(MESHPOST_CLUSTER_TOKEN="$token")
fi
afd=(--workers 2 --servers 2 --push $((128 * 7168)) --push-extra 16 --pull $((128 * 7168 * 2))
     --iters "$iters" --warmup 200)
p50() { sed -n 's/.*"p50_us": \([0-9.]*\).*/\1/p' | tail -1; }
for t in $transports; do
  ratios=()
  for ((r = 1; r <= rounds; r++)); do
    off=$(env "${off_env[@]}" "$bin" --transport "$t" "${afd[@]}" 2>/dev/null | p50)
    on=$(env "${on_env[@]}" "$bin" --transport "$t" "${afd[@]}" 2>/dev/null | p50)
    ratio=$(awk -v a="$on" -v b="$off" 'BEGIN { printf "%.3f", a / b }')
    ratios+=("$ratio")
    echo "$t round $r: p50 off ${off} us, on ${on} us, on/off ${ratio}"
  done
  median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END {
    print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
  echo "$t: median on/off p50 ratio over $rounds rounds: $median"
done
