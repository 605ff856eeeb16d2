#!/usr/bin/env bash
# What clients see when a leader stops: a graceful stop (SIGTERM: it hands leadership to its most
# up-to-date follower first) next to a crash (SIGKILL: the followers wait out an election timeout). A
# 3-node `kvd kv` cluster on loopback, `kvctl bench --kind put --clients 8` for SECONDS; one second in,
# the leader gets the signal. The outage is the bench's longest time without a successful operation.
# Prints one line per round and a summary per signal.
#
#   benches/leader-outage.sh [ROUNDS=3] [SECONDS=5]
#
# Builds kvd and kvctl (release; B=DIR uses binaries already built there). Ports 27101-27103 (clients)
# and 28101-28103 (peers) on 127.0.0.1, clear of the compose cluster's. Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
seconds=${2:-5}
if [ -z "${B:-}" ]; then
  cargo build --release --quiet --bin kvd --bin kvctl
  B=target/release
fi
export DS824_INSECURE=1
work=$(mktemp -d /tmp/leader-outage.XXXXXX)
pids=()
stop_all() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
trap 'stop_all; rm -rf "$work"' EXIT
peers=1=127.0.0.1:28101,2=127.0.0.1:28102,3=127.0.0.1:28103
clients=1=127.0.0.1:27101,2=127.0.0.1:27102,3=127.0.0.1:27103
cluster=127.0.0.1:27101,127.0.0.1:27102,127.0.0.1:27103

leader_id() {
  "$B/kvctl" --cluster "$cluster" member list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])'
}

declare -A gaps
for signal in TERM KILL; do
  for round in $(seq 1 "$rounds"); do
    rm -rf "$work"/d*
    for i in 1 2 3; do
      "$B/kvd" kv --id "$i" --listen "127.0.0.1:2710$i" --peer-listen "127.0.0.1:2810$i" --peers "$peers" \
        --clients "$clients" --data-dir "$work/d$i" 2>"$work/log$i" &
      pids[i]=$!
    done
    until leader=$(leader_id 2>/dev/null) && [ "$leader" -gt 0 ]; do sleep 0.2; done
    "$B/kvctl" --cluster "$cluster" bench --kind put --clients 8 --ops 100000000 --duration "$seconds" \
      --json >"$work/bench.json" 2>/dev/null &
    bench=$!
    sleep 1
    kill -"$signal" "${pids[$leader]}"
    wait "$bench"
    gap=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["longest_gap_ms"]))' "$work/bench.json")
    echo "SIG$signal to leader $leader, round $round: longest time without a successful put ${gap} ms"
    gaps[$signal]+="$gap "
    stop_all
  done
done
for signal in TERM KILL; do
  echo "SIG$signal: ${gaps[$signal]}(ms, one per round)"
done
