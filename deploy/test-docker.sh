#!/usr/bin/env bash
# The Docker integration test (run by .ci/run; skipped with a notice when no Docker engine is reachable).
# Builds the image, brings the cluster up, and checks that it serves (the KV store from the host, the sharded
# store from inside the network), survives a killed server, runs a MapReduce job, and keeps its data across
# `down` and `up`. Always ends with `down -v`.
set -uo pipefail
cd "$(dirname "$0")/.."
source deploy/compose-lib.sh

if ! docker info >/dev/null 2>&1; then
  echo "docker test: SKIPPED (no Docker engine reachable)"
  exit 0
fi

passed=0
failed=0
# Each line ends with the check's seconds, so the slow ones show in the CI log.
check() {
  local name=$1 began=$SECONDS; shift
  if "$@"; then
    passed=$((passed + 1)); echo "  ok    $name ($((SECONDS - began)) s)"
  else
    failed=$((failed + 1)); echo "  FAIL  $name ($((SECONDS - began)) s)"
  fi
}
# A compose project of this run's own: its volumes are new, whatever an earlier run left behind (a run killed
# before its cleanup leaves its controllers' configuration and its data in volumes, and a later run under the
# same name would start from them), and `docker compose up` clusters of the checkout are not touched.
export COMPOSE_PROJECT_NAME=ds824test$$
cleanup() { compose down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT
# remove_stale_runs: the containers, volumes and networks of earlier runs of this test (projects named
# ds824test*) that never reached their cleanup; their containers would hold the published ports.
remove_stale_runs() {
  local kind ids all name
  for kind in container volume network; do
    all=(); name=.Name; [ "$kind" = container ] && all=(-a) name=.Names
    ids=$(docker "$kind" ls "${all[@]}" --filter label=com.docker.compose.project \
      --format "{{.Label \"com.docker.compose.project\"}} {{$name}}" 2>/dev/null |
      awk -v self="$COMPOSE_PROJECT_NAME" '$1 ~ /^ds824test/ && $1 != self { print $2 }')
    [ -z "$ids" ] && continue
    echo "  (removing ${kind}s left by an earlier run of this test: $(echo $ids | wc -w))"
    case $kind in
      container) docker rm -f -v $ids >/dev/null ;;
      *) docker "$kind" rm $ids >/dev/null ;;
    esac
  done
}

export bin=target/x86_64-unknown-linux-gnu/release
export KVCTL_CLUSTER=127.0.0.1:17001,127.0.0.1:17002,127.0.0.1:17003
kvctl() { "$bin/kvctl" "$@"; }

began=$SECONDS
deploy/build-image.sh || { echo "docker: 0 passed, 1 failed"; exit 1; }
echo "  (image built in $((SECONDS - began)) s)"
size=$(docker image inspect ds824:latest --format '{{.Size}}')
check "image is under 40 MB ($((size / 1000000)) MB)" test "$size" -lt 40000000
check "image runs as a non-root user" test "$(docker image inspect ds824:latest --format '{{.Config.User}}')" = "10001:10001"

remove_stale_runs
cleanup
# ports_free: nothing else (a `docker compose up` cluster of this checkout, another program) holds the ports
# the cluster publishes; said by name, not left to a failed `up`.
ports_free() {
  local port holder
  for port in 17001 17101 17201 17824; do
    holder=$(docker ps --filter "publish=$port" --format '{{.Names}}' 2>/dev/null | head -1)
    if [ -n "$holder" ] || (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "    port $port is taken${holder:+ by container $holder}; stop that first (e.g. docker-compose down)" >&2
      return 1
    fi
  done
}
check "the cluster's published ports are free" ports_free
[ "$failed" -eq 0 ] || { echo "docker: $passed passed, $failed failed"; exit 1; }
mkdir -p /tmp/ds824-mr && chmod 1777 /tmp/ds824-mr && rm -rf /tmp/ds824-mr/*
compose up -d >/tmp/ds824-up.log 2>&1 || { echo "    compose up failed:" >&2; tail -20 /tmp/ds824-up.log >&2; }
check "every service becomes healthy" wait_healthy 180 "${ALL_SERVICES[@]}"
check "the certs job left client certificates to copy out" export_client_certs /tmp/ds824-certs
export_client_certs /tmp/ds824-certs 2>/dev/null || true
# The CA key stays in the `ca` volume, which only the one-shot certs job mounts.
no_ca_key() {
  local service
  for service in kv1 ctrler1 g1a mr-coordinator mr-worker-1; do
    docker cp "$(compose ps -q "$service")":/certs/ca-key.pem - >/dev/null 2>&1 && return 1
  done
  docker cp "$(compose ps -aq certs)":/ca/ca-key.pem - >/dev/null 2>&1
}
check "the CA key is in the certs job's volume only, on no node" no_ca_key

write_keys() { local i; for i in $(seq "$1" "$2"); do kvctl put "key-$i" "value-$i" >/dev/null || return 1; done; }
read_keys() {
  local i
  for i in $(seq "$1" "$2"); do
    [ "$(kvctl get "key-$i")" = "value-$i" ] || { echo "    key-$i wrong or missing" >&2; return 1; }
  done
}
check "writes and reads from the host" bash -c "$(declare -f kvctl write_keys read_keys); write_keys 1 20 && read_keys 1 20"

ctrl() { "$bin/kvctl" --ctrlers 127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103 ctrler "$@"; }
# The controllers name the shard groups by their in-network host names, so the sharded store is used from
# inside the network (kvctl in a shard container; the image has no shell, the binary is run directly).
# The sharded store from the host: groups are joined as PEER@CLIENT, so the controllers hand out the
# published ports; from inside the network kvctl uses the peer addresses (--internal-addresses).
skvctl() { "$bin/kvctl" --ctrlers 127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103 "$@"; }
inskvctl() { compose exec -T g1a /usr/local/bin/kvctl --tls-cert /certs/admin-operator.pem --tls-key /certs/admin-operator-key.pem --internal-addresses --ctrlers ctrler1:7101,ctrler2:7101,ctrler3:7101 "$@"; }
# shard_join_done: the one-shot join job exited 0 (it runs on every `up`; groups already joined are skipped).
shard_join_done() {
  local deadline=$((SECONDS + 60)) id code
  while ((SECONDS < deadline)); do
    id=$(compose ps -q shard-join 2>/dev/null || true)
    if [ -n "$id" ] && [ "$(docker inspect --format '{{.State.Status}}' "$id" 2>/dev/null)" = exited ]; then
      code=$(docker inspect --format '{{.State.ExitCode}}' "$id")
      [ "$code" = 0 ] && return 0
      compose logs --tail 5 shard-join >&2; return 1
    fi
    sleep 1
  done
  echo "    the join job did not exit within 60 s (container: ${id:-never created})" >&2
  return 1
}
write_sharded() { local i; for i in $(seq "$1" "$2"); do skvctl put "skey-$i" "svalue-$i" >/dev/null || return 1; done; }
read_sharded() {
  local i
  for i in $(seq "$1" "$2"); do
    [ "$(skvctl get "skey-$i")" = "svalue-$i" ] || { echo "    skey-$i wrong or missing" >&2; return 1; }
  done
}
# only_group_1: the latest configuration is the first, has group 1, owning all 10 shards, and no other group (the
# controllers started empty and the job joined what it names).
only_group_1() {
  local config
  config=$(ctrl query) || return 1
  grep -q '^config 1$' <<<"$config" && grep -q 'group 1: 10 shards' <<<"$config" && [ "$(grep -c '^ *group [0-9]*:' <<<"$config")" = 1 ] ||
    { echo "    the controllers' latest configuration:" >&2; sed 's/^/      /' <<<"$config" >&2; return 1; }
}
check "the join job joined shard group 1 (all shards)" bash -c "$(declare -f compose shard_join_done ctrl only_group_1); shard_join_done && only_group_1"
check "sharded writes and reads from the host" bash -c "$(declare -f skvctl write_sharded read_sharded); write_sharded 1 20 && read_sharded 1 20"
check "sharded reads inside the network (--internal-addresses)" bash -c "$(declare -f compose inskvctl); [ \"\$(inskvctl get skey-7)\" = svalue-7 ]"
check "kvctl ctrler join adds group 2; half the shards move to it" bash -c "$(declare -f ctrl); ctrl join 2=g2a:7201@127.0.0.1:17204,g2b:7201@127.0.0.1:17205,g2c:7201@127.0.0.1:17206 >/dev/null && ctrl query | grep -q 'group 2: 5 shards'"
check "sharded data intact after the migration" bash -c "$(declare -f skvctl read_sharded); read_sharded 1 20"

# The trust boundary, from the host.
refused_fast() { # refused_fast PATTERN COMMAND...: exit 2 within 5 s, stderr matching PATTERN
  local pattern=$1 start=$SECONDS err; shift
  err=$("$@" 2>&1 >/dev/null); local code=$?
  [ "$code" = 2 ] && ((SECONDS - start <= 5)) && grep -qi -- "$pattern" <<<"$err" || { echo "    exit $code after $((SECONDS - start)) s: $err" >&2; return 1; }
}
check "kvctl without a certificate is refused at once (exit 2)" bash -c "$(declare -f refused_fast); unset DS824_TLS_CA DS824_TLS_CERT DS824_TLS_KEY; refused_fast 'TLS is required' $bin/kvctl get key-1"
rm -rf /tmp/ds824-other-ca && "$bin/kvctl" certs init --dir /tmp/ds824-other-ca --cluster demo --issue admin/operator >/dev/null
check "a certificate from another CA is refused at the handshake (exit 2, at once)" bash -c "$(declare -f refused_fast); export DS824_TLS_CA=/tmp/ds824-other-ca/ca.pem DS824_TLS_CERT=/tmp/ds824-other-ca/admin-operator.pem DS824_TLS_KEY=/tmp/ds824-other-ca/admin-operator-key.pem; refused_fast 'TLS' $bin/kvctl --timeout-ms 20000 get key-1"
check "a client certificate reads but cannot ctrler join (exit 2, permission denied)" bash -c "$(declare -f refused_fast ctrl); export DS824_TLS_CERT=/tmp/ds824-certs/client-user.pem DS824_TLS_KEY=/tmp/ds824-certs/client-user-key.pem; $bin/kvctl get key-1 >/dev/null && refused_fast 'permission denied' ctrl join 3=g3a:7201"
check "peer ports are not published on the host" bash -c "! (exec 3<>/dev/tcp/127.0.0.1/18001) 2>/dev/null && ! compose port kv1 8001 2>/dev/null | grep -q :"

# One server of every replicated group down at once: each keeps a majority.
victims=(kv2 ctrler2 g1b g2b)
compose kill "${victims[@]}" >/dev/null 2>&1
check "writes continue with kv2 killed" bash -c "$(declare -f kvctl write_keys); write_keys 21 40"
check "sharded writes continue with ctrler2, g1b and g2b killed" bash -c "$(declare -f skvctl write_sharded); write_sharded 21 40"
compose start "${victims[@]}" >/dev/null 2>&1
check "the killed servers come back healthy" wait_healthy 120 "${victims[@]}"
check "all data present after kv2 restarted" bash -c "$(declare -f kvctl read_keys); read_keys 1 40"
check "all sharded data present after the restarts" bash -c "$(declare -f skvctl read_sharded); read_sharded 1 40"

# Jepsen-style smoke run from outside: 60 s of SIGKILLs (docker kill) and partitions (iptables in the
# containers' network namespaces) against the KV cluster, every client operation recorded and checked.
# Partitions need root (nsenter, iptables); without it the run kills and pauses only, and says so.
chaos_smoke() {
  local out=/tmp/ds824-chaos-smoke nemesis=kill,partition runner=()
  rm -rf "$out" "$out.log"
  if [ "$(id -u)" -ne 0 ]; then
    if sudo -n true 2>/dev/null; then runner=(sudo -n -E); else
      nemesis=kill,pause; echo "    (not root: nemesis kill,pause instead of kill,partition)"; fi
  fi
  "${runner[@]}" "$bin/chaos" run --target compose --compose-project "$COMPOSE_PROJECT_NAME" --workload register --nemesis "$nemesis" \
    --time 60s --rate 100 --clients 5 --seed 11 --recovery-time 5s --out "$out" >"$out.log" 2>&1
  local rc=$?
  grep -E '^(operations|longest|linearizability|recovery|verdict)' "$out.log" | sed 's/^/    /'
  [ "$rc" -eq 0 ] || { tail -20 "$out.log" >&2; return 1; }
}
check "chaos: 60 s of kill and partition against the KV cluster, linearizable, every fault healed" chaos_smoke
check "the cluster is healthy after the chaos run" wait_healthy 60 kv1 kv2 kv3

# A disk dies: kv3 and its volume are deleted. The operator removes it from the group, starts a fresh kv3
# with --join (deploy/join-kv3.yml) and adds it back; it catches up by snapshot (README, "Membership changes").
replace_kv3() {
  compose rm -sf kv3 >/dev/null 2>&1 || return 1
  docker volume rm "${COMPOSE_PROJECT_NAME}_kv3-data" >/dev/null || return 1
  kvctl member remove 3 >/dev/null || return 1
  compose -f docker-compose.yml -f deploy/join-kv3.yml up -d kv3 >/dev/null 2>&1 || return 1
  kvctl --timeout-ms 60000 member add 3=kv3:8001 >/dev/null || return 1
  kvctl member list | grep -qE '^3 +(voter|leader) +kv3:8001' || { kvctl member list >&2; return 1; }
}
check "kv3 replaced after losing its volume: member remove, fresh kv3 with --join, member add" replace_kv3
# Leadership moves to the new kv3, which answers every key from its own copy.
check "kvctl transfer-leader 3; kv3 alone serves every key" bash -c "$(declare -f kvctl read_keys); kvctl transfer-leader 3 >/dev/null && KVCTL_CLUSTER=127.0.0.1:17003 read_keys 1 40"

"$bin/mrd" gen-corpus --dir /tmp/ds824-mr/in --files 4 --bytes-per-file 200000 >/dev/null
"$bin/mrd" sequential --app wc --output /tmp/ds824-mr/seq /tmp/ds824-mr/in/*.txt >/dev/null
wc_job() {
  "$bin/mrd" submit --coordinator 127.0.0.1:17824 --app wc --reduces 3 --output /tmp/ds824-mr/out \
    --wait /tmp/ds824-mr/in/*.txt >/dev/null &&
    diff <(cat /tmp/ds824-mr/out/mr-out-* | sort) <(sort /tmp/ds824-mr/seq/mr-out-0) >/dev/null
}
check "a wc job on the workers equals the sequential run" wc_job
# MapReduce's trust boundary: only admin submits; restricted apps and paths outside --data-root are refused.
check "a client certificate cannot submit a MapReduce job (exit 2, PERMISSION_DENIED)" bash -c "$(declare -f refused_fast); export DS824_TLS_CERT=/tmp/ds824-certs/client-user.pem DS824_TLS_KEY=/tmp/ds824-certs/client-user-key.pem; refused_fast 'PERMISSION_DENIED' $bin/mrd submit --coordinator 127.0.0.1:17824 --app wc --output /tmp/ds824-mr/denied /tmp/ds824-mr/in/*.txt"
check "mrd submit without a certificate is refused at once (exit 2)" bash -c "$(declare -f refused_fast); unset DS824_TLS_CA DS824_TLS_CERT DS824_TLS_KEY; refused_fast 'TLS is required' $bin/mrd submit --coordinator 127.0.0.1:17824 --app wc --output /tmp/ds824-mr/denied /tmp/ds824-mr/in/*.txt"
mr_refused() { # mr_refused PATTERN SUBMIT-ARGS...: the coordinator refuses the job with a message matching PATTERN
  local pattern=$1 err; shift
  if err=$("$bin/mrd" submit --coordinator 127.0.0.1:17824 --reduces 1 "$@" 2>&1 >/dev/null); then
    echo "    accepted: $*" >&2; return 1
  fi
  grep -q -- "$pattern" <<<"$err" || { echo "    $err" >&2; return 1; }
}
check "the coordinator refuses streaming, an output outside --data-root and a non-empty output" bash -c "$(declare -f mr_refused); mr_refused 'allow-apps streaming' --app streaming --arg mapper=cat --arg reducer=cat --output /tmp/ds824-mr/s /tmp/ds824-mr/in/*.txt && mr_refused 'data-root' --app wc --output /tmp/ds824-elsewhere /tmp/ds824-mr/in/*.txt && mr_refused 'not empty' --app wc --output /tmp/ds824-mr/out /tmp/ds824-mr/in/*.txt"

compose down >/dev/null 2>&1
compose up -d >/dev/null 2>&1
check "cluster healthy again after down and up" wait_healthy 180 "${ALL_SERVICES[@]}"
check "data survives down and up" bash -c "$(declare -f kvctl read_keys); read_keys 1 40"
check "controller configuration survives down and up" bash -c "$(declare -f ctrl); ctrl query | grep -q 'group 1: 5 shards' && ctrl query | grep -q 'group 2: 5 shards'"
check "the join job succeeds again on up (groups already joined are skipped)" bash -c "$(declare -f compose shard_join_done); shard_join_done"
check "sharded data survives down and up" bash -c "$(declare -f skvctl read_sharded); read_sharded 1 40"

echo "docker: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
