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
# The sharded store, from inside the network (the controllers name the groups by in-network host names).
compose exec -T g1a /usr/local/bin/kvctl --tls-cert /certs/admin-operator.pem --tls-key /certs/admin-operator-key.pem --ctrlers ctrler1:7101,ctrler2:7101,ctrler3:7101 --timeout-ms 60000 put sharded hello
compose exec -T g1a /usr/local/bin/kvctl --tls-cert /certs/admin-operator.pem --tls-key /certs/admin-operator-key.pem --ctrlers ctrler1:7101,ctrler2:7101,ctrler3:7101 get sharded
compose exec -T g1a /usr/local/bin/kvctl --tls-cert /certs/admin-operator.pem --tls-key /certs/admin-operator-key.pem --ctrlers ctrler1:7101,ctrler2:7101,ctrler3:7101 status
{ set +x; } 2>/dev/null
echo
echo "The cluster is up. Try: $bin/kvctl --help, $bin/mrd --help; see README.md for a walk-through."
