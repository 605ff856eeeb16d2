#!/usr/bin/env bash
# wc over a generated corpus: `mrd sequential`, a coordinator with 1 and 2 workers in both shuffle modes,
# and the coreutils pipeline, each timed on the same files; then one job of many small inputs. Prints a
# table of wall times and the workers' peak RSS. The numbers in docs/mapreduce.md come from here.
#
#   benches/mr-wc.sh [MIB_TOTAL=1024] [SMALL_INPUTS=10000]
#
# Uses target/release/mrd (built if missing). Run it on an idle machine: it measures per-core speed.
set -euo pipefail
cd "$(dirname "$0")/.."
total_mib=${1:-1024}
small=${2:-10000}
[ -x target/release/mrd ] || cargo build --release --bin mrd
mrd=$PWD/target/release/mrd
work=$(mktemp -d /tmp/mr-wc-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
export DS824_INSECURE=1
files=$(( total_mib / 64 )); [ "$files" -ge 1 ] || files=1
"$mrd" gen-corpus --dir "$work/corpus" --files "$files" --bytes-per-file $((64 << 20)) >/dev/null
mib=$(( $(du -sb "$work/corpus" | cut -f1) >> 20 ))

row() { printf '| %-44s | %8s | %s |\n' "$1" "$2" "$3"; }
now() { date +%s.%N; }
since() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.2f} s')" "$1"; }

echo "wc over $mib MiB ($files files), $(nproc) cores"
row run "wall" "peak RSS"
row --- --- ---
start=$(now)
/usr/bin/time -f %M -o "$work/rss" "$mrd" sequential --app wc --output "$work/seq" "$work"/corpus/*.txt >/dev/null
row "mrd sequential" "$(since "$start")" "$(( $(cat "$work/rss") >> 10 )) MiB"
if [ "$mib" -le 2048 ]; then
  start=$(now)
  cat "$work"/corpus/*.txt | tr -cs 'A-Za-z' '\n' | LC_ALL=C sort | uniq -c >/dev/null
  row "cat | tr | sort | uniq -c (coreutils)" "$(since "$start")" "-"
fi

# One coordinator for every distributed run.
"$mrd" coordinator --listen 127.0.0.1:0 --data-dir "$work/coord" --data-root "$work" \
  --task-timeout 60s >"$work/coord.addr" 2>"$work/coord.log" &
for _ in $(seq 100); do grep -q ':' "$work/coord.addr" 2>/dev/null && break; sleep 0.1; done
addr=$(awk '{print $NF}' "$work/coord.addr" | head -1)

run_job() { # name workers shuffle files...
  local name=$1 workers=$2 shuffle=$3; shift 3
  local out="$work/out-$RANDOM$RANDOM" pids=() start
  start=$(now)
  local id
  id=$("$mrd" submit --coordinator "$addr" --app wc --reduces 10 --shuffle "$shuffle" --output "$out" "$@")
  for w in $(seq "$workers"); do
    /usr/bin/time -f %M -o "$work/rss-$w" "$mrd" worker --exit-when-idle --coordinator "$addr" \
      --dir "$work/w$w" 2>>"$work/workers.log" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  local took peak=0
  took=$(since "$start")
  for w in $(seq "$workers"); do peak=$(( $(cat "$work/rss-$w") > peak ? $(cat "$work/rss-$w") : peak )); done
  case "$("$mrd" status --coordinator "$addr" --job "$id")" in
    *"[done]"*) ;;
    *) echo "job $id failed"; exit 1 ;;
  esac
  row "$name" "$took" "$(( peak >> 10 )) MiB"
}
run_job "1 worker, shared-dir" 1 shared-dir "$work"/corpus/*.txt
run_job "2 workers, shared-dir" 2 shared-dir "$work"/corpus/*.txt
run_job "1 worker, gRPC shuffle" 1 grpc "$work"/corpus/*.txt
run_job "2 workers, gRPC shuffle" 2 grpc "$work"/corpus/*.txt

if [ "$small" -gt 0 ]; then
  mkdir -p "$work/small"
  python3 - "$work/small" "$small" <<'PY'
import sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    open(f"{d}/{i}", "w").write(f"word{chr(97 + i % 26)} common\n")
PY
  run_job "$small inputs, 2 workers, gRPC shuffle" 2 grpc "$work"/small/*
fi
