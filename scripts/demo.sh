#!/usr/bin/env bash
# The end-to-end demo: set up the venv, then the example SFT -> GRPO run on a tiny MoE (CPU).
#   bash scripts/demo.sh [args passed to examples/grpo_moe.sh, e.g. --smoke]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MEGATRON_RL_VENV:-$repo/.venv}"
bash "$repo/scripts/venv.sh"
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
cd "$repo"
exec bash examples/grpo_moe.sh "$@"
