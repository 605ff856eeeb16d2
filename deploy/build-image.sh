#!/usr/bin/env bash
# Build static binaries and the ds824:latest image (FROM scratch: nothing is pulled).
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
echo "== building static binaries (release, $target)"
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target "$target" --bins

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
