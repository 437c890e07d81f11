"""MoERouting (megatron_rl/moe/step_routing.py): the router counts kept from the old-logprob pass.

Independent references: ``GlobalLBL.collect_counts`` (its own no-grad forward with router hooks,
the path every MoE step took before) and, under R2, a bincount of the replayed routes tensor;
both under the loss mask as the mismatch correction left it (tokens dropped after the forward).
One world-1 launch on the tiny Qwen3-MoE.
"""

from __future__ import annotations

import random

import torch

from megatron_rl.testing import run_distributed


def _samples(n: int, vocab: int, seed: int):
    from megatron_rl.train.rl_batch import Sample

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, t = rng.randint(2, 7), rng.randint(1, 9)
        out.append(Sample(prompt_ids=[rng.randrange(1, vocab) for _ in range(p)],
                          output_ids=[rng.randrange(1, vocab) for _ in range(t)],
                          rollout_logprobs=[-rng.random() for _ in range(t)], reward=1.0,
                          finish_reason="stop", weight_version="0"))
    return out, torch.tensor([rng.uniform(-1, 1) for _ in range(n)])


def _counts_from_routes(tr, mbs) -> torch.Tensor:
    """[num_layers, E] bincount of ``mb.routes`` [B, S, L, K] over the loss tokens."""
    from megatron_rl.moe.routing_replay import moe_layer_ids

    cfg = tr.config
    out = torch.zeros(cfg.num_layers, cfg.num_moe_experts, dtype=torch.float64)
    for mb in mbs:
        valid = mb.loss_mask > 0
        for o, layer in enumerate(moe_layer_ids(cfg)):
            out[layer] += torch.bincount(mb.routes[:, :, o][valid].reshape(-1).long(),
                                         minlength=cfg.num_moe_experts).double()
    return out


def _worker(rank: int, world: int, hf_dir: str) -> dict:
    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, load_hf_config, transformer_config_from_hf
    from megatron_rl.moe import GlobalLBL
    from megatron_rl.moe.balance import LoadBalance
    from megatron_rl.moe.routing_replay import enable_routing_replay
    from megatron_rl.moe.step_routing import MoERouting
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_rl.train.engine import OptimConfig, build_trainer
    from megatron_rl.train.grpo import logprobs_of
    from megatron_rl.train.rl_batch import microbatches

    init_parallel(ParallelConfig(), device="cpu", seed=7)
    hf = load_hf_config(hf_dir)
    cfg = enable_routing_replay(transformer_config_from_hf(hf, ModelOptions()))
    tr = build_trainer(hf, cfg, OptimConfig(lr=1e-4, warmup_steps=0, train_steps=10, use_distributed_optimizer=False))
    load_hf_weights(tr.model, hf_dir, hf)
    tr.optimizer.reload_model_params()
    calls = [0]
    tr.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    samples, adv = _samples(7, hf["vocab_size"], seed=3)
    res = {}
    for replay in ("off", "r2"):
        mbs = microbatches(samples, adv, 2, 18, 0)
        routing = MoERouting(tr.model, tr.config, replay=replay, balance=LoadBalance())
        with routing.old_logprob_pass(mbs) as route:
            for mb in mbs:
                mb.old_logprobs = logprobs_of(tr.model, mb, route(mb), "torch")
        g = torch.Generator().manual_seed(1)
        for mb in mbs:  # as IcePop would: drop some loss tokens after the forward
            mb.loss_mask = mb.loss_mask * (torch.rand(mb.loss_mask.shape, generator=g) > 0.3)
        kw = routing._recorded_counts(mbs, 0)
        ref = GlobalLBL(alpha=0.0)
        ref_metrics = ref.collect_counts(tr, mbs)  # its own forward: free routing, same weights
        n0 = calls[0]
        with routing.train_pass(tr, mbs, 0, lambda it, m: None, grad_divisor=1.0) as p:
            pass_metrics = dict(p.metrics)
        res[replay] = {"counts": kw["local_counts"], "mb_counts": kw["mb_counts"], "ref": ref.counts,
                       "ref_mb": ref.mb_counts, "metrics": pass_metrics, "ref_metrics": ref_metrics,
                       "forwards_in_prepare": calls[0] - n0,
                       "from_routes": _counts_from_routes(tr, mbs) if replay == "r2" else None,
                       "valid": sum(float(mb.loss_mask.sum()) for mb in mbs)}
    lbl_on = MoERouting(tr.model, tr.config, balance=LoadBalance(mode="global", alpha=0.01))
    with lbl_on.old_logprob_pass(mbs) as route:
        for mb in mbs:
            mb.old_logprobs = logprobs_of(tr.model, mb, route(mb), "torch")
    res["lbl_on_later_minibatch"] = lbl_on._recorded_counts(mbs, 1)  # weights moved: recount
    res["lbl_on_first_minibatch"] = sorted(lbl_on._recorded_counts(mbs, 0))
    destroy_parallel()
    return res


def test_old_pass_counts_equal_a_counting_forward(tiny_hf_dir):
    (res,) = run_distributed(_worker, 1, tiny_hf_dir)
    for replay in ("off", "r2"):
        r = res[replay]
        print(replay, "valid tokens", r["valid"], "counted", float(r["counts"].sum()))
        assert torch.equal(r["counts"], r["ref"]), replay  # exact: integer counts
        assert torch.equal(r["mb_counts"], r["ref_mb"]), replay
        assert float(r["counts"].sum()) == r["valid"] * 2 * 4 > 0  # top-2, 4 MoE layers, final mask
        assert r["metrics"] == r["ref_metrics"] and "moe/max_violation" in r["metrics"]
        assert r["forwards_in_prepare"] == 0  # no extra counting forward
    assert torch.equal(res["r2"]["counts"], res["r2"]["from_routes"])  # the routes R2 replays
    assert res["lbl_on_later_minibatch"] == {}
    assert res["lbl_on_first_minibatch"] == ["local_counts", "mb_counts"]
