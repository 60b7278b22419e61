#!/bin/sh
# The demo round trip: a counter is checkpointed from outside and killed
# half-way, then restarted from the image by a fresh supervisor and finishes.
set -e
cd "$(dirname "$0")/.."
img=${TMPDIR:-/tmp}/ckpt-demo.img
echo "== run a counter under ckpt-supervise; checkpoint it at ~1s and kill it"
ckpt-supervise -- sh -c "fixtures/bin/counter 20 100 & sleep 1; ckpt checkpoint \$! -o $img --kill; wait" || true
echo "== image:"
ckpt inspect "$img" | head -n 4
echo "== restart it in a new supervisor: it carries on from where it was"
ckpt-supervise -- ckpt restart -i "$img"
