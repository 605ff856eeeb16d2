#!/usr/bin/env bash
# One command: build the image, bring the whole cluster up healthy, and run a short demo.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/compose-lib.sh

deploy/build-image.sh
mkdir -p /tmp/ds824-mr && chmod 1777 /tmp/ds824-mr
echo "== compose up"
compose up -d
wait_healthy 120 "${ALL_SERVICES[@]}"

bin=target/x86_64-unknown-linux-gnu/release
# kvctl on the host authenticates with the admin certificate the cluster's `certs` job issued.
export_client_certs /tmp/ds824-certs
echo "== client certificates in /tmp/ds824-certs (admin-operator.pem: full rights; client-user.pem: read/write)"
export KVCTL_CLUSTER=127.0.0.1:17001,127.0.0.1:17002,127.0.0.1:17003
echo "== demo"
set -x
"$bin/kvctl" put greeting hello
"$bin/kvctl" append greeting ", world"
"$bin/kvctl" get greeting
"$bin/kvctl" status
# The sharded store, from the host: groups are joined as PEER@CLIENT, so the controllers hand out the
# groups' published ports (inside the network: kvctl --internal-addresses).
"$bin/kvctl" --ctrlers 127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103 --timeout-ms 60000 put sharded hello
"$bin/kvctl" --ctrlers 127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103 get sharded
"$bin/kvctl" --ctrlers 127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103 status
{ set +x; } 2>/dev/null
echo
echo "The cluster is up. Try: $bin/kvctl --help, $bin/mrd --help; see README.md for a walk-through."
