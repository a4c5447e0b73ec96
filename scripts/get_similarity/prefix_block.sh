#!/usr/bin/env bash
# Importance of the blocks and layers of a prefix-tuning module on one task (variables: see importance.sh).
: "${DELTA:=prefix}"
export DELTA
exec bash "$(dirname "$0")/importance.sh" "$@"
