#!/usr/bin/env bash
#SBATCH --job-name=grpo_agentic
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=06:00:00
#SBATCH --output=grpo_agentic-%j.out
# Agentic RL demo: SFT with calculator tool-use traces -> multi-turn GRPO with the calculator on
# the hard band -> the eval table with and without the tool, over several seeds.
#
#   bash examples/grpo_agentic.sh [--smoke] [grpo flags...]
#   sbatch examples/grpo_agentic.sh [--smoke] [grpo flags...]
#
# Stages, all under $RUN (default runs/grpo_agentic), each skipped when its output exists:
#   1. data: the tiny Qwen3-MoE and the synthetic task with a share of SFT rows written as
#      calculator conversations (megatron_rl.data.synthetic --tool-frac $TOOL_FRAC: user prompt,
#      one <tool_call>{"name": "calc", "arguments": {"expr": ...}}</tool_call> turn per operation,
#      the tool's result as a tool message, then "The answer is \boxed{N}."), the sparse 4-5-op
#      exposure of grpo_moe.sh (--edge-ops 4-5 --edge-frac 0.05), RL prompts of 4-5 operations;
#   2. per seed in $SEEDS: examples/grpo_moe.sh with RUN=$RUN/seed<S> on that data (its SFT stage
#      runs with --seq-length 512: a 3-op tool trace is ~310 tokens, a 5-op one ~500 with the tiny tokenizer), then GRPO
#      with a 408-token episode budget: the tiny model's context is 512 tokens and the longest
#      eval prompt (ood_hard) is 103, so grpo refuses a larger --max-new-tokens (DatasetError naming the row);
#      with --env calc (multi-turn, the calculator environment of megatron_rl.rollout.tools_calc;
#      --max-new-tokens is the episode budget over policy and tool tokens) and --eval-without-env
#      (every eval also single-turn: eval/notool_<split>/pass@k next to eval/<split>/pass@k);
#   3. tools/compare_runs.py over the seeds: before/after GRPO, with and without the tool.
# --smoke: SFT 40 steps and GRPO 3 steps per seed (grpo_moe.sh --smoke), for checking the wiring.
# Environment: RUN, SEEDS (default "1 2"), TOOL_FRAC (0.5), PYTHON, NPROC, NUM_ENGINES and the
# rest of grpo_moe.sh's variables.
set -euo pipefail

ROOT="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[ -f "$ROOT/megatron_rl/__init__.py" ] || {
  echo "grpo_agentic.sh: $ROOT is not the megatron_rl repo; run sbatch from the repo root" >&2; exit 2; }
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
SMOKE=()
if [ "${1:-}" = "--smoke" ]; then SMOKE=(--smoke); shift; fi
RUN="${RUN:-$ROOT/runs/grpo_agentic}"
SEEDS="${SEEDS:-1 2}"
TOOL_FRAC="${TOOL_FRAC:-0.5}"
DATA="$RUN/data"
HF="$RUN/model"
mkdir -p "$RUN"
log() { echo "grpo_agentic.sh: $*"; }

# ---------------------------------------------------------------- 1. model + data (shared by the seeds)
[ -f "$HF/config.json" ] || "$PY" tools/make_tiny_model.py --out "$HF" --seed 0
if [ ! -f "$DATA/rl_train.jsonl" ] || [ ! -f "$DATA/eval_ood_hard.jsonl" ]; then
  "$PY" -m megatron_rl.data.synthetic --out "$DATA" --seed 0 --rl-train-ops 4-5 \
    --edge-ops 4-5 --edge-frac 0.05 --tool-frac "$TOOL_FRAC"
fi

# ---------------------------------------------------------------- 2. SFT -> multi-turn GRPO per seed
AGENT=(--env calc --max-turns 8 --max-tokens-per-turn 96 --max-new-tokens 408 --eval-without-env)
RUNS=()
for S in $SEEDS; do
  log "seed $S: SFT with tool traces -> GRPO with the calculator ($RUN/seed$S)"
  RUN="$RUN/seed$S" HF="$HF" EVAL_DIR="$DATA" SEED="$S" SFT_ARGS="--seq-length 512 ${SFT_ARGS:-}" \
    bash "$ROOT/examples/grpo_moe.sh" "${SMOKE[@]}" "${AGENT[@]}" "$@"
  RUNS+=("$RUN/seed$S/grpo")
done

# ---------------------------------------------------------------- 3. the table over seeds
echo "GRPO with the calculator: eval/<split> = multi-turn with the tool, eval/notool_<split> = single-turn"
"$PY" tools/compare_runs.py "${RUNS[@]}"
