"""Disaggregated weight sync (SGLang's init_weights_update_group / update_weights_from_distributed)
against a real embedded engine subprocess, over a gloo weight-update group on 127.0.0.1.

One trainer rank (run_distributed world 1: the Megatron default group exists, the update group is
a second, separate one). The independent reference is the engine: an HF transformers model whose
sampled-token logprobs must match Megatron's recomputation after each sync.
"""

import asyncio
import importlib.util

import pytest
import torch

from megatron_rl.rollout.client import EngineRequestError, SamplingParams, SGLangClient
from megatron_rl.rollout.weight_sync import WeightSync
from megatron_rl.testing import run_distributed

if importlib.util.find_spec("megatron_rl.rollout.engine.__main__") is None:
    pytest.skip("embedded engine not available", allow_module_level=True)

PROMPT = [11, 3, 42, 9, 17, 2]
TOL = 1e-5


async def _generate(url: str, seed: int):
    async with SGLangClient([url]) as c:
        return await c.generate(PROMPT, SamplingParams(temperature=1.0, max_new_tokens=12, seed=seed), rid=f"d{seed}")


def _megatron_logprobs(tr, sample) -> torch.Tensor:
    from megatron_rl.train.logprobs import compute_logprobs

    tokens = torch.tensor([sample.prompt_ids + sample.output_ids], dtype=torch.long)
    return compute_logprobs(tr, tokens)[0, len(sample.prompt_ids) - 1:]  # [T]


def _perturb(tr, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tr.model[0].parameters() if isinstance(tr.model, list) else tr.model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _check(tr, url: str, seed: int) -> dict:
    s = asyncio.run(_generate(url, seed))
    return {"delta": float((_megatron_logprobs(tr, s) - torch.tensor(s.logprobs)).abs().max()),
            "version": s.weight_version, "sample": s}


def _worker(rank: int, world: int, hf_dir: str, url: str) -> dict:
    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, load_hf_config, transformer_config_from_hf
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_rl.train.engine import OptimConfig, build_trainer

    init_parallel(ParallelConfig(tp=1, pp=1), device="cpu", seed=7)
    hf = load_hf_config(hf_dir)
    cfg = transformer_config_from_hf(hf, ModelOptions(), tp=1, pp=1, ep=1, etp=1)
    tr = build_trainer(hf, cfg, OptimConfig(lr=1e-3, warmup_steps=0, train_steps=10, decay_style="constant"))
    load_hf_weights(tr.model, hf_dir, hf)
    res = {"v0": _check(tr, url, seed=3)}
    s0 = res["v0"].pop("sample")
    ws = WeightSync(SGLangClient([url]), mode="distributed", bucket_bytes=64 * 1024)
    _perturb(tr, seed=1)
    res["sync1"] = ws.sync(tr.model, hf, version=1)
    res["v1"] = _check(tr, url, seed=3)
    res["v1"].pop("sample")
    # the engine's v0 sample rescored: engine (new weights) no longer gives v0's logprobs
    res["old_vs_new"] = float((_megatron_logprobs(tr, s0) - torch.tensor(s0.logprobs)).abs().mean())
    group1 = ws.group
    _perturb(tr, seed=2)
    res["sync2"] = ws.sync(tr.model, hf, version=2)  # reuses the group
    res["reused"] = ws.group is group1
    res["v2"] = _check(tr, url, seed=4)
    res["v2"].pop("sample")
    ws.destroy_group()
    res["group_after_destroy"] = ws.group

    async def stale_update():  # the engine left the group: it refuses without blocking
        async with SGLangClient([url]) as c:
            await c.update_weights_from_distributed(["lm_head.weight"], ["float32"], [[1, 1]], weight_version="x")
    try:
        asyncio.run(stale_update())
        res["refused"] = None
    except EngineRequestError as e:
        res["refused"] = str(e)
    _perturb(tr, seed=3)
    res["sync3"] = ws.sync(tr.model, hf, version=3)  # re-initialises a fresh group
    res["v3"] = _check(tr, url, seed=5)
    res["v3"].pop("sample")
    ws.destroy_group()
    destroy_parallel()
    return res


def test_distributed_sync_init_reuse_destroy_reinit(engine, tiny_hf_dir):
    url = engine.engine_urls[0]
    (r,) = run_distributed(_worker, 1, tiny_hf_dir, url)
    print(f"\nmax|dlogp| v0={r['v0']['delta']:.2e} v1={r['v1']['delta']:.2e} v2={r['v2']['delta']:.2e} "
          f"v3={r['v3']['delta']:.2e} old-vs-new={r['old_vs_new']:.3e}\nsync1={r['sync1']}\nsync3={r['sync3']}")
    assert r["v0"]["delta"] < TOL and r["v0"]["version"] != "1"
    assert r["v1"]["delta"] < TOL and r["v1"]["version"] == "1"
    assert r["old_vs_new"] > 1e-3  # the sync really changed the engine's policy
    assert r["reused"] and r["v2"]["delta"] < TOL and r["v2"]["version"] == "2"
    assert r["group_after_destroy"] is None and r["refused"] and "weight update group" in r["refused"]
    assert r["v3"]["delta"] < TOL and r["v3"]["version"] == "3"
    for k in ("sync1", "sync2", "sync3"):
        assert r[k]["sync/num_buckets"] > 1 and r[k]["sync/bytes"] > 0
    assert r["sync1"]["sync/bytes"] == r["sync3"]["sync/bytes"]


def test_distributed_bad_requests_are_refused_without_blocking(engine):
    url = engine.engine_urls[0]

    async def go():
        async with SGLangClient([url]) as c:
            errs = []
            for coro in (c.update_weights_from_distributed(["a"], ["float32"], [[1]], group_name="nope"),
                         c.destroy_weights_update_group("nope"),
                         c._request("POST", f"{url}/init_weights_update_group", {"master_address": "127.0.0.1"}),
                         c.init_weights_update_group("127.0.0.1", 1, 2, backend="nccl" if not torch.cuda.is_available()
                                                     else "bogus")):
                try:
                    await coro
                    errs.append(None)
                except EngineRequestError as e:
                    errs.append(str(e))
            return errs
    errs = asyncio.run(go())
    assert all(errs), errs
    assert "nope" in errs[0] and "nope" in errs[1] and "master_port" in errs[2]
