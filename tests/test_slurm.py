"""examples/sft_moe.sh submitted through a real (local, one-node) Slurm: ``sbatch`` -> the script's
``srun`` path -> a 4-step SFT with eval and checkpoints. The cluster comes from
tests/slurm_harness.py (../shared/local-slurm's start/stop scripts; apt-installs Slurm on first use).
Skipped only where Slurm cannot be installed (not root / no apt / no network); set
MEGATRON_RL_REQUIRE_SLURM=1 to make that a failure instead."""

import json
import math
import os

import pytest

from slurm_harness import ROOT, LocalSlurm, SlurmUnavailable

SHORT = ["--train-steps", "4", "--eval-samples", "4", "--eval-interval", "0",
         "--save-interval", "2", "--global-batch-size", "4", "--micro-batch-size", "2",
         "--seq-length", "128", "--eval-max-new-tokens", "16"]
SPLITS = ("id", "ood_mid", "ood_hard")


@pytest.fixture(scope="module")
def cluster():
    try:
        c = LocalSlurm.start()
    except SlurmUnavailable as e:
        if os.environ.get("MEGATRON_RL_REQUIRE_SLURM") == "1":
            pytest.fail(f"local Slurm required but unavailable: {e}")
        pytest.skip(f"local Slurm unavailable: {e}")
    try:
        yield c
    finally:  # runs on test failure too: no daemons left behind
        c.stop()
        assert not any(c.daemons_alive().values()), c.daemons_alive()


@pytest.fixture(scope="module")
def job(cluster, tmp_path_factory):
    run = tmp_path_factory.mktemp("slurm_sft")
    cpus = str(min(2, os.cpu_count() or 1))  # the node advertises the real CPU count
    res = cluster.run(ROOT / "examples" / "sft_moe.sh", SHORT,
                      output=run / "logs" / "sft_moe-%j.out",
                      sbatch_opts=[f"--cpus-per-task={cpus}", "--time=00:10:00",
                                   "--job-name=test_sft_moe"],
                      env={"RUN": str(run), "SEED": "0"}, timeout=600)
    return {"res": res, "run": run, "slurmd_log": cluster.slurmd_log()}


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_sbatch_job_completes_via_srun(job):
    res = job["res"]
    assert res.state == "COMPLETED" and res.exit_code == 0, res.tail()
    log = res.text()
    # the SLURM_JOB_ID branch of the script ran, and srun launched step <job>.0 on slurmd
    assert f"sft_moe.sh: launching with srun (job {res.job_id}," in log, res.tail()
    assert f"launch task StepId={res.job_id}.0 " in job["slurmd_log"]
    assert "| split |" in log, res.tail()  # megatron_rl.train.report ran after training


def test_metrics_and_checkpoint(job):
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
    assert (run / "sft_hf" / "config.json").is_file()  # --save-hf export at the last step
