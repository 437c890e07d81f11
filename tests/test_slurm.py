"""examples/grpo_moe.sh submitted through a real (local, one-node) Slurm: ``sbatch`` -> the
script's stages -> examples/sft_moe.sh's ``srun`` (a 4-step SFT with eval and checkpoints) -> a
2-step GRPO (eval before and after) launched with ``srun`` (2 embedded engines + sglang-router started by
rank 0) -> the eval table. One job (--smoke with even smaller knobs, ~2 min), one cluster.
The cluster comes from tests/slurm_harness.py (../shared/local-slurm's start/stop scripts;
apt-installs Slurm on first use). Skipped only where Slurm cannot be installed (not root / no apt /
no network); set MEGATRON_RL_REQUIRE_SLURM=1 to make that a failure instead."""

import json
import math
import os
import re

import pytest

from slurm_harness import ROOT, LocalSlurm, SlurmUnavailable

# --seq-length 192: the SFT rows reach 161 tokens with the 4-5-op exposure rows (grpo_moe.sh data)
SFT_SHORT = ("--train-steps 4 --eval-samples 4 --eval-interval 0 --save-interval 2 "
             "--global-batch-size 4 --micro-batch-size 2 --seq-length 192 --eval-max-new-tokens 16")
GRPO_SHORT = ["--smoke", "--num-steps", "2", "--rollout-batch-size", "2", "--n-samples-per-prompt", "4",
              "--max-new-tokens", "16", "--micro-batch-size", "4", "--eval-n-samples", "2",
              "--eval-max-prompts", "2", "--save-interval", "1"]
SPLITS = ("id", "ood_mid", "ood_hard")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    try:
        cluster = LocalSlurm.start()
    except SlurmUnavailable as e:
        if os.environ.get("MEGATRON_RL_REQUIRE_SLURM") == "1":
            pytest.fail(f"local Slurm required but unavailable: {e}")
        pytest.skip(f"local Slurm unavailable: {e}")
    try:
        run = tmp_path_factory.mktemp("slurm_grpo")
        cpus = str(min(2, os.cpu_count() or 1))  # the node advertises the real CPU count
        res = cluster.run(ROOT / "examples" / "grpo_moe.sh", GRPO_SHORT,
                          output=run / "logs" / "grpo_moe-%j.out",
                          sbatch_opts=[f"--cpus-per-task={cpus}", "--time=00:10:00",
                                       "--job-name=test_grpo_moe"],
                          env={"RUN": str(run), "SEED": "0", "SFT_ARGS": SFT_SHORT}, timeout=480)
        yield {"res": res, "run": run, "slurmd_log": cluster.slurmd_log()}
    finally:  # runs on test failure too: no daemons left behind
        cluster.stop()
        assert not any(cluster.daemons_alive().values()), cluster.daemons_alive()


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_sbatch_job_completes_via_srun(job):
    res = job["res"]
    assert res.state == "COMPLETED" and res.exit_code == 0, res.tail()
    log = res.text()
    # the SLURM_JOB_ID branches ran: SFT as step <job>.0, GRPO as step <job>.1, both on slurmd
    assert f"sft_moe.sh: launching with srun (job {res.job_id}," in log, res.tail()
    assert f"grpo_moe.sh: launching GRPO with srun (job {res.job_id}," in log, res.tail()
    for step in (0, 1):
        assert f"launch task StepId={res.job_id}.{step} " in job["slurmd_log"], step
    # megatron_rl.train.report ran after both stages
    assert "| split | accuracy @ step 0 | accuracy @ step 4 | n |" in log, res.tail()
    assert "| split | pass@1 @ step 0 | pass@1 @ step 2 | pass@2 @ step 0 | pass@2 @ step 2 |" in log, \
        res.tail()
    # every engine ended at the last policy version (grpo.main's check_versions on rank 0)
    m = re.search(r"grpo finished at step (\d+) engine weight versions (\{.*\})", log)
    assert m and m.group(1) == "2", res.tail()
    versions = json.loads(m.group(2))
    assert len(versions) == 2 and set(versions.values()) == {"2"}, versions


def test_sft_stage_outputs(job):
    res, run = job["res"], job["run"]
    assert res.exit_code == 0, res.tail()
    recs = _records(run / "sft" / "metrics.jsonl")
    train = [r for r in recs if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(math.isfinite(r["train/loss"]) for r in train), train
    evals = [r for r in recs if "eval/id/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4]
    for s in SPLITS:
        assert all(r[f"eval/{s}/n"] == 4 for r in evals), s
    ckpts = run / "sft" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (ckpts / "iter_0000004" / "metadata.json").is_file()
    assert (run / "sft_hf" / "config.json").is_file()  # --save-hf export: GRPO's starting policy
    # RL prompts are the 4-5 op band and share no prompt with any eval split
    rl = _records(run / "data" / "rl_train.jsonl")
    assert {r["op"] for r in rl} == {4, 5}
    evals_p = {r["prompt"] for s in SPLITS for r in _records(run / "data" / f"eval_{s}.jsonl")}
    assert not evals_p & {r["prompt"] for r in rl}


def test_grpo_stage_outputs(job):
    res, run = job["res"], job["run"]
    assert res.exit_code == 0, res.tail()
    recs = _records(run / "grpo" / "metrics.jsonl")
    steps = [r for r in recs if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(r["rollout/reward_mean"]) and 0 <= r["rollout/reward_mean"] <= 1, r
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]), r
        assert r["train/policy_version_lag"] == 0, r  # samples came from the synced version
    last = recs[-1]
    assert last["step"] == 2 and all(f"eval/{s}/pass@1" in last for s in SPLITS), last
    base = recs[0]  # the "before" row, logged before the first RL step
    assert base["step"] == 0 and all(f"eval/{s}/pass@2" in base for s in SPLITS), base
    ckpts = run / "grpo" / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (run / "grpo" / "engine_logs").is_dir()
