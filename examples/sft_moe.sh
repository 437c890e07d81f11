#!/usr/bin/env bash
#SBATCH --job-name=sft_moe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --output=sft_moe-%j.out
# SFT of a Megatron-Core MoE on the synthetic arithmetic task.
#
#   bash examples/sft_moe.sh [sft flags...]       one machine (NPROC ranks via torchrun)
#   sbatch examples/sft_moe.sh [sft flags...]     Slurm: one rank per task, srun across nodes
#
# With no flags on a CPU box it is the embedded default: make the tiny Qwen3-MoE checkpoint and
# the task data under $RUN, fine-tune, evaluate before/after, print the table. On a GPU cluster
# point HF at a real checkpoint and pass the parallel layout, e.g.
#   HF=/ckpt/Qwen3-30B-A3B TRAIN=/data/train.jsonl sbatch -N 4 --ntasks-per-node=8 --gpus-per-node=8 \
#     examples/sft_moe.sh --device cuda --bf16 --tp 2 --ep 8 --pp 2 --sequence-parallel ...
# Environment: RUN (run dir, default runs/sft_demo), HF, TRAIN, EVAL_DIR, NPROC, PYTHON, SEED.
set -euo pipefail

# Under sbatch the script runs from a copy in slurmd's spool dir, so BASH_SOURCE does not lead
# back to the repo: there the repo is the submit directory (sbatch from the repo root).
ROOT="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[ -f "$ROOT/megatron_rl/__init__.py" ] || {
  echo "sft_moe.sh: $ROOT is not the megatron_rl repo; run sbatch from the repo root" >&2; exit 2; }
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
RUN="${RUN:-$ROOT/runs/sft_demo}"
SEED="${SEED:-0}"
HF="${HF:-$RUN/model}"
DATA="${EVAL_DIR:-$RUN/data}"
TRAIN="${TRAIN:-$DATA/train.jsonl}"
mkdir -p "$RUN"

if [ ! -f "$HF/config.json" ]; then
  "$PY" tools/make_tiny_model.py --out "$HF" --seed "$SEED"
fi
if [ ! -f "$TRAIN" ]; then
  "$PY" -m megatron_rl.data.synthetic --out "$DATA" --seed "$SEED"
fi

ARGS=(--hf "$HF" --train-data "$TRAIN" --out "$RUN/sft" --save-hf "$RUN/sft_hf"
      --eval-data "id=$DATA/eval_id.jsonl" --eval-data "ood_mid=$DATA/eval_ood_mid.jsonl"
      --eval-data "ood_hard=$DATA/eval_ood_hard.jsonl" --eval-samples 200
      --train-steps 600 --seq-length 256 --micro-batch-size 8 --global-batch-size 16
      --lr 3e-3 --min-lr 3e-4 --lr-warmup-steps 20 --eval-interval 300 --save-interval 200
      --seed "$SEED" "$@")

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-2}}"
if [ -n "${SLURM_JOB_ID:-}" ]; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  export MASTER_ADDR MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
  echo "sft_moe.sh: launching with srun (job $SLURM_JOB_ID, ${SLURM_NTASKS:-1} task(s)," \
       "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT)"
  srun --kill-on-bad-exit=1 "$PY" -m megatron_rl.train.sft "${ARGS[@]}"
elif [ "${NPROC:-1}" -gt 1 ]; then
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m megatron_rl.train.sft "${ARGS[@]}"
else
  "$PY" -m megatron_rl.train.sft "${ARGS[@]}"
fi
"$PY" -m megatron_rl.train.report "$RUN/sft/metrics.jsonl"
