#!/usr/bin/env bash
# Importance of the blocks and layers of a LoRA module on one task (variables: see importance.sh).
: "${DELTA:=lora}"
export DELTA
exec bash "$(dirname "$0")/importance.sh" "$@"
