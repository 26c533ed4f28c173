#!/usr/bin/env bash
# One device call that always brings its results back: runs "$@" with OUT pointing at a scratch folder, stops it
# LIMIT seconds in (default 560, inside the device tool's 600 s), then packs that folder into $OUT/results.tar.gz
# (the tool returns at most 8 files) and copies the small logs beside it.
#   bash benchmarks/device_call.sh bash benchmarks/gpu_session.sh
set -uo pipefail
final=${OUT:-./out}; mkdir -p "$final"
scratch=$(mktemp -d /tmp/kiln-out-XXXX)
OUT=$scratch timeout -k 10 "${LIMIT:-560}" "$@"
echo "== device_call: exit $? after $SECONDS s"
tar -czf "$final/results.tar.gz" -C "$scratch" .
ls -la "$scratch"
