#!/usr/bin/env bash
# wc over a generated corpus: `mrd sequential`, a coordinator with 1 and 2 workers in both shuffle modes,
# and the coreutils pipeline, each timed on the same files; then one job of many small inputs. Prints a
# table of wall times and the workers' peak RSS, and the ratios issue #17 bounds (1 worker / sequential,
# 2 workers / 1 worker). The numbers in docs/mapreduce.md come from here.
#
#   benches/mr-wc.sh [MIB_TOTAL=1024] [SMALL_INPUTS=10000] [REPEAT=3]
#
# Every run but the coreutils one (one run: it takes a minute) is repeated REPEAT times, interleaved, and
# the best time is shown: on a shared VM the spread between runs is ±20 %, and the fastest run is the one
# least disturbed by neighbours. SKIP_COREUTILS=1 skips the coreutils run. Uses target/release/mrd (built
# if missing). Run it on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
total_mib=${1:-1024}
small=${2:-10000}
repeat=${3:-3}
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
seconds() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.2f}')" "$1"; }
best() { sort -g | head -1; }
if [ "$mib" -le 2048 ] && [ -z "${SKIP_COREUTILS:-}" ]; then
  start=$(now)
  cat "$work"/corpus/*.txt | tr -cs 'A-Za-z' '\n' | LC_ALL=C sort | uniq -c >/dev/null
  coreutils=$(seconds "$start")
fi

# One coordinator for every distributed run.
"$mrd" coordinator --listen 127.0.0.1:0 --data-dir "$work/coord" --data-root "$work" \
  --task-timeout 60s >"$work/coord.addr" 2>"$work/coord.log" &
for _ in $(seq 100); do grep -q ':' "$work/coord.addr" 2>/dev/null && break; sleep 0.1; done
addr=$(awk '{print $NF}' "$work/coord.addr" | head -1)

# One timed job: prints its wall time and its workers' peak RSS (KiB).
run_job() { # workers shuffle files...
  local workers=$1 shuffle=$2; shift 2
  local out="$work/out-$RANDOM$RANDOM" pids=() start id took peak=0
  start=$(now)
  id=$("$mrd" submit --coordinator "$addr" --app wc --reduces 10 --shuffle "$shuffle" --output "$out" "$@")
  for w in $(seq "$workers"); do
    /usr/bin/time -f %M -o "$work/rss-$w" "$mrd" worker --exit-when-idle --coordinator "$addr" \
      --dir "$work/w$w" 2>>"$work/workers.log" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  took=$(seconds "$start")
  for w in $(seq "$workers"); do peak=$(( $(cat "$work/rss-$w") > peak ? $(cat "$work/rss-$w") : peak )); done
  case "$("$mrd" status --coordinator "$addr" --job "$id")" in
    *"[done]"*) ;;
    *) echo "job $id failed" >&2; exit 1 ;;
  esac
  rm -rf "$out"
  echo "$took $peak"
}

declare -A times rss
record() { times[$1]+="${2% *}"$'\n'; rss[$1]=${2#* }; }
for round in $(seq "$repeat"); do
  start=$(now)
  /usr/bin/time -f %M -o "$work/rss" "$mrd" sequential --app wc --output "$work/seq-$round" \
    "$work"/corpus/*.txt >/dev/null
  record seq "$(seconds "$start") $(cat "$work/rss")"
  record 1sd "$(run_job 1 shared-dir "$work"/corpus/*.txt)"
  record 2sd "$(run_job 2 shared-dir "$work"/corpus/*.txt)"
  record 1g "$(run_job 1 grpc "$work"/corpus/*.txt)"
  record 2g "$(run_job 2 grpc "$work"/corpus/*.txt)"
done
for k in seq 1sd 2sd 1g 2g; do eval "b_$k=$(printf '%s' "${times[$k]}" | best)"; done
echo "wc over $mib MiB ($files files), $(nproc) cores, best of $repeat"
row run "wall" "peak RSS"
row --- --- ---
row "mrd sequential" "$b_seq s" "$(( ${rss[seq]} >> 10 )) MiB"
[ -n "${coreutils:-}" ] && row "cat | tr | sort | uniq -c (coreutils)" "$coreutils s" "-"
row "1 worker, shared-dir" "$b_1sd s" "$(( ${rss[1sd]} >> 10 )) MiB"
row "2 workers, shared-dir" "$b_2sd s" "$(( ${rss[2sd]} >> 10 )) MiB"
row "1 worker, gRPC shuffle" "$b_1g s" "$(( ${rss[1g]} >> 10 )) MiB"
row "2 workers, gRPC shuffle" "$b_2g s" "$(( ${rss[2g]} >> 10 )) MiB"

if [ "$small" -gt 0 ]; then
  mkdir -p "$work/small"
  python3 - "$work/small" "$small" <<'PY'
import sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    open(f"{d}/{i}", "w").write(f"word{chr(97 + i % 26)} common\n")
PY
  small_run=$(run_job 2 grpc "$work"/small/*)
  row "$small inputs, 2 workers, gRPC shuffle" "${small_run% *} s" "$(( ${small_run#* } >> 10 )) MiB"
fi
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }
# The median over rounds of each round's own ratio: runs of one round are minutes apart at most, so
# they share the host's mood, which drifts between rounds.
paired() {
  python3 - "${times[$1]}" "${times[$2]}" <<'PY'
import statistics, sys
a, b = ([float(x) for x in arg.split()] for arg in sys.argv[1:])
print(f"{statistics.median(x / y for x, y in zip(a, b)):.2f}")
PY
}
echo
echo "best of $repeat: 1 worker / sequential: shared-dir $(ratio "$b_1sd" "$b_seq"), gRPC $(ratio "$b_1g" "$b_seq");" \
  "2 workers / 1 worker: shared-dir $(ratio "$b_2sd" "$b_1sd"), gRPC $(ratio "$b_2g" "$b_1g")"
echo "median of each round's ratio: 1 worker / sequential: shared-dir $(paired 1sd seq), gRPC $(paired 1g seq);" \
  "2 workers / 1 worker: shared-dir $(paired 2sd 1sd), gRPC $(paired 2g 1g)"
