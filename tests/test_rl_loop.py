"""Pieces of the GRPO loop that need no model: DAPO's soft overlong punishment (vs its piecewise
definition), the rollout producer's dynamic sampling and one-step-off buffer (against a scripted
fake engine), reward-function failures, and the CLI's refusal of bad flag combinations and rows."""

import dataclasses
import math

import pytest
import torch

from megatron_rl.losses.shaping import overlong_penalty, shaped_group_advantages
from megatron_rl.rollout.client import GenerateResult, SamplingParams
from megatron_rl.rollout.rewards import RewardFailureError
from megatron_rl.train.rl_batch import PromptStream
from megatron_rl.train.rl_rollout import RolloutProducer, RolloutService, group_has_variance


def dapo_eq13(y: int, l_max: int, l_cache: int) -> float:
    """DAPO eq. 13, written case by case."""
    if y <= l_max - l_cache:
        return 0.0
    if y <= l_max:
        return ((l_max - l_cache) - y) / l_cache
    return -1.0


def test_overlong_penalty_matches_dapo_eq13():
    lengths = list(range(0, 70))
    pen, m = overlong_penalty(torch.tensor(lengths), 64, 16, factor=0.5)
    ref = torch.tensor([0.5 * dapo_eq13(y, 64, 16) for y in lengths], dtype=torch.float64)
    assert torch.allclose(pen, ref, atol=1e-12, rtol=0)
    assert m["rollout/overlong_penalized_frac"] == pytest.approx(sum(y > 48 for y in lengths) / len(lengths))
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(torch.tensor([1]), 64, 64)


def test_shaped_group_advantages_by_hand():
    """rl_step's rewards -> advantages: DAPO's penalty added per sample, then GRPO over each
    group's finite rewards (Bessel std, eps 1e-6); a NaN reward and a group left with one finite
    reward carry no loss. Reference: per-group loops."""
    nan = float("nan")
    rewards = [[1.0, 0.0, nan, 1.0], [nan, nan, 0.0, nan], [0.0, 0.0, 0.0, 1.0]]
    lengths = [[10, 60, 5, 70], [1, 2, 3, 4], [55, 20, 64, 1]]
    adv, carries, m = shaped_group_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(lengths),
                                              "grpo", max_len=64, overlong_buffer=16, overlong_factor=0.5)
    for g in range(3):
        r = [rewards[g][i] + 0.5 * dapo_eq13(lengths[g][i], 64, 16) for i in range(4)]
        ok = [i for i in range(4) if math.isfinite(r[i])]
        if len(ok) < 2:
            ok = []
        mean = sum(r[i] for i in ok) / max(len(ok), 1)
        std = math.sqrt(sum((r[i] - mean) ** 2 for i in ok) / max(len(ok) - 1, 1))
        for i in range(4):
            assert bool(carries[g, i]) == (i in ok)
            want = (r[i] - mean) / (std + 1e-6) if i in ok else 0.0
            assert float(adv[g, i]) == pytest.approx(want, abs=1e-12), (g, i)
    assert m["reward/failure_rate"] == 4 / 12 and m["reward/no_loss_groups"] == 1.0
    assert m["rollout/overlong_penalized_frac"] == pytest.approx(4 / 12)  # 60, 70, 55, 64 > 64 - 16


@pytest.fixture()
def world1(tmp_path):
    """A gloo process group of one rank in this process (broadcast_from_driver needs one)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class ScriptedService(RolloutService):
    """RolloutService whose engine is a script: prompt text (the label) -> the n rewards. The
    verifier is real (RewardRunner); responses are the reward as text."""

    def __init__(self, verifier=None, **kw):
        super().__init__(engine_urls=["http://unused"], router_url=None, tokenizer=_Tok(),
                         verifier=verifier or (lambda response, label: float(response)), **kw)
        self.calls = []

    def _generate(self, prompts, n, sampling, tag):
        self.calls.append((tag, sampling.seed, [p[0] for p in prompts]))
        out = []
        for p in prompts:
            rewards = SCRIPT[p[0]]
            out.append([GenerateResult(rid=f"{tag}-{p[0]}-{j}", prompt_ids=list(p), output_ids=[int(r)], text=str(r),
                                       logprobs=[-0.5], finish_reason="stop", weight_version="0")
                        for j, r in enumerate(rewards)])
        return out


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return str(ids[0])


# prompt id -> the 4 rewards its group gets: ids 0-9 all fail, 10-19 mixed, 20-29 all pass
SCRIPT = {i: ([0, 0, 0, 0] if i < 10 else [0, 1, 0, 1] if i < 20 else [1, 1, 1, 1]) for i in range(30)}


def _producer(svc, ids, **kw):
    rows = [{"prompt": f"p{i}", "label": str(i), "id": i} for i in ids]
    stream = PromptStream(rows, seed=3)
    sampling = lambda step: SamplingParams(max_new_tokens=4, seed=100 * step)  # noqa: E731
    return RolloutProducer(svc, stream, lambda row: [row["id"]], prompts_per_step=4, n=4,
                           sampling=sampling, **kw)


def test_dynamic_sampling_keeps_only_groups_with_reward_variance(world1):
    svc = ScriptedService()
    prod = _producer(svc, list(range(5)) + list(range(10, 15)) + list(range(20, 25)),
                     dynamic_sampling=True, max_rounds=10)
    batch = prod.get(1, last_step=5)
    groups = [batch.samples[i * 4:(i + 1) * 4] for i in range(4)]
    assert len(batch.rows) == 4 and all(group_has_variance(g) for g in groups)
    assert all(10 <= r["id"] < 20 for r in batch.rows)
    m = batch.metrics
    assert m["rollout/prompts_generated"] == sum(len(c[2]) for c in svc.calls)
    assert m["rollout/zero_std_frac"] == pytest.approx((m["rollout/prompts_generated"] - 4)
                                                       / m["rollout/prompts_generated"])
    # every round draws a fresh seed range (no duplicated samples across rounds)
    assert len({c[1] for c in svc.calls}) == len(svc.calls) == m["rollout/dynamic_rounds"]


def test_dynamic_sampling_fills_with_zero_variance_groups_after_max_rounds(world1):
    svc = ScriptedService()
    prod = _producer(svc, list(range(8)) + [10], dynamic_sampling=True, max_rounds=2)
    batch = prod.get(1, last_step=5)
    assert len(batch.samples) == 16 and batch.metrics["rollout/dynamic_rounds"] == 2
    with_variance = sum(group_has_variance(batch.samples[i * 4:(i + 1) * 4]) for i in range(4))
    assert with_variance == 1 == 4 - batch.metrics["rollout/filled_zero_std_groups"]


def test_one_step_off_buffer_survives_a_checkpoint(world1):
    svc = ScriptedService()
    prod = _producer(svc, list(range(10, 20)), async_one_step_off=True)
    b1 = prod.get(1, last_step=3)
    prod.drain()
    assert [c[0] for c in svc.calls] == ["step1-r0", "step2-r0"]  # step 2 started during step 1
    state = prod.state_dict()
    assert state["buffer"]["step"] == 2
    prod.close()
    # a fresh producer (the resubmitted job) restores cursor + buffer and serves step 2 unchanged
    svc2 = ScriptedService()
    prod2 = _producer(svc2, list(range(10, 20)), async_one_step_off=True)
    prod2.load_state_dict(state)
    b2 = prod2.get(2, last_step=3)
    prod2.drain()
    prod_ref = _producer(ScriptedService(), list(range(10, 20)), async_one_step_off=True)
    prod_ref.get(1, last_step=3)
    b2_ref = prod_ref.get(2, last_step=3)  # the uninterrupted producer's step 2
    assert [dataclasses.asdict(s) for s in b2.samples] == [dataclasses.asdict(s) for s in b2_ref.samples]
    assert [c[0] for c in svc2.calls] == ["step3-r0"]  # step 2 was not regenerated
    assert b1.rows != b2.rows
    prod2.close()
    prod_ref.close()


def test_reward_function_that_raises_stops_the_step(world1):
    def bad(response, label):
        raise ZeroDivisionError("verifier bug")

    prod = _producer(ScriptedService(verifier=bad), list(range(10, 20)))
    with pytest.raises(RewardFailureError, match="verifier bug"):
        prod.get(1, last_step=1)


BASE = ["--hf", "x", "--train-data", "t.jsonl", "--out", "o", "--rollout-batch-size", "2",
        "--n-samples-per-prompt", "4"]


@pytest.mark.parametrize("flags, msg", [
    (["--kl-coef", "0.1"], "--kl-coef > 0 needs a reference model: pass --ref-hf"),
    (["--ref-hf", "r"], "--ref-hf given but --kl-coef is 0"),
    (["--icepop-low", "0.5"], "--icepop-low and --icepop-high go together"),
    (["--icepop-low", "1.5", "--icepop-high", "2"], "IcePop needs 0 < --icepop-low <= 1"),
    (["--lbl-mode", "global"], "--lbl-mode global with --lbl-alpha 0.0"),
    (["--lbl-alpha", "0.01"], "--lbl-mode off with --lbl-alpha 0.01"),
    (["--overlong-buffer", "64", "--max-new-tokens", "64"], "--overlong-buffer must be in [0, --max-new-tokens)"),
    (["--dynamic-sampling", "--n-samples-per-prompt", "1"], "--dynamic-sampling needs --n-samples-per-prompt >= 2"),
    (["--hpt-gamma", "1.0"], "--hpt-gamma must be in [0, 1)"),
    (["--engine-args", "--dtype 'bfloat16"], "--engine-args"),
    (["--lbl-mode", "micro", "--lbl-alpha", "0.01", "--moe-aux-loss-coeff", "0.01"], "two load-balancing losses"),
    (["--lr", "5e-5", "--min-lr", "1e-4"], "--min-lr 0.0001 must be in [0, --lr 5e-05]"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--eval-temperature", "0"], "--eval-temperature must be > 0"),
])
def test_bad_flag_combinations(flags, msg, capsys, tmp_path):
    from megatron_rl.train.grpo import parse_args

    with pytest.raises(SystemExit):
        parse_args([*BASE, *flags])
    assert msg in capsys.readouterr().err


def test_min_lr_defaults_to_a_tenth_of_lr():
    """A low --lr alone must not trip Megatron's bare `max_lr >= min_lr` assert (it did with a
    fixed 1e-4 floor); the floor follows --lr unless given."""
    from megatron_rl.train.grpo import parse_args

    args, _ = parse_args([*BASE, "--lr", "5e-5"])
    assert args.min_lr == pytest.approx(5e-6)
    args, _ = parse_args([*BASE, "--lr", "5e-5", "--min-lr", "0"])
    assert args.min_lr == 0.0


def test_train_row_without_label_fails_before_any_model_is_built(tmp_path):
    from megatron_rl.data.jsonl import DatasetError
    from megatron_rl.train.grpo import main

    path = tmp_path / "rl.jsonl"
    path.write_text('{"prompt": "a", "label": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(DatasetError, match=rf"{path}:2: .*label"):
        main(["--hf", str(tmp_path / "no_model"), "--train-data", str(path), "--out", str(tmp_path / "o")])


def test_hpt_needs_solutions(tmp_path):
    from megatron_rl.data.jsonl import DatasetError
    from megatron_rl.train.grpo import main

    path = tmp_path / "rl.jsonl"
    path.write_text('{"prompt": "a", "label": "1"}\n')
    with pytest.raises(DatasetError, match=rf"{path}:1: .*solution"):
        main(["--hf", str(tmp_path / "no_model"), "--train-data", str(path), "--out", str(tmp_path / "o"),
              "--hpt-gamma", "0"])


def test_group_has_variance_ignores_failed_verifications():
    from megatron_rl.train.rl_batch import Sample

    def s(r):
        return Sample(prompt_ids=[1], output_ids=[2], rollout_logprobs=[0.0], reward=r, finish_reason="stop",
                      weight_version="0")

    assert not group_has_variance([s(1.0), s(math.nan), s(1.0)])
    assert group_has_variance([s(1.0), s(math.nan), s(0.0)])
