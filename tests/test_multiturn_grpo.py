"""Multi-turn GRPO end to end on the tiny model with one embedded engine (fp32): the environment
of tests/_multiturn_envs.py answers every turn, so each sample holds several policy turns and
environment tokens between them.

Independent reference: the engine (a separate HF-transformers implementation) for the logprobs of
the policy tokens; with the trainer's sequence equal to the engine's per turn and the loss mask
exactly on the policy tokens, Megatron's fp32 logprobs equal the engine's (< 1e-5), and the PPO
ratio is 1 before the first update. A mask that kept an environment token would compare the
trainer's logprob with the 0 stored there (|diff| of nats); a sequence that drifted from the
engine's would change the context of every later token. Resume: an uninterrupted run.
"""

import json
import math

import pytest

from megatron_rl.testing import run_distributed

from _grpo_runs import run_grpo


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from megatron_rl.data.jsonl import write_jsonl_atomic
    from megatron_rl.data.synthetic import generate

    d = tmp_path_factory.mktemp("mtdata")
    write_jsonl_atomic(d / "train.jsonl", generate("id", 8, seed=31))
    write_jsonl_atomic(d / "eval.jsonl", generate("id", 2, seed=32))
    return d


def _argv(hf, d, out, *extra):
    return ["--hf", hf, "--train-data", str(d / "train.jsonl"), "--eval-data", f"id={d / 'eval.jsonl'}",
            "--out", str(out), "--num-engines", "1", "--rollout-batch-size", "2",
            "--n-samples-per-prompt", "4", "--max-new-tokens", "64", "--temperature", "1.0",
            "--num-steps", "2", "--mini-batches-per-rollout", "1", "--micro-batch-size", "4",
            "--lr", "1e-3", "--lr-warmup-steps", "0", "--eps-low", "0.2", "--eps-high", "0.28",
            "--tis-cap", "2.0", "--eval-n-samples", "1", "--eval-max-prompts", "1", "--seed", "7",
            "--env", "_multiturn_envs:probe_env", "--max-turns", "3", "--max-tokens-per-turn", "5", *extra]


def _records(out):
    return {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl"))}


def test_multiturn_grpo_r3_packed_matches_the_engine(tiny_hf_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    run_distributed(run_grpo, 1, _argv(tiny_hf_dir, data_dir, out, "--routing-replay", "r3",
                                       "--pack-rollouts", "--dynamic-sampling"))
    recs = _records(out)
    for step in (1, 2):
        r = recs[step]
        print(f"\nstep {step}: " + " ".join(f"{k}={v}" for k, v in sorted(r.items())
                                             if k.startswith(("rollout/", "mismatch/", "train/"))))
        assert r["rollout/turns_mean"] == 3 and r["rollout/env/answer_count"] == 8  # every episode
        assert r["rollout/env_token_frac"] > 0.1
        assert r["mismatch/logprob_abs_diff"] < 1e-5 and abs(r["mismatch/k3_kl"]) < 1e-8
        assert r["train/ratio_max_abs_dev_first_minibatch"] < 1e-5
        assert math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0
        assert r["rollout/response_len_max"] <= 64


def test_multiturn_async_resume_after_kill_matches_uninterrupted_run(tiny_hf_dir, data_dir, tmp_path):
    """One-step-off with multi-turn samples, killed after step 3 (checkpoint at 2 holds the
    in-flight step-3 batch of multi-turn samples), resumed: steps 3-4 equal the straight run's."""
    def argv(out, *extra):
        a = _argv(tiny_hf_dir, data_dir, out, "--async-one-step-off", "--save-interval", "2", *extra)
        a[a.index("--num-steps") + 1] = "4"
        return a

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    run_distributed(run_grpo, 1, argv(straight))
    run_distributed(run_grpo, 1, argv(cut, "--stop-after-steps", "3"))
    assert max(_records(cut)) == 3 and not (cut / "checkpoints" / "iter_0000003").exists()
    run_distributed(run_grpo, 1, argv(cut))
    a, b = _records(straight), _records(cut)
    assert sorted(b) == [0, 1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert a[step]["rollout/turns_mean"] > 1
        for key in ("rollout/reward_mean", "rollout/response_len_mean", "rollout/env_token_frac",
                    "train/loss", "train/grad_norm", "mismatch/logprob_abs_diff", "rollout/weight_version_min"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
