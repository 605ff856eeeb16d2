#!/usr/bin/env bash
# Build static binaries and the ds824:latest image (FROM scratch: nothing is pulled).
# With --binaries-only, stop after the binaries (.ci/run builds them beside the tests, then the Docker
# test calls this script again, which finds them fresh).
set -euo pipefail
cd "$(dirname "$0")/.."

binaries_only=false
case "${1:-}" in
  "") ;;
  --binaries-only) binaries_only=true ;;
  *) echo "usage: deploy/build-image.sh [--binaries-only]" >&2; exit 2 ;;
esac

target=x86_64-unknown-linux-gnu
echo "== building static binaries (release, $target)"
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target "$target" --bins
"$binaries_only" && exit 0

context=deploy/.context
rm -rf "$context"
mkdir -p "$context/bin" "$context/data" "$context/tmp" "$context/certs" "$context/ca"
for bin in kvd kvctl mrd; do
  cp "target/$target/release/$bin" "$context/bin/"
  # Symbol tables are a third of each binary and nothing in a container reads them.
  if command -v strip >/dev/null; then strip "$context/bin/$bin"; fi
done
chmod 1777 "$context/tmp"

echo "== building image ds824:latest"
docker build -q -f deploy/Dockerfile -t ds824:latest "$context"
docker image ls ds824:latest --format 'image ds824:latest: {{.Size}}'
