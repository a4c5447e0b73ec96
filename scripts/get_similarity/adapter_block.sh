#!/usr/bin/env bash
# Importance of the blocks and layers of a bottleneck adapter module on one task (variables: see importance.sh).
: "${DELTA:=adapter}"
export DELTA
exec bash "$(dirname "$0")/importance.sh" "$@"
