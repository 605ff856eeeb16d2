#!/usr/bin/env bash
# One command: build the image, bring the whole cluster up healthy, and run a short demo.
#
# Prints one line per step; the build's and Docker's own output goes to deploy/.up.log and is shown only
# if a step fails. The first run takes 5-7 minutes on 2 cores, almost all of it the release build of the
# static binaries (tokio, tonic, rustls, sled from source); later runs reuse cargo's cache and take
# about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/compose-lib.sh

log=deploy/.up.log
: >"$log"
step=0
# step "what": print a numbered line for the step that starts now.
step() { step=$((step + 1)); printf '[%d/6] %s\n' "$step" "$1"; }
# quietly CMD...: run CMD with its output in the log; on failure show the log's end and stop.
quietly() {
  if ! "$@" >>"$log" 2>&1; then
    echo "failed: $*" >&2
    echo "--- last lines of $log ---" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
}

started=$SECONDS
step "building static binaries and the ds824:latest image (the first time: 5-7 minutes on 2 cores)"
quietly deploy/build-image.sh
step "starting the cluster (docker compose up)"
mkdir -p /tmp/ds824-mr && chmod 1777 /tmp/ds824-mr
quietly compose up -d
step "waiting until all ${#ALL_SERVICES[@]} services are healthy"
quietly wait_healthy 120 "${ALL_SERVICES[@]}"

bin=target/x86_64-unknown-linux-gnu/release
# kvctl on the host authenticates with the admin certificate the cluster's `certs` job issued.
step "client certificates copied to /tmp/ds824-certs (admin-operator.pem: full rights; client-user.pem: reads and writes)"
quietly export_client_certs /tmp/ds824-certs
export KVCTL_CLUSTER=127.0.0.1:17001,127.0.0.1:17002,127.0.0.1:17003
ctrlers=127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103

step "demo: the replicated store"
quietly "$bin/kvctl" put greeting hello
quietly "$bin/kvctl" append greeting ", world"
echo "      kvctl get greeting -> $("$bin/kvctl" get greeting)"
leader=$("$bin/kvctl" status --json | grep -o '"leader":[0-9]*' | head -n 1 | cut -d: -f2)
echo "      kvctl status -> node ${leader:-?} leads"

# The sharded store, from the host: groups are joined as PEER@CLIENT, so the controllers hand out the
# groups' published ports (inside the network: kvctl --internal-addresses).
step "demo: the sharded store"
quietly "$bin/kvctl" --ctrlers "$ctrlers" --timeout-ms 60000 put sharded hello
echo "      kvctl --ctrlers ... get sharded -> $("$bin/kvctl" --ctrlers "$ctrlers" get sharded)"
echo "      kvctl --ctrlers ... ctrler query -> $("$bin/kvctl" --ctrlers "$ctrlers" ctrler query | head -n 2 | tr '\n' ' ')"

cat <<EOF

The cluster is up ($((SECONDS - started)) s). What to try next:
  export B=$bin
  export DS824_TLS_CA=/tmp/ds824-certs/ca.pem DS824_TLS_CERT=/tmp/ds824-certs/admin-operator.pem \\
         DS824_TLS_KEY=/tmp/ds824-certs/admin-operator-key.pem KVCTL_CLUSTER=$KVCTL_CLUSTER
  \$B/kvctl status                        who leads, terms, indices, sizes
  \$B/kvctl --ctrlers $ctrlers status
  \$B/kvctl snapshot save /tmp/kv.backup  a backup (README.md: "Backup and restore")
  README.md "Quick start" walks through faults, shard moves and MapReduce; "Troubleshooting" says where to look.
EOF
