#!/usr/bin/env bash
#SBATCH --job-name=grpo_moe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=02:00:00
#SBATCH --output=grpo_moe-%j.out
# SFT -> GRPO of a Megatron-Core MoE on the synthetic arithmetic task, with an eval table.
#
#   bash examples/grpo_moe.sh [--smoke] [grpo flags...]     one machine (NPROC ranks via torchrun)
#   sbatch examples/grpo_moe.sh [--smoke] [grpo flags...]   Slurm: one rank per task, srun across nodes
#
# With no flags on a CPU box it is the embedded default, every stage under $RUN:
#   1. data: the tiny Qwen3-MoE (tools/make_tiny_model.py) and the task data: SFT train = 1-3
#      operations plus a sparse 5% of 4-5-operation rows (--edge-ops 4-5 --edge-frac 0.05: without
#      that exposure the SFT policy never writes more than 3 steps and GRPO has nothing to
#      reinforce, see README), eval_id / eval_ood_mid (4-5) / eval_ood_hard (6-8), and RL prompts
#      rl_train.jsonl = 4-5 operations (the band just above SFT's competence), none of them an eval
#      or train prompt (megatron_rl.data.synthetic --rl-train-ops 4-5);
#   2. SFT: examples/sft_moe.sh (600 steps) -> $RUN/sft (checkpoints, metrics) + $RUN/sft_hf;
#   3. GRPO (megatron_rl.train.grpo) from $RUN/sft_hf with 2 embedded engines behind sglang-router
#      (started by rank 0) -> $RUN/grpo (checkpoints, metrics.jsonl with the step-0 "before" eval,
#      engine_logs);
#   4. tables: SFT's greedy exact match; pass@1 / pass@k per split before vs after GRPO
#      (megatron_rl.train.report).
# A stage whose output exists is skipped; an interrupted SFT or GRPO resumes from its checkpoints
# in $RUN, so resubmitting the same command continues the run.
# --smoke (first argument): the same pipeline, shortened (SFT 40 steps, GRPO 3 steps, tiny evals).
# Flags after it go to the GRPO stage (last one wins), e.g. --num-steps 50; the stage's settings are
# examples/grpo_demo.yaml (another --config FILE after it overrides it key by key).
#
# GPU cluster (SGLang engines + Transformer Engine), a converted Qwen3-30B-A3B (not runnable here):
#   HF=/ckpt/Qwen3-30B-A3B-sft RL_TRAIN=/data/rl.jsonl EVAL_DIR=/data/eval \
#   ENGINE_KIND=sglang NUM_ENGINES=4 SKIP_SFT=1 \
#   sbatch -N 4 --ntasks-per-node=8 --gpus-per-node=8 examples/grpo_moe.sh \
#     --device cuda --bf16 --tp 2 --ep 8 --pp 2 --sequence-parallel \
#     --rollout-batch-size 64 --n-samples-per-prompt 8 --max-new-tokens 2048 --micro-batch-size 1
# --engine-kind sglang starts `python -m sglang.launch_server` per engine (extra .[sglang]); on
# shared nodes pin the engines' GPUs apart from the trainer's (megatron_rl.rollout.launcher's
# engine_env). HF is then the policy GRPO starts from (SKIP_SFT=1: no SFT stage; otherwise SFT
# flags go in SFT_ARGS, e.g. SFT_ARGS="--device cuda --bf16 --tp 2 --ep 8").
# EVAL_DIR must hold eval_id.jsonl, eval_ood_mid.jsonl, eval_ood_hard.jsonl.
#
# Environment: RUN (run dir, default runs/grpo_demo), HF (base model; default $RUN/model, made
# here), SFT_ARGS (extra SFT flags), SKIP_SFT=1 (GRPO starts from $HF), RL_TRAIN, EVAL_DIR,
# NUM_ENGINES (2), ENGINE_KIND (embedded), NPROC, PYTHON, SEED.
set -euo pipefail

# Under sbatch the script runs from a copy in slurmd's spool dir: the repo is the submit directory.
ROOT="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[ -f "$ROOT/megatron_rl/__init__.py" ] || {
  echo "grpo_moe.sh: $ROOT is not the megatron_rl repo; run sbatch from the repo root" >&2; exit 2; }
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
RUN="${RUN:-$ROOT/runs/grpo_demo}"
SEED="${SEED:-0}"
HF="${HF:-$RUN/model}"
DATA="${EVAL_DIR:-$RUN/data}"
RL_TRAIN="${RL_TRAIN:-$DATA/rl_train.jsonl}"
NUM_ENGINES="${NUM_ENGINES:-2}"
ENGINE_KIND="${ENGINE_KIND:-embedded}"
mkdir -p "$RUN"
log() { echo "grpo_moe.sh: $*"; }

# ---------------------------------------------------------------- 1. model + data
if [ ! -f "$HF/config.json" ]; then
  "$PY" tools/make_tiny_model.py --out "$HF" --seed "$SEED"
fi
if [ ! -f "$RL_TRAIN" ] || [ ! -f "$DATA/eval_ood_hard.jsonl" ]; then
  "$PY" -m megatron_rl.data.synthetic --out "$DATA" --seed "$SEED" --rl-train-ops 4-5 \
    --edge-ops 4-5 --edge-frac 0.05
fi
EVALS=(--eval-data "id=$DATA/eval_id.jsonl" --eval-data "ood_mid=$DATA/eval_ood_mid.jsonl"
       --eval-data "ood_hard=$DATA/eval_ood_hard.jsonl")

# ---------------------------------------------------------------- 2. SFT
if [ "${SKIP_SFT:-0}" = 1 ]; then
  POLICY="$HF"
else
  POLICY="$RUN/sft_hf"
  if [ -f "$POLICY/config.json" ]; then
    log "SFT: $POLICY exists, skipping"
  else
    SFT=()
    [ "$SMOKE" = 1 ] && SFT=(--train-steps 40 --eval-samples 16 --eval-interval 0 --save-interval 20
                             --eval-max-new-tokens 64)
    # shellcheck disable=SC2206  # SFT_ARGS is a flag string on purpose
    log "SFT stage: examples/sft_moe.sh ${SFT[*]} ${SFT_ARGS:-}"
    RUN="$RUN" HF="$HF" EVAL_DIR="$DATA" TRAIN="$DATA/train.jsonl" SEED="$SEED" \
      bash "$ROOT/examples/sft_moe.sh" "${SFT[@]}" ${SFT_ARGS:-}
  fi
fi

# ---------------------------------------------------------------- 3. GRPO
GRPO=(--config "$ROOT/examples/grpo_demo.yaml")  # the stage's settings; flags below override them
[ "$SMOKE" = 1 ] && GRPO+=(--rollout-batch-size 4 --n-samples-per-prompt 4 --max-new-tokens 64
                           --micro-batch-size 8 --num-steps 3 --eval-interval 0 --eval-n-samples 2
                           --eval-max-prompts 8 --save-interval 2)
GRPO+=("$@")

ARGS=(--hf "$POLICY" --train-data "$RL_TRAIN" "${EVALS[@]}" --out "$RUN/grpo"
      --num-engines "$NUM_ENGINES" --engine-kind "$ENGINE_KIND" --seed "$SEED" "${GRPO[@]}")
# rank 0 prints the engines' final weight versions (grpo.main's return value)
ENTRY=(-c 'import json, sys
from megatron_rl.train.grpo import main
r = main(sys.argv[1:])
if r:
    print("grpo_moe.sh: grpo finished at step", r["step"], "engine weight versions",
          json.dumps(r["engine_versions"]), flush=True)' "${ARGS[@]}")

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-2}}"
if [ -n "${SLURM_JOB_ID:-}" ]; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  # a port apart from sft_moe.sh's (job id % 20000 + 20000) in the same job
  export MASTER_ADDR MASTER_PORT="${MASTER_PORT:-$((40000 + SLURM_JOB_ID % 20000))}"
  log "launching GRPO with srun (job $SLURM_JOB_ID, ${SLURM_NTASKS:-1} task(s)," \
      "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT)"
  srun --kill-on-bad-exit=1 "$PY" "${ENTRY[@]}"
elif [ "${NPROC:-1}" -gt 1 ]; then
  # torchrun runs a script, not -c: hand it the same program as a file
  entry_py="$RUN/grpo_entry.py"
  printf '%s\n' "${ENTRY[1]}" > "$entry_py"
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$entry_py" "${ARGS[@]}"
else
  "$PY" "${ENTRY[@]}"
fi

# ---------------------------------------------------------------- 4. tables
if [ -f "$RUN/sft/metrics.jsonl" ]; then
  echo "SFT (greedy exact match):"
  "$PY" -m megatron_rl.train.report "$RUN/sft/metrics.jsonl"
fi
echo "GRPO (pass@k sampled at the GRPO temperature; step 0 = $POLICY):"
"$PY" -m megatron_rl.train.report "$RUN/grpo/metrics.jsonl"
