"""The training loop on the fused ops vs the torch path (Megatron CE + losses/): one GRPO
micro-batch step's loss, gradient norm and gradients, and compute_logprobs, at TP = 1, TP = 2 with
sequence parallelism, PP = 2 and EP = 2 (DP = 2).

The torch path (``--loss-impl torch``) is the independent reference: Megatron's
``vocab_parallel_cross_entropy`` + ``losses.kl.vocab_parallel_entropy`` + ``losses.policy``.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl import ops
from megatron_rl.testing import run_distributed

pytestmark = pytest.mark.skipif(not ops.has_cpu_op(), reason="megatron_rl._C not built")


def _build(hf_dir: str, layout: dict):
    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, load_hf_config, transformer_config_from_hf
    from megatron_rl.parallel import ParallelConfig, init_parallel
    from megatron_rl.train.engine import OptimConfig, build_trainer

    pc = ParallelConfig(tp=layout.get("tp", 1), pp=layout.get("pp", 1), ep=layout.get("ep", 1),
                        sequence_parallel=layout.get("tp", 1) > 1)
    init_parallel(pc, device="cpu", seed=7)
    hf = load_hf_config(hf_dir)
    cfg = transformer_config_from_hf(hf, ModelOptions(sequence_parallel=pc.sequence_parallel),
                                     tp=pc.tp, pp=pc.pp, ep=pc.ep, etp=pc.etp)
    tr = build_trainer(hf, cfg, OptimConfig(lr=1e-3, warmup_steps=0, train_steps=10,
                                            decay_style="constant", clip_grad=0.0))
    load_hf_weights(tr.model, hf_dir, hf)
    tr.optimizer.reload_model_params()
    return tr, hf


def _worker(rank: int, world: int, hf_dir: str, layout: dict) -> dict:
    from megatron.core import parallel_state as ps
    from test_rl_batch import _fwd_bwd, _samples

    from megatron_rl.parallel import destroy_parallel
    from megatron_rl.train.logprobs import compute_logprobs
    from megatron_rl.train.rl_batch import PolicyLossSettings, collate, pack_microbatches

    tr, hf = _build(hf_dir, layout)
    samples, adv = _samples(7, hf["vocab_size"], seed=21)
    lens = [len(s.prompt_ids) + len(s.output_ids) for s in samples]
    padded = collate(samples, adv, max(lens), pad_id=0)
    packed = pack_microbatches(samples, adv, max(lens) + 6, pad_id=0, rows=2)
    res = {"last_stage": ps.is_pipeline_last_stage()}
    for name, mbs in (("padded", [padded]), ("packed", packed)):
        g = torch.Generator().manual_seed(3)
        dev = 0.0
        for mb in mbs:
            kw = dict(attention_mask=mb.attention_mask, position_ids=mb.position_ids)
            lp_t = compute_logprobs(tr, mb.tokens, loss_impl="torch", **kw)
            lp_f = compute_logprobs(tr, mb.tokens, loss_impl="fused", **kw)
            m = mb.loss_mask[:, :-1].bool()
            dev = max(dev, float((lp_t - lp_f)[m].abs().max()))
            old = torch.zeros_like(mb.loss_mask)
            old[:, :-1] = lp_t
            mb.old_logprobs = old + 0.3 * torch.randn(old.shape, generator=g)
            mb.is_weights = 0.5 + torch.rand(old.shape, generator=g)
            mb.ref_logprobs = old + 0.2 * torch.randn(old.shape, generator=g)
        res[f"{name}_logprob_dev"] = dev
        base = dict(eps_low=0.2, eps_high=0.28, max_response_len=16, entropy_coef=0.01, kl_coef=0.05)
        for agg in ("token-mean", "seq-mean-token-mean"):
            out = {}
            for impl in ("torch", "fused"):
                st = PolicyLossSettings(agg=agg, loss_impl=impl, **base)
                loss, grads, red, _ = _fwd_bwd(tr, mbs, st)
                norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in grads.values()))
                out[impl] = (loss, norm, grads, red)
            (lt, nt, gt, rt), (lf, nf, gf, rf) = out["torch"], out["fused"]
            res[f"{name}/{agg}"] = {
                "loss": (lt, lf), "gnorm": (nt, nf),
                "gmax": max(float((gt[k] - gf[k]).abs().max()) for k in gt),
                "clip": (rt["train/clip_frac"], rf["train/clip_frac"]),
                "ent": (rt["train/entropy"], rf["train/entropy"]), "kl": (rt["train/kl"], rf["train/kl"])}
    destroy_parallel()
    return res


LAYOUTS = {"tp1": {}, "tp2_sp": {"tp": 2}, "pp2": {"pp": 2}, "ep2": {"ep": 2}}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_grpo_step_fused_equals_torch_path(tiny_hf_dir, name):
    layout = LAYOUTS[name]
    world = max(layout.get("tp", 1) * layout.get("pp", 1), layout.get("ep", 1))
    for res in run_distributed(_worker, world, tiny_hf_dir, layout):
        print(res)
        for layout in ("padded", "packed"):
            assert res[f"{layout}_logprob_dev"] < 1e-5, res
            for agg in ("token-mean", "seq-mean-token-mean"):
                r = res[f"{layout}/{agg}"]
                assert abs(r["loss"][0] - r["loss"][1]) < 1e-6, r
                assert r["loss"][0] != 0 or not res["last_stage"], r  # the loss lives on the last stage
                assert abs(r["gnorm"][0] - r["gnorm"][1]) < 1e-6 and r["gnorm"][0] > 1e-3, r
                assert r["gmax"] < 1e-6, r
                assert abs(r["clip"][0] - r["clip"][1]) < 1e-6 and r["clip"][0] > 0, r
                assert abs(r["ent"][0] - r["ent"][1]) < 1e-6 and abs(r["kl"][0] - r["kl"][1]) < 1e-6, r
