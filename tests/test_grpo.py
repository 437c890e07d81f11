"""GRPO loop end to end on the tiny model: one world-1 launch, 2 embedded engines + router started
by the code, 2 RL steps fully on-policy (k = 1), temperature 1, fp32.

Independent references: the engines (a separate HF-transformers implementation) for the
"perfect baseline" (engine fp32 logprobs == Megatron fp32 logprobs), and the definition of the
PPO ratio (exactly 1 before the first optimizer step of an RL step, since old_logprobs are
computed from the same weights), plus the engines' own /get_server_info weight_version.
"""

import json
import math

import pytest

from megatron_rl.testing import run_distributed

from _grpo_runs import run_grpo

KEYS = ["rollout/reward_mean", "rollout/pass@1", "rollout/response_len_mean", "rollout/response_len_max",
        "rollout/truncation_rate", "train/loss", "train/clip_frac", "train/grad_norm",
        "mismatch/logprob_abs_diff", "mismatch/k3_kl", "mismatch/masked_frac", "train/policy_version_lag",
        "train/ratio_max_abs_dev_first_minibatch", "perf/step_time_s", "perf/rollout_time_s",
        "perf/reward_time_s", "perf/logprob_time_s", "perf/train_time_s", "perf/sync_time_s",
        "perf/tokens_per_s", "moe/max_violation", "moe/layer0/load_entropy", "mismatch/tis_clip_frac"]


def _argv(hf, d, out, *extra):
    return ["--hf", hf, "--train-data", str(d / "train.jsonl"), "--eval-data", f"id={d / 'eval.jsonl'}",
            "--out", str(out), "--num-engines", "2", "--rollout-batch-size", "2",
            "--n-samples-per-prompt", "4", "--max-new-tokens", "16", "--temperature", "1.0",
            "--num-steps", "2", "--mini-batches-per-rollout", "1", "--micro-batch-size", "4",
            "--lr", "1e-3", "--lr-warmup-steps", "0", "--advantage", "grpo", "--eps-low", "0.2",
            "--eps-high", "0.28", "--tis-cap", "2.0", "--eval-n-samples", "2", "--eval-max-prompts", "2",
            "--seed", "5", *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from megatron_rl.data.jsonl import write_jsonl_atomic
    from megatron_rl.data.synthetic import generate

    d = tmp_path_factory.mktemp("grpodata")
    write_jsonl_atomic(d / "train.jsonl", generate("id", 8, seed=21))
    write_jsonl_atomic(d / "eval.jsonl", generate("id", 4, seed=22))
    return d


def test_grpo_two_steps(tiny_hf_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    (res,) = run_distributed(run_grpo, 1, _argv(tiny_hf_dir, data_dir, out))
    recs = {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl"))}
    for step in (1, 2):
        r = recs[step]
        print(f"\nstep {step}: " + " ".join(f"{k}={r[k]}" for k in KEYS if k in r))
        assert all(r.get(k) is not None for k in KEYS), [k for k in KEYS if r.get(k) is None]
        # (a) perfect baseline: ratio == 1 before any update, engine fp32 == Megatron fp32
        assert r["train/ratio_max_abs_dev_first_minibatch"] < 1e-5
        assert r["mismatch/logprob_abs_diff"] < 1e-5 and abs(r["mismatch/k3_kl"]) < 1e-8
        assert r["mismatch/masked_frac"] == 0.0 and r["train/policy_version_lag"] == 0
        assert math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0
        assert 0 <= r["rollout/reward_mean"] <= 1 and r["rollout/response_len_max"] <= 16
    for step in (0, 2):  # before the first update, and at the end
        assert "eval/id/pass@1" in recs[step] and "eval/id/pass@2" in recs[step]
    # (b) engines serve the last pushed policy version
    assert res["step"] == 2 and set(res["engine_versions"].values()) == {"2"}
    assert len(res["engine_versions"]) == 2
    assert (out / "checkpoints" / "iter_0000002").is_dir()
    # resume: a longer run in the same dir continues from step 2; the startup sync gives the
    # engines the *trained* weights (else the mismatch would be that of 2 updates, >> 1e-5)
    argv = _argv(tiny_hf_dir, data_dir, out, "--override-opt_param-scheduler")  # 3-step cosine, not 2
    argv[argv.index("--num-steps") + 1] = "3"
    (res,) = run_distributed(run_grpo, 1, argv)
    recs = {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl"))}
    print(f"\nresumed step 3: mismatch={recs[3]['mismatch/logprob_abs_diff']}")
    assert sorted(recs) == [0, 1, 2, 3] and res["step"] == 3  # no second step-0 eval on resume
    assert recs[3]["mismatch/logprob_abs_diff"] < 1e-5
    assert set(res["engine_versions"].values()) == {"3"}


def test_perfect_baseline_at_a_rollout_temperature(tiny_hf_dir, data_dir, tmp_path):
    """At temperature 0.7 the engines sample from and report logprobs of softmax(logits / 0.7)
    (SGLang's default); the trainer divides its logits by the same T, so the on-policy ratio is
    still 1 and the engine/trainer mismatch ~0 (untempered trainer logprobs differ by ~0.1 nats)."""
    out = tmp_path / "run"
    argv = _argv(tiny_hf_dir, data_dir, out)
    argv[argv.index("--temperature") + 1] = "0.7"
    argv[argv.index("--num-steps") + 1] = "1"
    run_distributed(run_grpo, 1, argv)
    r = {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl"))}[1]
    assert r["train/ratio_max_abs_dev_first_minibatch"] < 1e-5
    assert r["mismatch/logprob_abs_diff"] < 1e-5 and abs(r["mismatch/k3_kl"]) < 1e-8


@pytest.mark.parametrize("flags, msg", [
    (["--mini-batches-per-rollout", "0"], "--mini-batches-per-rollout must be >= 1"),
    (["--mini-batches-per-rollout", "3"], "not divisible by --mini-batches-per-rollout"),
    (["--tis-cap", "0"], "--tis-cap must be > 0"),
])
def test_bad_flags(flags, msg, capsys, tmp_path):
    from megatron_rl.train.grpo import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--hf", "x", "--train-data", "t.jsonl", "--out", str(tmp_path),
                    "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", *flags])
    assert msg in capsys.readouterr().err


def _records(out):
    return {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl"))}


def test_async_resume_after_kill_matches_uninterrupted_run(tiny_hf_dir, data_dir, tmp_path):
    """One-step-off mode, killed after step 3 (checkpoint at 2, which holds the in-flight step-3
    rollout), resubmitted: steps 3-4 reproduce the uninterrupted run's metrics."""
    def argv(out, *extra):
        a = _argv(tiny_hf_dir, data_dir, out, "--async-one-step-off", "--save-interval", "2", *extra)
        a[a.index("--num-steps") + 1] = "4"
        a[a.index("--num-engines") + 1] = "1"
        return a

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    run_distributed(run_grpo, 1, argv(straight))
    run_distributed(run_grpo, 1, argv(cut, "--stop-after-steps", "3"))
    assert max(_records(cut)) == 3 and not (cut / "checkpoints" / "iter_0000003").exists()
    run_distributed(run_grpo, 1, argv(cut))
    a, b = _records(straight), _records(cut)
    assert sorted(b) == [0, 1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        lag = a[step]["train/policy_version_lag"]
        print(f"\nstep {step}: lag={lag} loss {a[step]['train/loss']} vs {b[step]['train/loss']}, "
              f"mismatch {a[step]['mismatch/logprob_abs_diff']:.3e}")
        assert lag == (0 if step == 1 else 1)  # one step off after the first batch
        for key in ("rollout/reward_mean", "rollout/response_len_mean", "train/loss", "train/grad_norm",
                    "mismatch/logprob_abs_diff", "rollout/weight_version_min"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    # stale samples: the engine's mu is one version behind pi_old from step 2 on
    assert a[2]["mismatch/logprob_abs_diff"] > 1e-4 > a[1]["mismatch/logprob_abs_diff"]


def test_grpo_every_option_on_a_bf16_engine(tiny_hf_dir, data_dir, tmp_path):
    """All loop options at once on 2 steps: KL to a reference (= the starting policy), entropy
    bonus, dynamic sampling, soft overlong penalty, IcePop, HPT, packed rows, global LBL, R3 with
    a bf16 engine and TIS. Independent references: KL(pi || pi_ref) is exactly 0 before the first
    update (the reference is the initial policy) and > 0 after; the bf16 engine's logprobs differ
    from the fp32 trainer's (the fp32 run above is < 1e-5) so TIS weights move off 1."""
    out = tmp_path / "run"
    argv = _argv(tiny_hf_dir, data_dir, out, "--kl-coef", "0.05", "--ref-hf", tiny_hf_dir, "--entropy-coef", "0.01",
                 "--dynamic-sampling", "--dynamic-sampling-max-rounds", "2", "--overlong-buffer", "4",
                 "--icepop-low", "0.5", "--icepop-high", "2.0", "--hpt-gamma", "0.0", "--pack-rollouts",
                 "--lbl-mode", "global", "--lbl-alpha", "0.01", "--routing-replay", "r3",
                 "--engine-args", "--dtype bfloat16", "--num-engines", "1", "--eval-max-prompts", "1")
    (res,) = run_distributed(run_grpo, 1, argv)
    recs = _records(out)
    for step in (1, 2):
        r = recs[step]
        print(f"\nstep {step}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(r.items())
                                             if k.split("/")[0] in ("train", "mismatch", "moe", "hpt", "rollout")
                                             and "layer" not in k))
        assert r["mismatch/logprob_abs_diff"] > 1e-4 and r["mismatch/is_weight_abs_dev"] > 0
        assert r["train/entropy"] > 0 and r["moe/max_violation"] >= 1.0
        assert 0 <= r["hpt/sft_prompt_frac"] <= 1 and r["rollout/prompts_generated"] >= 2
        assert r["rollout/overlong_penalty_mean"] <= 0
    assert abs(recs[1]["train/kl"]) < 1e-7 < recs[2]["train/kl"]
    assert res["step"] == 2 and set(res["engine_versions"].values()) == {"2"}


def test_routing_flip_rate_is_zero_against_an_fp32_engine_with_r2(tiny_hf_dir, data_dir, tmp_path):
    """The engine (HF transformers, fp32) and Megatron (fp32) route every loss token to the same
    top-k set: flip rate 0 on every layer, both steps; R2 replays the recorded routes over k = 2
    mini-batches."""
    out = tmp_path / "run"
    argv = _argv(tiny_hf_dir, data_dir, out, "--routing-flip-rate", "--routing-replay", "r2",
                 "--num-engines", "1", "--eval-max-prompts", "1")
    argv[argv.index("--mini-batches-per-rollout") + 1] = "2"
    run_distributed(run_grpo, 1, argv)
    recs = _records(out)
    for step in (1, 2):
        r = recs[step]
        flips = {k: v for k, v in r.items() if k.endswith("routing_flip_rate")}
        print(f"\nstep {step}: {flips} lag={r['train/policy_version_lag']}")
        n_layers = json.load(open(f"{tiny_hf_dir}/config.json"))["num_hidden_layers"]  # all MoE
        assert len(flips) == n_layers + 1 and set(flips.values()) == {0.0}  # per layer + the mean
        assert r["train/policy_version_lag"] == 0.5 and r["mismatch/logprob_abs_diff"] < 1e-5


def test_grpo_learns_a_reward_it_can_reach(tiny_hf_dir, data_dir, tmp_path):
    """End-to-end learning signal: with the dense reward "fraction of digit characters" 12 fully
    on-policy GRPO steps from the untrained tiny model raise the rollout reward (the reference is
    the run's own first steps, same seeds)."""
    from _grpo_runs import run_grpo_digits

    out = tmp_path / "run"
    argv = _argv(tiny_hf_dir, data_dir, out, "--num-engines", "1", "--eval-max-prompts", "1")
    for flag, value in (("--num-steps", "12"), ("--lr", "3e-3"), ("--rollout-batch-size", "4")):
        argv[argv.index(flag) + 1] = value
    run_distributed(run_grpo_digits, 1, argv)
    recs = _records(out)
    r = [recs[s]["rollout/reward_mean"] for s in range(1, 13)]
    print("\nreward per step:", [round(x, 3) for x in r])
    assert sum(r[-3:]) / 3 > 1.5 * sum(r[:3]) / 3
