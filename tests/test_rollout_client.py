"""SGLang client, group rollout, rewards and launcher against fake SGLang servers (tests/_fake_sglang.py).

Expected tokens/logprobs/routes come from the fake server's toy formulas (an independent reference:
the client never computes them). Fast: no model, engines are tiny aiohttp processes.
"""

import asyncio
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _fake_sglang import LAYERS, TOP_K, toy_logprob, toy_routed_experts, toy_token
from megatron_rl.rollout.client import (EngineRequestError, EngineResponseError, SamplingParams,
                                        SGLangClient, parse_generate_response)
from megatron_rl.rollout.launcher import EngineLauncher, EngineLaunchError, LaunchConfig, kill_engine
from megatron_rl.rollout.rewards import (RewardFailureError, RewardRunner, math_verifier, score_group,
                                         synthetic_verifier)
from megatron_rl.rollout.rollout import generate_groups, rollout_metrics

FAKE = str(Path(__file__).with_name("_fake_sglang.py"))


def fake_launcher(n: int, *args: str, router: bool = False) -> EngineLauncher:
    cfg = LaunchConfig(model_path="unused", num_engines=n, engine_cmd=(sys.executable, FAKE, *args),
                       router=router, health_timeout_s=30, stop_timeout_s=5)
    return EngineLauncher(cfg)


@pytest.fixture(scope="module")
def engines():
    with fake_launcher(2, "--token-delay-s", "0.002") as launcher:
        yield launcher


def run(coro):
    return asyncio.run(coro)


async def _with_client(urls, fn, **kw):
    async with SGLangClient(urls, **kw) as c:
        return await fn(c)


def test_generate_matches_reference_tokens_logprobs_routes(engines):
    prompt, sp = [5, 9, 11], SamplingParams(max_new_tokens=6, seed=3)
    res = run(_with_client(engines.engine_urls, lambda c: c.generate(
        prompt, sp, return_logprob=True, return_routed_experts=True, rid="r0"),
        routed_experts_layout=(LAYERS, TOP_K)))
    expected = [toy_token(prompt, 3, 0, t) for t in range(6)]
    assert res.output_ids == expected and res.rid == "r0" and res.prompt_ids == prompt
    np.testing.assert_allclose(res.logprobs, [toy_logprob(t) for t in expected])
    assert res.finish_reason == "length" and res.weight_version == "default"
    assert res.routed_experts.dtype == np.int32 and res.routed_experts.shape == (3 + 6 - 1, LAYERS, TOP_K)
    np.testing.assert_array_equal(res.routed_experts, toy_routed_experts(8))


def test_malformed_response_raises_naming_rid():
    body = {"text": "ab", "output_ids": [4, 5], "meta_info": {
        "finish_reason": {"type": "length"}, "output_token_logprobs": [[-0.1, 4, None]]}}
    with pytest.raises(EngineResponseError, match=r"request rid-7: 1 logprobs for 2 output tokens"):
        parse_generate_response(body, rid="rid-7", prompt_ids=[1], return_logprob=True, routed_layout=None)
    body["meta_info"]["output_token_logprobs"] = [[-0.1, 4, None], [-0.2, 6, None]]
    with pytest.raises(EngineResponseError, match="token ids differ"):
        parse_generate_response(body, rid="x", prompt_ids=[1], return_logprob=True, routed_layout=None)
    body["meta_info"]["output_token_logprobs"] = [[-0.1, 4, None], [0.5, 5, None]]
    with pytest.raises(EngineResponseError, match="invalid logprobs"):
        parse_generate_response(body, rid="x", prompt_ids=[1], return_logprob=True, routed_layout=None)


def test_bad_engine_logprobs_are_an_error_not_zeros():
    with fake_launcher(1, "--bad-logprobs") as launcher:
        with pytest.raises(EngineResponseError, match=r"request bad-1: 3 logprobs for 4 output tokens"):
            run(_with_client(launcher.engine_urls, lambda c: c.generate(
                [1, 2], SamplingParams(max_new_tokens=4), rid="bad-1")))


def test_stop_strings_and_stop_token_ids(engines):
    prompt = [5, 9, 11]
    full = "".join(chr(ord("a") + toy_token(prompt, 0, 0, t) % 26) for t in range(8))
    stop = full[3:5]

    async def go(c):
        a = await c.generate(prompt, SamplingParams(max_new_tokens=8, stop=(stop,)), rid="s1")
        b = await c.generate(prompt, SamplingParams(max_new_tokens=8, stop_token_ids=(2,)), rid="s2")
        return a, b
    a, b = run(_with_client(engines.engine_urls, go))
    cut = full.index(stop)
    assert a.finish_reason == "stop" and a.text == full[:cut] and len(a.output_ids) == cut + len(stop)
    assert b.finish_reason == "stop" and b.output_ids[-1] == 2 and len(b.output_ids) == 6


def test_prompt_longer_than_context_is_a_clear_error(engines):
    async def go(c):
        with pytest.raises(EngineRequestError, match="longer than the model's context length"):
            await c.generate(list(range(100)), SamplingParams(max_new_tokens=2), rid="long")
        return c.dead_engines
    assert run(_with_client(engines.engine_urls, go)) == []  # a 4xx must not mark engines dead


def test_weight_update_changes_outputs_and_version(engines):
    prompt, sp = [3, 4], SamplingParams(max_new_tokens=4, seed=1)
    tensors = {"w": torch.tensor([2.0, 3.0]), "b": torch.tensor([[1.0]])}  # sum 6 -> shift 6

    async def go(c):
        before = [await c.generate(prompt, sp, rid=f"b{i}") for i in range(2)]  # both engines (round robin)
        await c.update_weights_from_tensor(tensors, weight_version="v1")
        after = [await c.generate(prompt, sp, rid=f"a{i}") for i in range(2)]
        versions = await c.weight_versions()
        await c.update_weights_from_disk("/x", weight_version="v0-again")  # shift len("/x") = 2
        return before, after, versions
    try:
        before, after, versions = run(_with_client(engines.engine_urls, go))
    finally:
        run(_with_client(engines.engine_urls, lambda c: c.update_weights_from_tensor({"w": torch.zeros(1)}, "default")))
    assert {r.engine_url for r in after} == set(engines.engine_urls)
    for r in before:
        assert r.output_ids == [toy_token(prompt, 1, 0, t) for t in range(4)] and r.weight_version == "default"
    for r in after:
        assert r.output_ids == [toy_token(prompt, 1, 6, t) for t in range(4)] and r.weight_version == "v1"
    assert versions == {u: "v1" for u in engines.engine_urls}


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang installed")
def test_real_sglang_tensor_update_needs_sglang():
    """Without the sglang package the SGLang-format payload cannot be built: a clear error
    before any request is sent (the engine url is unreachable on purpose)."""
    c = SGLangClient(["http://127.0.0.1:1"], engine_kind="sglang")
    with pytest.raises(ImportError, match=r"pip install \.\[sglang\]"):
        run(c.update_weights_from_tensor({"w": torch.zeros(1)}, "v"))


def test_abort_and_concurrency_limit():
    with fake_launcher(1, "--token-delay-s", "0.02") as launcher:
        async def go(c):
            task = asyncio.ensure_future(c.generate([1], SamplingParams(max_new_tokens=500), rid="long-1"))
            others = [asyncio.ensure_future(c.generate([i], SamplingParams(max_new_tokens=3), rid=f"o{i}"))
                      for i in range(6)]
            await asyncio.gather(*others)
            await c.abort("long-1")
            res = await asyncio.wait_for(task, 10)
            return res, (await c.server_info())[0]
        res, info = run(_with_client(launcher.engine_urls, go, max_concurrency=2))
    assert res.finish_reason == "abort" and 0 < len(res.output_ids) < 500 and len(res.logprobs) == len(res.output_ids)
    assert info["max_inflight"] == 2


def test_engine_killed_mid_rollout_no_loss_no_duplicates():
    prompts, n, sp = [[i, i + 1] for i in range(6)], 4, SamplingParams(max_new_tokens=30, seed=100)
    with fake_launcher(2, "--token-delay-s", "0.01") as launcher:
        async def go(c):
            roll = asyncio.ensure_future(generate_groups(c, prompts, n, sp, rid_prefix="step0"))
            await asyncio.sleep(0.15)  # requests are in flight on both engines (30 tokens x 10 ms each)
            assert not roll.done()
            dead = kill_engine(launcher, 0)
            groups = await roll
            assert c.dead_engines == [dead] and c.n_retried >= 1  # in-flight requests were retried
            return dead, groups
        dead, groups = run(_with_client(launcher.engine_urls, go, max_concurrency=64, retries=2))
        dead_proc = launcher.dead_engines()
    assert dead_proc == [dead]
    assert [len(g) for g in groups] == [n] * len(prompts)
    rids = [r.rid for g in groups for r in g]
    assert len(set(rids)) == len(rids) == len(prompts) * n
    for i, g in enumerate(groups):
        for j, r in enumerate(g):
            assert r.rid == f"step0-p{i}-s{j}"
            assert r.output_ids == [toy_token(prompts[i], 100 + i * n + j, 0, t) for t in range(30)]
            assert r.engine_url != dead or r.finish_reason == "length"
    assert sum(r.engine_url == launcher.engine_urls[1] for g in groups for r in g) > len(rids) // 2


def test_rollout_reports_dead_engine_metrics():
    with fake_launcher(2) as launcher:
        kill_engine(launcher, 1)

        async def go(c):
            groups = await generate_groups(c, [[1], [2]], 3, SamplingParams(max_new_tokens=2))
            return groups, rollout_metrics(groups, c), list(c.dead_engines)
        groups, metrics, dead = run(_with_client(launcher.engine_urls, go))
    assert dead == [launcher.engine_urls[1]]
    assert metrics["rollout/dead_engines"] == 1 and metrics["rollout/num_samples"] == 6
    assert metrics["rollout/retried_requests"] >= 1


def test_launcher_failure_raises_with_log_tail():
    cfg = LaunchConfig(model_path="m", engine_cmd=(sys.executable, "-c", "print('boom-xyz'); raise SystemExit(3)"),
                       router=False, health_timeout_s=20)
    with pytest.raises(EngineLaunchError, match=r"(?s)exited with code 3.*boom-xyz"):
        EngineLauncher(cfg).start()


# ---------------------------------------------------------------- rewards
def test_reward_failures_counted_and_thresholded():
    def flaky(response: str, label: str) -> float:
        if response == "crash":
            raise ValueError("verifier exploded")
        return float(response == label)
    responses = ["1", "2", "crash", "1"] + ["1"] * 36
    res = RewardRunner(flaky, max_failure_rate=0.05).score_sync(responses, ["1"] * 40, group_size=4)
    assert res.failed.tolist() == [False, False, True] + [False] * 37
    assert np.isnan(res.rewards[2]) and "verifier exploded" in res.errors[2]
    assert res.metrics["reward/failed_count"] == 1 and res.metrics["reward/failure_rate"] == 1 / 40
    # group 0 = [1, 0, failed, 1] -> mean 2/3, population std over the 3 valid samples
    ref = np.array([1.0, 0.0, 1.0])
    assert res.group_mean[0] == pytest.approx(ref.mean()) and res.group_std[0] == pytest.approx(ref.std())
    assert res.group_std[1] == 0 and res.metrics["reward/zero_std_groups"] == 9
    with pytest.raises(RewardFailureError, match=r"2/8 verifier calls failed.*verifier exploded"):
        RewardRunner(flaky, max_failure_rate=0.05).score_sync(["crash", "crash"] + ["1"] * 6, ["1"] * 8, 4)


def test_async_verifiers_run_concurrently():
    n = 8

    async def go():
        started, ev = [], asyncio.Event()

        async def slow(response: str, label: str) -> float:
            started.append(response)
            if len(started) == n:
                ev.set()
            await asyncio.wait_for(ev.wait(), 5)  # times out unless all n calls are in flight together
            return float(response == label)
        return await score_group(slow, [str(i) for i in range(n)], "3")
    t0 = time.monotonic()
    res = asyncio.run(go())
    assert time.monotonic() - t0 < 4 and res.rewards.tolist() == [float(i == 3) for i in range(n)]


def test_builtin_verifiers():
    assert synthetic_verifier("Bob has 7.\nThe answer is \\boxed{17}.", "17") == 1.0
    assert synthetic_verifier("The answer is \\boxed{18}.", "17") == 0.0
    assert math_verifier(r"so \boxed{\frac{1}{2}}", "0.5") == 1.0
    assert math_verifier(r"\boxed{18}", "17") == 0.0
    assert math_verifier("no answer here", "17") == 0.0
