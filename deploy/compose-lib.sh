# Shared by deploy/*.sh: run compose whichever flavour is installed, and wait for health without `--wait`
# (docker-compose v1 does not have it).

compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose "$@"
  else
    docker-compose "$@"
  fi
}

# wait_healthy SECONDS SERVICE...: every named service's container reports healthy (or, without a
# health check, running) within the deadline.
wait_healthy() {
  local deadline=$((SECONDS + $1)); shift
  local service id state
  for service in "$@"; do
    while :; do
      id=$(compose ps -q "$service" 2>/dev/null || true)
      state=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id" 2>/dev/null || true)
      case "$state" in
        healthy|running) break ;;
      esac
      if ((SECONDS >= deadline)); then
        echo "service $service is not healthy (state: ${state:-none})" >&2
        compose logs --tail 20 "$service" >&2 || true
        return 1
      fi
      sleep 1
    done
  done
}

ALL_SERVICES=(kv1 kv2 kv3 ctrler1 ctrler2 ctrler3 g1a g1b g1c g2a g2b g2c g3a g3b g3c mr-coordinator mr-worker-1 mr-worker-2 mr-worker-3)

# export_client_certs DIR: copy the CA and the admin and client certificates out of the `certs` volume
# (through the finished one-shot `certs` container) to DIR, and point kvctl at the admin one.
export_client_certs() {
  local dir=$1 id file
  id=$(compose ps -aq certs)
  # A private directory of ours: one another user made first (a predictable /tmp name) could swap the CA.
  mkdir -p -m 700 "$dir"
  if [ ! -O "$dir" ] || [ -L "$dir" ]; then
    echo "$dir is not a directory of this user's; remove it or choose another" >&2
    return 1
  fi
  chmod 700 "$dir"
  for file in ca.pem admin-operator.pem admin-operator-key.pem client-user.pem client-user-key.pem; do
    docker cp "$id:/certs/$file" "$dir/$file" >/dev/null || return 1
  done
  chmod 600 "$dir"/*-key.pem
  export DS824_TLS_CA=$dir/ca.pem DS824_TLS_CERT=$dir/admin-operator.pem DS824_TLS_KEY=$dir/admin-operator-key.pem
}
