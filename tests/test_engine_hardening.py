"""Hardening of the embedded engine: bad requests get 400 naming the field (never 500, never a hang),
one request's failure never stops the others, weight updates are refused atomically, --api-key,
local-only disk updates, the queue limit, and /health when the scheduler is gone.

References are independent of the code under test: the status codes and field names the issue lists,
the greedy output of the same engine before a refused update, and HF-free arithmetic on lengths.
"""

import asyncio
import json
import math
import os

import pytest
import torch

from _engine_http import Engine, call

pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@pytest.fixture(scope="module")
def url(tiny_hf_dir):
    with Engine(tiny_hf_dir, "--max-running-requests", "8") as u:
        yield u


def _greedy(url, n=6):
    status, out = call(url, "/generate", {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 0, "max_new_tokens": n,
                                                                                        "ignore_eos": True}})
    assert status == 200, out
    return out["output_ids"]


def test_skip_special_tokens_zero_does_not_hang_the_engine(url):
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "skip_special_tokens": 0}}
    status, out = call(url, "/generate", body, timeout=30)
    assert status == 200 and len(out["output_ids"]) <= 2
    assert call(url, "/health")[0] == 200
    assert len(_greedy(url)) == 6


MALFORMED = [
    ([1, 2], "body"), ("text", "body"), (None, "body"),
    ({"input_ids": {"a": 1}}, "input_ids"), ({"text": [[]]}, "text"),
    ({"input_ids": [True, False]}, "input_ids"), ({"input_ids": [1.5]}, "input_ids"),
    ({"input_ids": [1], "sampling_params": {"temperature": float("nan")}}, "temperature"),
    ({"input_ids": [1], "sampling_params": {"top_k": 2.5}}, "top_k"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 2.5}}, "max_new_tokens"),
    ({"input_ids": [1], "sampling_params": {"sampling_seed": 2**70}}, "sampling_seed"),
    ({"input_ids": [1], "sampling_params": {"temperature": "hot"}}, "temperature"),
    ({"input_ids": [1], "sampling_params": {"stop": 3}}, "stop"),
    ({"input_ids": [1], "sampling_params": "greedy"}, "sampling_params"),
    ({"input_ids": [1], "sampling_params": {"regex": "[0-9]+"}}, "regex"),
    ({"input_ids": [1], "sampling_params": {"json_schema": "{}"}}, "json_schema"),
    ({"input_ids": [1], "sampling_params": {"bogus_param": 1}}, "bogus_param"),
    ({"input_ids": [1], "lora_path": "x"}, "lora_path"),
    ({"input_ids": [1], "return_hidden_states": True}, "return_hidden_states"),
    ({"input_ids": [1], "input_embeds": [[0.1]]}, "input_embeds"),
    ({"input_ids": [1], "custom_logit_processor": "x"}, "custom_logit_processor"),
    ({"input_ids": [1], "rid": ["a", "b"]}, "rid"),
    ({"input_ids": [1], "return_logprob": "yes"}, "return_logprob"),
    ({"input_ids": [1], "stream": "yes"}, "stream"),
    ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5}, "logprob_start_len"),
]


@pytest.mark.parametrize("body,field", MALFORMED, ids=[f for _, f in MALFORMED])
def test_malformed_generate_is_400_naming_the_field(url, body, field):
    raw = json.dumps(body, allow_nan=True).encode()
    status, out = call(url, "/generate", raw=raw, timeout=30)
    assert status == 400, out
    assert field in out["error"]["message"], out


def test_malformed_control_bodies(url):
    assert call(url, "/abort_request", {"rid": ["a"]})[0] == 400
    assert call(url, "/abort_request", raw=b"[1]")[0] == 400
    assert call(url, "/pause_generation", {"mode": "sideways"})[0] == 400
    status, out = call(url, "/update_weights_from_tensor", {"serialized_named_tensors": 5})
    assert status == 400 and out["success"] is False


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=5))
_json = st.recursive(_json_leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                     st.dictionaries(st.text(max_size=4), c, max_size=3)),
                     max_leaves=6)
_sp_keys = ["temperature", "top_p", "top_k", "min_p", "max_new_tokens", "min_new_tokens", "stop",
            "stop_token_ids", "sampling_seed", "ignore_eos", "skip_special_tokens", "no_stop_trim", "n",
            "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias"]
_small_ok = st.one_of(st.integers(0, 3), st.floats(0, 1), st.booleans(), st.just([5, 6]), st.just("x"))
_bodies = st.fixed_dictionaries({}, optional={
    "input_ids": st.one_of(st.lists(st.integers(-2, 400), max_size=4), _json),
    "text": st.one_of(st.text(max_size=6), st.lists(st.text(max_size=3), max_size=2), _json),
    "sampling_params": st.one_of(st.dictionaries(st.sampled_from(_sp_keys), st.one_of(_small_ok, _json), max_size=4),
                                 _json),
    "rid": _json, "return_logprob": st.one_of(st.booleans(), _json), "logprob_start_len": _json,
    "top_logprobs_num": st.one_of(st.integers(0, 3), _json), "return_routed_experts": _json,
    "return_text_in_logprobs": _json, "stream": st.one_of(st.booleans(), _json)})


def test_fuzzed_generate_bodies_never_500_or_hang(url):
    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(_bodies)
    def check(body):
        if isinstance(body.get("sampling_params"), dict):  # keep generations short
            mnt = body["sampling_params"].get("max_new_tokens")
            if not isinstance(mnt, (int, float)) or isinstance(mnt, bool) or mnt > 8:
                body["sampling_params"]["max_new_tokens"] = 4
            body["sampling_params"]["n"] = 1 if body["sampling_params"].get("n") not in (1, 2) else body["sampling_params"]["n"]
        else:
            body["sampling_params"] = {"max_new_tokens": 4}
        status, out = call(url, "/generate", raw=json.dumps(body, allow_nan=True).encode(), timeout=60)
        assert status in (200, 400), (status, out, body)
        if status == 400:
            assert out["error"]["message"], out
    check()
    assert call(url, "/health")[0] == 200


def _tensor_update(url, named, version):
    from megatron_rl.rollout.engine import encode_named_tensors
    return call(url, "/update_weights_from_tensor", {"serialized_named_tensors": encode_named_tensors(named),
                                                     "weight_version": version})


def test_bad_weight_updates_are_refused_atomically(url, tiny_hf_dir):
    from safetensors.torch import load_file
    before, version = _greedy(url), call(url, "/get_weight_version")[1]["weight_version"]
    shards = [f for f in os.listdir(tiny_hf_dir) if f.endswith(".safetensors")]
    sd = {}
    for f in shards:
        sd.update(load_file(os.path.join(tiny_hf_dir, f)))
    name = "model.embed_tokens.weight"
    good = {"lm_head.weight": sd["lm_head.weight"] * 0.5}  # valid, would change outputs if applied
    bad_sets = [{**good, name: sd[name].to(torch.int64)}, {**good, name: sd[name] > 0},
                {**good, name: sd[name].clone().index_fill_(0, torch.tensor([3]), math.nan)},
                {**good, name: sd[name].clone().index_fill_(0, torch.tensor([3]), math.inf)},
                {**good, "model.layers.0.mlp.experts.99.down_proj.weight":
                 sd["model.layers.0.mlp.experts.0.down_proj.weight"]}]
    for named in bad_sets:
        status, out = _tensor_update(url, named, "should-not-apply")
        assert status == 400 and out["success"] is False, out
        assert call(url, "/get_weight_version")[1]["weight_version"] == version
        assert _greedy(url) == before


def test_disk_update_is_local_only_and_does_not_leak_paths(url, tiny_hf_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    msgs = set()
    for path in ["/nonexistent/dir", "/etc", str(tmp_path / "file"), str(tmp_path), "Qwen/Qwen3-0.6B",
                 "../../../../etc"]:
        status, out = call(url, "/update_weights_from_disk", {"model_path": path, "weight_version": "x"})
        assert status == 400 and out["success"] is False
        msgs.add(out["message"])
    assert len(msgs) == 1, msgs  # one message whatever exists
    status, out = call(url, "/update_weights_from_disk", {"model_path": tiny_hf_dir, "weight_version": "disk"})
    assert status == 200 and out["success"], out
    assert call(url, "/get_weight_version")[1]["weight_version"] == "disk"


def test_queue_limit_and_api_key(tiny_hf_dir):
    with Engine(tiny_hf_dir, "--api-key", "s3cret", "--max-queued-requests", "2") as u:
        auth = {"Authorization": "Bearer s3cret"}
        body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}
        assert call(u, "/health")[0] == 200  # the liveness probe stays open
        for path, b in [("/generate", body), ("/get_server_info", None), ("/health_generate", None),
                        ("/update_weights_from_disk", {"model_path": tiny_hf_dir}), ("/v1/models", None)]:
            assert call(u, path, b)[0] == 401, path
            assert call(u, path, b, headers={"Authorization": "Bearer wrong"})[0] == 401, path
        status, info = call(u, "/get_server_info", headers=auth)
        assert status == 200 and "s3cret" not in json.dumps(info)
        assert call(u, "/generate", body, headers=auth)[0] == 200
        # queue limit: paused, nothing is admitted; the third waiting request is refused with 503
        assert call(u, "/pause_generation", {"mode": "in_place"}, headers=auth)[0] == 200
        status, out = call(u, "/generate", {"input_ids": [[5], [6], [7]], "sampling_params": {"max_new_tokens": 2}},
                           headers=auth)
        assert status == 503 and "queue" in out["error"]["message"], out
        assert call(u, "/continue_generation", {}, headers=auth)[0] == 200
        assert call(u, "/generate", body, headers=auth)[0] == 200


def test_health_is_503_when_the_scheduler_died(tiny_hf_dir):
    from megatron_rl.rollout.engine.server import EngineConfig, EngineServer

    server = EngineServer(EngineConfig(model_path=tiny_hf_dir))

    async def go():
        server.sched.start()
        assert (await server.health(None)).status == 200

        def crash():
            raise SystemExit("simulated worker bug")  # not an Exception: escapes the command handler
        with pytest.raises(BaseException):
            await asyncio.wait_for(server.sched.call(crash), timeout=5)
        await asyncio.sleep(0.2)
        assert not server.sched.alive
        assert (await server.health(None)).status == 503
    asyncio.run(go())
    server.sched.shutdown()


def test_one_failing_request_does_not_fail_its_batch(tiny_hf_dir):
    from megatron_rl.rollout.engine.sampling import SamplingParams
    from megatron_rl.rollout.engine.server import EngineConfig, EngineServer

    server = EngineServer(EngineConfig(model_path=tiny_hf_dir))
    real = server.runner.decode_text

    def flaky(ids, skip=True):  # the stop-string check of any sequence holding token 0 explodes
        if 0 in ids:
            raise RuntimeError("boom")
        return real(ids, skip)
    server.runner.decode_text = flaky
    bad_bias = {0: 100.0}  # forces token 0 first

    async def go():
        server.sched.start()
        items = [dict(rid=f"r{i}", input_ids=[5, 6, 7 + i],
                      params=SamplingParams(max_new_tokens=5, temperature=0, stop=["zz"], ignore_eos=True,
                                            logit_bias=bad_bias if i == 1 else {})) for i in range(3)]
        return await server.run(items)
    outs = asyncio.run(go())
    assert outs[1]["meta_info"]["finish_reason"]["type"] == "abort" and "boom" in outs[1]["meta_info"]["finish_reason"]["message"]
    for i in (0, 2):
        assert outs[i]["meta_info"]["finish_reason"]["type"] == "length" and len(outs[i]["output_ids"]) == 5
    assert server.sched.alive
    server.sched.shutdown()


def test_api_key_through_launcher_router_and_client(tiny_hf_dir, monkeypatch):
    from megatron_rl.rollout.client import EngineRequestError, SamplingParams, SGLangClient
    from megatron_rl.rollout.launcher import EngineLauncher, LaunchConfig

    monkeypatch.setenv("MEGATRON_RL_API_KEY", "k3y")  # what the trainer's launcher and clients read
    cfg = LaunchConfig(model_path=tiny_hf_dir, num_engines=1, router=True, health_timeout_s=120)
    assert cfg.api_key == "k3y"
    sp = SamplingParams(max_new_tokens=3, temperature=0.0)
    with EngineLauncher(cfg) as launcher:
        assert call(launcher.engine_urls[0], "/get_server_info")[0] == 401

        async def go(client):
            async with client as c:
                return await c.generate([5, 6, 7], sp, rid=f"k{id(c)}")
        for client in (SGLangClient(launcher.engine_urls), SGLangClient(router_url=launcher.router_url)):
            assert len(asyncio.run(go(client)).output_ids) == 3
        with pytest.raises(EngineRequestError):
            asyncio.run(go(SGLangClient(launcher.engine_urls, api_key="wrong", retries=0)))
