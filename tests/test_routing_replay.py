"""Rollout routing replay (R3/R2) and the top-k flip rate (megatron_rl/moe/routing_replay.py).

References: hand-made layouts and a Python set-based flip rate; the embedded engine (a separate
HF transformers implementation) whose routes the trainer must reproduce (fp32) or replay (bf16);
free routing as the reference for replaying the trainer's own routes; a single-rank run for the
parallel layouts; hooks on the routers (not RouterReplay) for the experts actually used.

Must-show numbers (issue #6): ``pytest tests/test_routing_replay.py -k bf16 -s`` prints the
engine(bf16) vs trainer(fp32) flip rate and logprob mismatch with R3 off and on.
"""

import asyncio
import importlib.util

import numpy as np
import pytest
import torch

from megatron_rl.moe.routing_replay import (build_replay_routes, flip_rate_metrics,
                                            local_replay_indices, routing_flip_counts,
                                            routing_flip_rate, split_routes)
from megatron_rl.testing import run_distributed

import _replay_runs as R

PROMPTS = [[5, 6, 7, 8], [11, 3, 42, 9, 17, 2], [100, 7, 250, 31, 8, 66, 90], [64, 12, 9],
           [300, 21, 5, 77, 140]]
LAYERS, TOPK, EXPERTS = 4, 2, 8


# -- pure layout / metric tests ---------------------------------------------------------------
def test_build_split_local_layout():
    r0 = np.arange(3 * 2 * 2, dtype=np.int32).reshape(3, 2, 2) % 5  # sample of 4 tokens
    r1 = np.full((1, 2, 2), 4, np.int32)  # sample of 2 tokens
    r2 = np.full((2, 2, 2), 3, np.int32)  # packed after r1
    out = build_replay_routes([r0, [(0, r1), (3, r2)], None], 8, 2, 2, num_experts=5)
    assert out.shape == (3, 8, 2, 2) and out.dtype == torch.int32
    fill = torch.tensor([0, 1], dtype=torch.int32)
    ref = fill.expand(3, 8, 2, 2).clone()  # by hand
    ref[0, 0:3] = torch.from_numpy(r0)
    ref[1, 0:1] = torch.from_numpy(r1)
    ref[1, 3:5] = torch.from_numpy(r2)
    assert torch.equal(out, ref)
    back = split_routes(out, [4, [(0, 2), (3, 3)], 0])
    assert np.array_equal(back[0][0], r0) and np.array_equal(back[1][0], r1)
    assert np.array_equal(back[1][1], r2) and back[2] == []
    # Megatron's token order: seq-first, SP shard of the sequence, one tensor per local layer
    idx = local_replay_indices(out, [1], sequence_parallel=True, tp_rank=1, tp_size=2)
    assert len(idx) == 1 and idx[0].dtype == torch.int64 and idx[0].shape == (4 * 3, 2)
    for s in range(4):
        for b in range(3):
            assert torch.equal(idx[0][s * 3 + b], out[b, 4 + s, 1].long())
    with pytest.raises(ValueError):
        build_replay_routes([np.zeros((8, 2, 2), np.int32)], 8, 2, 2)  # 9 tokens > S
    with pytest.raises(ValueError):
        build_replay_routes([[(0, r0), (2, r1)]], 8, 2, 2)  # overlap
    with pytest.raises(ValueError):
        build_replay_routes([r0], 8, 2, 2, num_experts=4)  # id 4 >= E
    with pytest.raises(ValueError):
        build_replay_routes([r0], 8, 3, 2)  # wrong L


def test_flip_rate_reference():
    g = torch.Generator().manual_seed(0)
    t, nl, k, e = 50, 3, 2, 6
    a = torch.rand(t, nl, e, generator=g).argsort(-1)[..., :k]
    b = a.flip(-1).clone()  # same sets, other order: no flip
    b[::3, 0, 0] = (b[::3, 0, 0] + 1) % e  # some flips (or duplicates -> still a different set)
    b[5:9, 2] = torch.rand(4, e, generator=g).argsort(-1)[:, :k]
    valid = torch.rand(t, generator=g) > 0.2
    ref_f = [0.0] * nl  # Python set reference
    for i in range(t):
        for layer in range(nl):
            if valid[i] and set(a[i, layer].tolist()) != set(b[i, layer].tolist()):
                ref_f[layer] += 1
    n = int(valid.sum())
    m = routing_flip_rate(a.numpy(), b, valid, layer_ids=[1, 2, 3])
    for layer in range(nl):
        assert m[f"moe/layer{layer + 1}/routing_flip_rate"] == pytest.approx(ref_f[layer] / n, abs=1e-15)
    assert m["moe/routing_flip_rate"] == pytest.approx(sum(ref_f) / (nl * n), abs=1e-15)
    assert sum(ref_f) > 0
    flips, nv = routing_flip_counts(a, b, valid)
    assert flip_rate_metrics(flips * 2, nv * 2) == routing_flip_rate(a, b, valid)  # summed halves
    assert routing_flip_rate(a, a, valid)["moe/routing_flip_rate"] == 0.0
    assert routing_flip_rate(a.view(5, 10, nl, k), b.view(5, 10, nl, k), valid.view(5, 10)) \
        == routing_flip_rate(a, b, valid)  # [B, S, L, K] batches
    with pytest.raises(ValueError):
        routing_flip_rate(a, b, valid[:-1])


# -- engine vs trainer --------------------------------------------------------------------------
def _engine_samples(hf_dir: str, dtype: str) -> list[dict]:
    from megatron_rl.rollout.client import SamplingParams, SGLangClient
    from megatron_rl.rollout.launcher import EngineLauncher, LaunchConfig

    cfg = LaunchConfig(model_path=hf_dir, num_engines=1, router=False, health_timeout_s=120,
                       extra_args=("--dtype", dtype))

    async def gen(url):
        async with SGLangClient([url], routed_experts_layout=(LAYERS, TOPK)) as c:
            sp = SamplingParams(temperature=1.0, max_new_tokens=16, seed=11)
            return [await c.generate(p, sp, return_routed_experts=True, rid=f"r{i}")
                    for i, p in enumerate(PROMPTS)]

    with EngineLauncher(cfg) as launcher:
        res = asyncio.run(gen(launcher.engine_urls[0]))
    return [{"prompt_ids": r.prompt_ids, "output_ids": r.output_ids, "logprobs": r.logprobs,
             "routes": r.routed_experts} for r in res]


@pytest.fixture(scope="module")
def samples(tiny_hf_dir):
    if importlib.util.find_spec("megatron_rl.rollout.engine.__main__") is None:
        pytest.skip("embedded engine not available")
    cache = {}

    def get(dtype):
        if dtype not in cache:
            cache[dtype] = _engine_samples(tiny_hf_dir, dtype)
        return cache[dtype]
    return get


def _route_mask(samples) -> torch.Tensor:
    """[B, S] True where the engine returned a route (every token but each sample's last)."""
    m = torch.zeros(len(samples), R.SEQ, dtype=torch.bool)
    for i, s in enumerate(samples):
        m[i, :len(s["prompt_ids"]) + len(s["output_ids"]) - 1] = True
    return m


def _flip(engine_rows: torch.Tensor, trainer_rows: torch.Tensor, valid: torch.Tensor) -> dict:
    return routing_flip_rate(engine_rows[valid], trainer_rows[valid], torch.ones(int(valid.sum())))


def _lp_mismatch(samples, lp: torch.Tensor) -> float:
    """Mean |engine logp - trainer logp| over response tokens."""
    d = []
    for i, s in enumerate(samples):
        p, c = len(s["prompt_ids"]), len(s["output_ids"])
        d.append((lp[i, p - 1:p + c - 1] - torch.tensor(s["logprobs"])).abs())
    return float(torch.cat(d).mean())


def test_fp32_engine_routes_match_trainer_record(tiny_hf_dir, samples):
    smp = samples("float32")
    (res,) = run_distributed(R.engine_compare, 1, tiny_hf_dir, smp)
    assert res["err"] and "enable_routing_replay" in res["err"]
    eng = build_replay_routes([s["routes"] for s in smp], R.SEQ, LAYERS, TOPK)
    valid = _route_mask(smp)
    m_rec = _flip(eng, res["recorded"], valid)
    m_hook = _flip(eng, res["free_used"], valid)
    print(f"\nfp32 engine vs fp32 trainer: flip rate RECORD {m_rec['moe/routing_flip_rate']}, "
          f"hook {m_hook['moe/routing_flip_rate']}; "
          f"logprob mismatch {_lp_mismatch(smp, res['lp_free']):.3e}")
    assert m_rec["moe/routing_flip_rate"] == 0.0 and m_hook["moe/routing_flip_rate"] == 0.0
    # recorded routes in the engine's per-sample layout are the engine's routes (as sets)
    lens = [len(s["prompt_ids"]) + len(s["output_ids"]) for s in smp]
    for s, (r,) in zip(smp, split_routes(res["recorded"], lens)):
        assert r.shape == s["routes"].shape
        assert np.array_equal(np.sort(r, -1), np.sort(s["routes"], -1))
    # replaying the engine's (= trainer's) routes changes nothing on routed positions (the
    # filler only reaches each sample's last token and padding); free routing after exit
    assert torch.allclose(res["lp_replay"][valid], res["lp_free"][valid], atol=1e-6, rtol=0)
    assert torch.equal(res["lp_plain"], res["lp_free"])


def test_bf16_engine_replay_flip_rate_and_logprob_mismatch(tiny_hf_dir, samples):
    smp = samples("bfloat16")
    (res,) = run_distributed(R.engine_compare, 1, tiny_hf_dir, smp)
    eng = build_replay_routes([s["routes"] for s in smp], R.SEQ, LAYERS, TOPK)
    valid = _route_mask(smp)
    off = _flip(eng, res["free_used"], valid)
    on = _flip(eng, res["replay_used"], valid)
    mm_off, mm_on = _lp_mismatch(smp, res["lp_free"]), _lp_mismatch(smp, res["lp_replay"])
    n_resp = sum(len(s["output_ids"]) for s in smp)
    print("\n== issue #6 must-show: engine bf16 vs trainer fp32, tiny Qwen3-MoE "
          f"({len(smp)} samples, {int(valid.sum())} routed tokens, {n_resp} response tokens) ==\n"
          "   pytest tests/test_routing_replay.py -k bf16 -s\n"
          f"   R3 off: top-k flip rate {off['moe/routing_flip_rate']:.4f} "
          f"(per layer {[round(off[f'moe/layer{i}/routing_flip_rate'], 4) for i in range(LAYERS)]}), "
          f"mean |logp_engine - logp_trainer| {mm_off:.4e}\n"
          f"   R3 on : top-k flip rate {on['moe/routing_flip_rate']:.4f}, "
          f"mean |logp_engine - logp_trainer| {mm_on:.4e}")
    assert on["moe/routing_flip_rate"] == 0.0
    if off["moe/routing_flip_rate"] > 0:
        assert mm_on < mm_off


# -- router gradient under replay -----------------------------------------------------------------
def test_router_grad_under_replay_and_recompute(tiny_hf_dir, samples):
    smp = samples("bfloat16")
    (g,) = run_distributed(R.grad_runs, 1, tiny_hf_dir, smp)
    names = sorted(g["free"])
    assert len(names) == LAYERS
    for n in names:
        # replaying the trainer's own routes (recorded in the same pass) == free routing, exactly:
        # gate weights are recomputed from the live logits, so the router keeps its gradient
        assert torch.equal(g["own"][n], g["free"][n]), n
        assert g["engine_none"][n].abs().max() > 0, n
        # full activation recompute replays the same indices in backward (REPLAY_BACKWARD)
        torch.testing.assert_close(g["engine_full"][n], g["engine_none"][n], atol=1e-6, rtol=0)
    diff = max(float((g["engine_none"][n] - g["free"][n]).abs().max()) for n in names)
    print(f"\nmax |router grad (replay bf16-engine routes) - router grad (free)| = {diff:.3e}")


# -- parallel layouts ------------------------------------------------------------------------------
LAYOUTS = [{"ep": 2}, {"pp": 2}, {"tp": 2, "sp": True}]  # one 2-rank launch runs all three


def _random_samples():
    g = torch.Generator().manual_seed(3)
    lens = [(5, 20), (8, 9), (4, 27)]  # (prompt, output): the last row is 31 of 32 tokens
    return [{"prompt_ids": torch.randint(1, 200, (p,), generator=g).tolist(),
             "output_ids": torch.randint(1, 200, (c,), generator=g).tolist()} for p, c in lens]


def test_replay_layouts_match_single_rank(tiny_hf_dir):
    """EP2 (alltoall), PP2 (forward-only schedule + recorded_routes' PP gather) and TP2 + sequence
    parallel (per-rank sequence shard of the indices + TP gather) vs a separate single-rank run."""
    smp = _random_samples()
    routes = R.random_routes(smp, LAYERS, TOPK, EXPERTS)
    ((ref,),) = run_distributed(R.layout_runs, 1, tiny_hf_dir, smp, routes, [{}])
    valid = torch.zeros(len(smp), R.SEQ, dtype=torch.bool)
    for i, s in enumerate(smp):
        valid[i, :len(s["prompt_ids"]) + len(s["output_ids"]) - 1] = True
    # replay actually changed the routing (random routes vs the model's own)
    assert (ref["lp_replay"][valid] - ref["lp_free"][valid]).abs().max() > 1e-3
    for rank_res in run_distributed(R.layout_runs, 2, tiny_hf_dir, smp, routes, LAYOUTS):
        for lay, r in zip(LAYOUTS, rank_res):
            torch.testing.assert_close(r["lp_replay"], ref["lp_replay"], atol=1e-5, rtol=0,
                                       msg=lambda m: f"{lay}: {m}")
            torch.testing.assert_close(r["lp_free"], ref["lp_free"], atol=1e-5, rtol=0,
                                       msg=lambda m: f"{lay}: {m}")
            assert _flip(ref["recorded"], r["recorded"], valid)["moe/routing_flip_rate"] == 0.0, lay
