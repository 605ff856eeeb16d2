#!/usr/bin/env bash
# A chaos campaign against the compose cluster (./deploy/up.sh first; run as root): for each workload,
# the replicated and the sharded store at once (their nemeses fault disjoint containers), every nemesis
# the target supports combined, TIME each (default 10m). Needs groups 1 and 2 joined for `reconfigure`:
#   kvctl --ctrlers 127.0.0.1:17101 ctrler join 2=g2a:7201@127.0.0.1:17204,g2b:7201@127.0.0.1:17205,g2c:7201@127.0.0.1:17206
# Results: OUT/{replicated,sharded}-WORKLOAD/{summary.json,report.html,...} and one line per run in
# OUT/exits (the exit status: 0 valid, 1 violation, 2 no run, 3 undecided).
# Usage: deploy/chaos-campaign.sh [OUT]   (env: TIME=10m WORKLOADS="register append bank" SEED=100)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/campaign-$(date +%Y%m%d-%H%M%S)}
chaos=${CHAOS:-target/x86_64-unknown-linux-gnu/release/chaos}
certs=${CERTS:-/tmp/ds824-certs}
tls=(--tls-ca "$certs/ca.pem" --tls-cert "$certs/admin-operator.pem" --tls-key "$certs/admin-operator-key.pem")
time=${TIME:-10m}
seed=${SEED:-100}
mkdir -p "$out"
for workload in ${WORKLOADS:-register append bank}; do
  seed=$((seed + 1))
  "$chaos" run --target compose "${tls[@]}" --workload "$workload" \
    --nemesis kill,pause,partition,loss,slow,restart-all \
    --time "$time" --seed "$seed" --out "$out/replicated-$workload" \
    > "$out/replicated-$workload.log" 2>&1 &
  replicated=$!
  "$chaos" run --target compose --store sharded "${tls[@]}" --workload "$workload" \
    --nemesis kill,pause,partition,loss,slow,restart-all,reconfigure \
    --time "$time" --seed "$((seed + 50))" --out "$out/sharded-$workload" \
    > "$out/sharded-$workload.log" 2>&1 &
  sharded=$!
  status=0; wait "$replicated" || status=$?
  echo "replicated-$workload exit $status" | tee -a "$out/exits"
  status=0; wait "$sharded" || status=$?
  echo "sharded-$workload exit $status" | tee -a "$out/exits"
done
echo "campaign in $out: every run's verdict and availability are at the end of its .log and in its summary.json"
