# Sourced by adapter.sh, lora.sh and prefix.sh: the method's size variables (ADAPTER_SIZE, LORA_R, ...) from the
# one table, models/sizes.py: its "default" profile (the embedded backbone's), or "paper" with PAPER=1. A value set
# in the environment wins. Usage: source "$(dirname "$0")/sizes.sh" METHOD
sizes_profile=$([[ -n "${PAPER:-}" ]] && echo paper || echo default)
sizes_shell=$("${PYTHON_FOR_SIZES:-python3}" "$(dirname "${BASH_SOURCE[0]}")/../models/sizes.py" --shell \
              "$sizes_profile" "$1") || { echo "error: could not read models/sizes.py" >&2; exit 2; }
eval "$sizes_shell"
unset sizes_profile sizes_shell
