"""Real sglang-router (0.3.2) in front of real embedded engines (python -m megatron_rl.rollout.engine).

Skipped with the missing module named when sglang_router or the embedded engine is absent.
"""

import asyncio
import importlib.util

import numpy as np
import pytest
import torch

from megatron_rl.rollout.client import EngineRequestError, SamplingParams, SGLangClient
from megatron_rl.rollout.launcher import EngineLauncher, LaunchConfig, kill_engine
from megatron_rl.rollout.rollout import generate_groups

for _mod in ("sglang_router", "megatron_rl.rollout.engine.__main__"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"module {_mod} is not installed/written", allow_module_level=True)


@pytest.fixture(scope="module")
def stack(tiny_hf_dir):
    cfg = LaunchConfig(model_path=tiny_hf_dir, num_engines=2, router=True, health_timeout_s=120,
                       extra_args=("--context-length", "64"))
    with EngineLauncher(cfg) as launcher:
        yield launcher


def client(stack, **kw) -> SGLangClient:
    return SGLangClient(stack.engine_urls, router_url=stack.router_url, retries=6, **kw)


def test_router_lists_workers_and_generates(stack):
    assert sorted(w["url"] for w in stack.router_workers()) == sorted(stack.engine_urls)

    async def go():
        async with client(stack) as c:
            sp = SamplingParams(temperature=0.0, max_new_tokens=8)
            return [await c.generate([5, 6, 7], sp, rid=f"g{i}") for i in range(4)]
    res = asyncio.run(go())
    assert all(r.engine_url == stack.router_url for r in res)
    assert all(r.output_ids == res[0].output_ids for r in res)  # greedy: both engines agree
    for r in res:
        assert len(r.logprobs) == len(r.output_ids) == 8 or r.finish_reason == "stop"
        assert all(np.isfinite(r.logprobs)) and max(r.logprobs) <= 1e-4
        np.testing.assert_allclose(r.logprobs, res[0].logprobs, atol=1e-4)


def test_prompt_longer_than_context_through_router(stack):
    async def go():
        async with client(stack) as c:
            await c.generate(list(range(3, 103)), SamplingParams(max_new_tokens=2), rid="too-long")
    with pytest.raises(EngineRequestError):
        asyncio.run(go())


def test_weight_update_changes_outputs_and_version(stack, tiny_hf_dir):
    from safetensors.torch import load_file
    import glob
    original = {}
    for f in glob.glob(f"{tiny_hf_dir}/*.safetensors"):
        original.update(load_file(f))
    name = "model.norm.weight"
    perturbed = {name: original[name] * -3.0}
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)

    async def go():
        async with client(stack) as c:
            before = await c.generate([9, 10, 11], sp, rid="w0")
            await c.update_weights_from_tensor(perturbed, weight_version="v1")
            after = [await c.generate([9, 10, 11], sp, rid=f"w{i}") for i in range(1, 3)]
            versions = await c.weight_versions()
            await c.update_weights_from_tensor({name: original[name]}, weight_version="v2")
            restored = await c.generate([9, 10, 11], sp, rid="w3")
            return before, after, versions, restored
    before, after, versions, restored = asyncio.run(go())
    assert before.weight_version == "default" and {r.weight_version for r in after} == {"v1"}
    assert all(r.output_ids != before.output_ids for r in after) or all(
        not np.allclose(r.logprobs, before.logprobs, atol=1e-3) for r in after)
    assert versions == {u: "v1" for u in stack.engine_urls}
    assert restored.output_ids == before.output_ids and restored.weight_version == "v2"


def test_partial_utf8_and_empty_response_through_router(stack, tiny_hf_dir):
    """Lone UTF-8 bytes (0xC3 lead / 0xA9 continuation tokens) survive engine -> router -> client:
    output_ids equal HF greedy with the same lm_head, text equals Python's lossy UTF-8 decode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    vocab = tok.get_vocab()
    lead, cont = vocab["\u00c3"], vocab["\u00a9"]  # byte-level tokens of the lone bytes 0xC3, 0xA9
    byte_of = {lead: b"\xc3", cont: b"\xa9"}
    original = model.lm_head.weight.detach().clone()
    w = torch.zeros_like(original)
    w[lead], w[cont] = original[3], -original[3]  # greedy picks one of the two, whichever logit is > 0
    ids = tok.encode("3+4*2=")
    with torch.no_grad():
        model.lm_head.weight.copy_(w)
        ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10,
                             min_new_tokens=10)[0, len(ids):].tolist()
    ref_text = b"".join(byte_of[t] for t in ref).decode("utf-8", errors="replace")
    assert set(ref) <= set(byte_of) and "\ufffd" in ref_text, (ref, ref_text)
    sp = SamplingParams(temperature=0.0, max_new_tokens=10)

    async def go():
        async with client(stack) as c:
            await c.update_weights_from_tensor({"lm_head.weight": w}, weight_version="bytes")
            try:
                outs = [await c.generate(ids, sp, rid=f"utf8-{i}") for i in range(2)]  # both engines
                empty = await c.generate(ids, SamplingParams(max_new_tokens=0), rid="empty")
            finally:
                await c.update_weights_from_tensor({"lm_head.weight": original}, weight_version="default")
            return outs, empty
    outs, empty = asyncio.run(go())
    for r in outs:
        assert r.output_ids == ref and r.text == ref_text and r.weight_version == "bytes"
        assert len(r.logprobs) == 10 and r.finish_reason == "length"
    assert empty.output_ids == [] and empty.logprobs == [] and empty.text == ""
    assert empty.finish_reason == "length" and empty.meta_info["completion_tokens"] == 0


def test_abort_through_router(stack):
    """A request in flight through the router, aborted by rid on the engines: it returns
    finish_reason "abort" with fewer tokens than asked, and the engines stay usable."""
    async def go():
        async with client(stack) as c:
            sp = SamplingParams(temperature=0.0, max_new_tokens=56)
            task = asyncio.create_task(c.generate([5, 6, 7], sp, rid="to-abort"))
            for _ in range(500):  # wait until an engine is running it
                infos = await c.server_info()
                if any(i["internal_states"][0]["num_running_reqs"] for i in infos):
                    break
                await asyncio.sleep(0.005)
            await c.abort("to-abort")
            aborted = await task
            after = await c.generate([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=4),
                                     rid="after-abort")
            return aborted, after
    aborted, after = asyncio.run(go())
    assert aborted.finish_reason == "abort", aborted.finish_reason
    assert len(aborted.output_ids) < 56
    assert after.finish_reason in ("length", "stop") and len(after.output_ids) >= 1


def test_kill_engine_mid_rollout_through_router(stack):
    prompts, n = [[3 + i, 4 + i] for i in range(4)], 3
    sp = SamplingParams(temperature=1.0, max_new_tokens=24, seed=7)

    async def go():
        async with client(stack) as c:
            roll = asyncio.ensure_future(generate_groups(c, prompts, n, sp, rid_prefix="k"))
            await asyncio.sleep(0.3)
            dead = kill_engine(stack, 1)
            return dead, await roll
    dead, groups = asyncio.run(go())  # runs last in this module: engine 1 stays dead
    assert stack.dead_engines() == [dead]
    assert [len(g) for g in groups] == [n] * len(prompts)
    rids = [r.rid for g in groups for r in g]
    assert len(set(rids)) == len(rids) == len(prompts) * n
    assert all(len(r.logprobs) == len(r.output_ids) for g in groups for r in g)


def test_engines_die_with_a_killed_launcher(tiny_hf_dir, tmp_path):
    """SIGKILL the process that launched engine + router (no cleanup runs): both exit too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    prog = (f"from megatron_rl.rollout.launcher import EngineLauncher, LaunchConfig\n"
            f"l = EngineLauncher(LaunchConfig(model_path={str(tiny_hf_dir)!r}, num_engines=1, router=True,"
            f" health_timeout_s=120, log_dir={str(tmp_path)!r})).start()\n"
            f"print(' '.join(str(p.popen.pid) for p in [*l.engines, l.router]), flush=True)\n"
            f"import time; time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in parent.stdout.readline().split()]
    assert len(pids) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.2)
    assert not alive, f"orphaned processes {alive}"


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
