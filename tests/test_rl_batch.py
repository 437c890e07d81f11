"""RL training batches: sequence packing, entropy, KL-to-reference and HPT rows in the policy step.

References are independent: the padded layout (for packing), float64 softmax / autograd (entropy),
float64 formulas of the KL estimator and the SFT NLL (KL, HPT). Model tests share one launch per
world size on the tiny Qwen3-MoE.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_rl.losses.kl import vocab_parallel_entropy
from megatron_rl.testing import run_distributed
from megatron_rl.train.rl_batch import MicroBatch, Sample, collate, local_counts, pack_microbatches


def _samples(n: int, vocab: int, seed: int, demo: tuple[int, ...] = ()) -> tuple[list[Sample], torch.Tensor]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, t = rng.randint(2, 7), rng.randint(1, 9)
        out.append(Sample(prompt_ids=[rng.randrange(1, vocab) for _ in range(p)],
                          output_ids=[rng.randrange(1, vocab) for _ in range(t)],
                          rollout_logprobs=[-rng.random() for _ in range(t)],
                          reward=float("nan") if i == 3 else float(rng.random() < 0.5),
                          finish_reason="stop", weight_version="0", is_demo=i in demo, group=i // 2))
    adv = torch.tensor([rng.uniform(-1, 1) for _ in range(n)])
    return out, adv


def _to_packed(mb_padded: MicroBatch, packed: MicroBatch, key: str) -> torch.Tensor:
    """Move a per-token [N, S] tensor of the padded layout (row = input index) into ``packed``."""
    out = torch.zeros_like(packed.loss_mask)
    for i, r, off, n in packed.sample_index:
        out[r, off: off + n] = getattr(mb_padded, key)[i, :n]
    return out


# ---------------------------------------------------------------- pure tests (no model)

def test_pack_layout_label_frame_and_counts():
    samples, adv = _samples(7, 50, seed=1)
    lens = [len(s.prompt_ids) + len(s.output_ids) for s in samples]
    cap = max(lens) + 4
    padded = collate(samples, adv, max(lens), pad_id=0)
    mbs = pack_microbatches(samples, adv, cap, pad_id=0, rows=2)
    seen = sorted(i for mb in mbs for i, *_ in mb.sample_index)
    assert seen == list(range(7))
    assert all(mb.tokens.shape == (2, cap) for mb in mbs)
    for mb in mbs:
        for j, (i, r, off, n) in enumerate(mb.sample_index):
            assert mb.tokens[r, off: off + n].tolist() == samples[i].prompt_ids + samples[i].output_ids
            assert mb.position_ids[r, off: off + n].tolist() == list(range(n))
            assert (mb.seq_ids[r, off: off + n] == j).all()
            for key in ("loss_mask", "advantages", "rollout_logprobs"):
                assert torch.equal(getattr(mb, key)[r, off: off + n], getattr(padded, key)[i, :n]), key
            assert mb.loss_mask[r, off + n - 1] == 0  # predicts the next sample's first token
            # block-diagonal causal: no attention outside the sample
            att = ~mb.attention_mask[r, 0, off: off + n]
            assert att[:, :off].sum() == 0 and att[:, off + n:].sum() == 0
            assert torch.equal(att[:, off: off + n], torch.tril(torch.ones(n, n, dtype=torch.bool)))
    tok = sum(local_counts(mb)[0] for mb in mbs)
    seqs = sum(local_counts(mb)[1] for mb in mbs)
    assert tok == int(padded.loss_mask.sum())
    assert seqs == int((padded.loss_mask.sum(-1) > 0).sum()) == 6  # sample 3: NaN reward
    with pytest.raises(ValueError, match="length"):
        pack_microbatches(samples, adv, max(lens) - 1, pad_id=0)


def test_demo_rows_sft_mask():
    samples, adv = _samples(4, 50, seed=2, demo=(1,))
    mb = collate(samples, adv, 20, pad_id=0)
    assert torch.equal(mb.sft_mask[1], mb.loss_mask[1]) and mb.sft_mask[1].sum() > 0
    assert mb.sft_mask[[0, 2, 3]].sum() == 0 and mb.rollout_logprobs[1].sum() == 0
    assert collate(samples[2:], adv[2:], 20, pad_id=0).sft_mask is None


def test_routes_field_padded_and_packed():
    """``routes`` [B, S, L, K]: each sample's engine routes at its tokens (the last token has none),
    the filler 0..K-1 elsewhere, demonstrations (no routes) included; checked position by position."""
    samples, adv = _samples(5, 50, seed=4, demo=(2,))
    g = torch.Generator().manual_seed(0)
    for s in samples:
        if not s.is_demo:
            s.routed_experts = torch.randint(0, 8, (len(s.prompt_ids) + len(s.output_ids) - 1, 3, 2), generator=g)
    lens = [len(s.prompt_ids) + len(s.output_ids) for s in samples]
    filler = torch.arange(2)
    padded = collate(samples, adv, max(lens), pad_id=0, route_layout=(3, 2))
    packed = pack_microbatches(samples, adv, max(lens) + 6, pad_id=0, rows=2, route_layout=(3, 2))
    places = [(padded, i, i, 0, n) for i, n in enumerate(lens)]
    places += [(mb, i, r, off, n) for mb in packed for i, r, off, n in mb.sample_index]
    for mb, i, r, off, n in places:
        assert mb.routes.shape == (*mb.shape, 3, 2)
        for t in range(n):
            want = samples[i].routed_experts[t] if samples[i].routed_experts is not None and t < n - 1 else filler
            assert torch.equal(mb.routes[r, off + t].long(), want.expand(3, 2).long()), (i, t)
    assert collate(samples, adv, max(lens), pad_id=0).routes is None  # no layout: no routes
    copy = packed[0].masked_copy()
    assert copy.loss_mask.sum() == 0 and torch.equal(copy.routes.long(), filler.expand_as(copy.routes).long())


def _entropy64(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1)


def test_vocab_parallel_entropy_value_and_grad_single_rank():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 3).requires_grad_()
    masked = logits.masked_fill(torch.arange(11) >= 9, torch.finfo(torch.float32).min)  # padded vocab
    w = torch.rand(3, 5, generator=g)
    h = vocab_parallel_entropy(masked)
    (h * w).sum().backward()
    x64 = logits.detach().double().requires_grad_()
    h64 = _entropy64(x64[..., :9])
    (h64 * w.double()).sum().backward()
    torch.testing.assert_close(h.double(), h64, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.grad.double(), x64.grad, atol=1e-5, rtol=0)
    assert logits.grad[..., 9:].abs().max() == 0


def _tp_entropy_worker(rank: int, world: int) -> dict:
    """Function-level TP2: each rank holds half the vocab; value and shard gradient vs float64."""
    torch.distributed.init_process_group("gloo")
    g = torch.Generator().manual_seed(3)
    full = torch.randn(4, 6, 16, generator=g) * 2
    w = torch.rand(4, 6, generator=g)
    shard = full[..., rank * 8:(rank + 1) * 8].clone().requires_grad_()
    h = vocab_parallel_entropy(shard, torch.distributed.group.WORLD)
    (h * w).sum().backward()
    x64 = full.double().requires_grad_()
    (_entropy64(x64) * w.double()).sum().backward()
    torch.distributed.destroy_process_group()
    return {"h": (h.double() - _entropy64(full)).abs().max().item(),
            "g": (shard.grad.double() - x64.grad[..., rank * 8:(rank + 1) * 8]).abs().max().item()}


# ---------------------------------------------------------------- model tests (spawned ranks)

def _build(hf_dir: str, tp: int):
    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, load_hf_config, transformer_config_from_hf
    from megatron_rl.parallel import ParallelConfig, init_parallel
    from megatron_rl.train.engine import OptimConfig, build_trainer

    pc = ParallelConfig(tp=tp)
    init_parallel(pc, device="cpu", seed=7)
    hf = load_hf_config(hf_dir)
    cfg = transformer_config_from_hf(hf, ModelOptions(sequence_parallel=tp > 1), tp=pc.tp, pp=pc.pp, ep=pc.ep, etp=pc.etp)
    tr = build_trainer(hf, cfg, OptimConfig(lr=1e-3, warmup_steps=0, train_steps=10,
                                            decay_style="constant", clip_grad=0.0))
    load_hf_weights(tr.model, hf_dir, hf)
    tr.optimizer.reload_model_params()
    return tr, hf


def _fwd_bwd(tr, mbs, settings, forward_only=False):
    """Global loss (float) and {name: grad} of one forward/backward pass with the policy step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl.train.rl_batch import LossStats, policy_forward_step

    n_tok = sum(local_counts(mb)[0] for mb in mbs)
    n_seq = sum(local_counts(mb)[1] for mb in mbs)
    stats = LossStats()
    b, s = mbs[0].tokens.shape
    tr.model.zero_grad_buffer()
    out = get_forward_backward_func()(
        forward_step_func=policy_forward_step(settings, n_tok, n_seq, stats),
        data_iterator=iter(mbs), model=[tr.model], num_microbatches=len(mbs), seq_length=s,
        micro_batch_size=b, forward_only=forward_only)
    loss = sum(float(d["lm_loss"][0]) for d in out) / n_tok
    grads = {} if forward_only else {n: p.main_grad.detach().clone()
                                     for n, p in tr.model.module.named_parameters()}
    return loss, grads, stats.reduce(), n_tok


def _attach_old(tr, mbs, noise: float, seed: int):
    from megatron_rl.train.logprobs import compute_logprobs

    g = torch.Generator().manual_seed(seed)
    for mb in mbs:
        lp = torch.zeros_like(mb.loss_mask)
        lp[:, :-1] = compute_logprobs(tr, mb.tokens, attention_mask=mb.attention_mask,
                                      position_ids=mb.position_ids)
        mb.logprobs_now = lp
        mb.old_logprobs = lp + noise * torch.randn(lp.shape, generator=g)


def _single_worker(rank: int, world: int, hf_dir: str) -> dict:
    from megatron_rl.parallel import destroy_parallel
    from megatron_rl.train.rl_batch import PolicyLossSettings

    tr, hf = _build(hf_dir, tp=1)
    vocab = hf["vocab_size"]
    samples, adv = _samples(7, vocab, seed=5, demo=())
    lens = [len(s.prompt_ids) + len(s.output_ids) for s in samples]
    padded = collate(samples, adv, max(lens), pad_id=0)
    packed = pack_microbatches(samples, adv, max(lens) + 6, pad_id=0, rows=2)
    _attach_old(tr, [padded], noise=0.3, seed=0)
    for mb in packed:  # the same old logprobs per sample, moved into the packed layout
        _attach_old(tr, [mb], noise=0.0, seed=0)
        mb.old_logprobs = _to_packed(padded, mb, "old_logprobs")
    res = {"lp_dev": max(((_to_packed(padded, mb, "logprobs_now") - mb.logprobs_now)
                          * mb.loss_mask).abs().max().item() for mb in packed)}
    base = dict(eps_low=0.2, eps_high=0.28, max_response_len=16)
    for agg in ("token-mean", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        st = PolicyLossSettings(agg=agg, **base)
        lp_, gp, rp, _ = _fwd_bwd(tr, [padded], st)
        lk, gk, rk, _ = _fwd_bwd(tr, packed, st)
        res[agg] = {"loss": (lp_, lk), "grad": max((gp[k] - gk[k]).abs().max().item() for k in gp),
                    "gnorm": math.sqrt(sum(float(v.double().pow(2).sum()) for v in gp.values())),
                    "clip": (rp["train/clip_frac"], rk["train/clip_frac"]),
                    "ent": (rp["train/entropy"], rk["train/entropy"])}
    # logits path (entropy on) vs labels path: old = current -> ratio exactly 1 either way
    padded.old_logprobs = padded.logprobs_now
    for on in (True, False):
        st = PolicyLossSettings(agg="token-mean", entropy_metric=on, **base)
        res[f"ratio_dev_{on}"] = _fwd_bwd(tr, [padded], st, forward_only=True)[2]["ratio_max_abs_dev"]
    # float64 references from the full logits
    with torch.no_grad():
        logits = tr.model(padded.tokens, padded.position_ids, padded.attention_mask)
    logits = logits.double()[..., :vocab]
    mask = padded.loss_mask.bool()
    h64 = _entropy64(logits)
    res["ent_ref"] = float(h64[mask].mean())
    lp64 = torch.log_softmax(logits, -1).gather(-1, padded.labels[..., None]).squeeze(-1)
    res["lp64_dev"] = (lp64 - padded.logprobs_now.double())[mask].abs().max().item()
    # entropy bonus, KL, HPT: loss deltas vs float64 formulas
    n = float(mask.sum())
    st0 = PolicyLossSettings(agg="token-mean", **base)
    l0 = _fwd_bwd(tr, [padded], st0, forward_only=True)[0]
    l_ent = _fwd_bwd(tr, [padded], PolicyLossSettings(agg="token-mean", entropy_coef=0.05, **base),
                     forward_only=True)[0]
    res["ent_bonus"] = (l_ent - l0, -0.05 * float(h64[mask].sum()) / n)
    g = torch.Generator().manual_seed(9)
    padded.ref_logprobs = padded.logprobs_now + 0.2 * torch.randn(mask.shape, generator=g)
    l_kl, _, r_kl, _ = _fwd_bwd(tr, [padded], PolicyLossSettings(agg="token-mean", kl_coef=0.1,
                                                                 kl_kind="k3", **base), forward_only=True)
    log_r = padded.ref_logprobs.double() - lp64
    k3 = (torch.expm1(log_r) - log_r)[mask]
    res["kl"] = (l_kl - l0, 0.1 * float(k3.sum()) / n, r_kl["train/kl"], float(k3.mean()))
    padded.ref_logprobs = None
    res["hpt"] = _hpt(tr, vocab, base)
    destroy_parallel()
    return res


def _hpt(tr, vocab, base) -> dict:
    """Demo rows: SFT NLL; other rows: policy loss; one normaliser. Reference in float64."""
    from megatron_rl.losses.policy import policy_loss
    from megatron_rl.train.rl_batch import PolicyLossSettings

    samples, adv = _samples(6, vocab, seed=11, demo=(0, 4))
    mb = collate(samples, adv, 18, pad_id=0)
    _attach_old(tr, [mb], noise=0.3, seed=1)
    loss, _, red, n = _fwd_bwd(tr, [mb], PolicyLossSettings(agg="token-mean", **base), forward_only=True)
    lp = mb.logprobs_now.double()
    sft = mb.sft_mask.bool()
    rl = mb.loss_mask.bool() & ~sft
    ref_rl, _ = policy_loss(lp, mb.old_logprobs.double(), mb.advantages.double(), rl,
                            eps_low=0.2, eps_high=0.28, global_num_tokens=n)
    ref = float(ref_rl) + float(-lp[sft].sum()) / n
    return {"loss": (loss, ref), "frac": (red["train/sft_token_frac"], float(sft.sum()) / n)}


def _tp2_worker(rank: int, world: int, hf_dir: str) -> dict:
    """TP2 model: train/entropy vs a float64 softmax over the all-gathered logits."""
    from megatron.core import parallel_state as ps

    from megatron_rl.parallel import destroy_parallel
    from megatron_rl.train.rl_batch import PolicyLossSettings

    tr, hf = _build(hf_dir, tp=2)
    samples, adv = _samples(5, hf["vocab_size"], seed=6)
    mb = collate(samples, adv, 16, pad_id=0)
    _attach_old(tr, [mb], noise=0.1, seed=2)
    st = PolicyLossSettings(agg="token-mean", eps_low=0.2, eps_high=0.2, max_response_len=16)
    red = _fwd_bwd(tr, [mb], st, forward_only=True)[2]
    with torch.no_grad():
        local = tr.model(mb.tokens, mb.position_ids, mb.attention_mask)  # [B, S, V/2]
    parts = [torch.empty_like(local) for _ in range(2)]
    torch.distributed.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    logits = torch.cat(parts, -1).double()[..., :hf["vocab_size"]]
    ref = float(_entropy64(logits)[mb.loss_mask.bool()].mean())
    destroy_parallel()
    return {"ent": red["train/entropy"], "ref": ref}


def test_vocab_parallel_entropy_tp2():
    for r in run_distributed(_tp_entropy_worker, 2):
        assert r["h"] < 1e-5 and r["g"] < 1e-6, r


def test_packing_entropy_kl_hpt_single_rank(tiny_hf_dir):
    (res,) = run_distributed(_single_worker, 1, tiny_hf_dir)
    print(res)
    assert res["lp_dev"] < 1e-5
    for agg in ("token-mean", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        r = res[agg]
        assert abs(r["loss"][0] - r["loss"][1]) < 1e-5 and r["loss"][0] != 0, (agg, r)
        assert r["grad"] < 1e-5 and r["gnorm"] > 1e-3, (agg, r)
        assert abs(r["clip"][0] - r["clip"][1]) < 1e-6 and r["clip"][0] > 0, (agg, r)
        assert abs(r["ent"][0] - res["ent_ref"]) < 1e-5 and abs(r["ent"][1] - res["ent_ref"]) < 1e-5
    assert res["ratio_dev_True"] < 1e-6 and res["ratio_dev_False"] < 1e-6
    assert res["lp64_dev"] < 1e-5
    assert abs(res["ent_bonus"][0] - res["ent_bonus"][1]) < 1e-6 and res["ent_bonus"][1] != 0
    kl = res["kl"]
    assert abs(kl[0] - kl[1]) < 1e-6 and abs(kl[2] - kl[3]) < 1e-6 and kl[3] > 0
    assert abs(res["hpt"]["loss"][0] - res["hpt"]["loss"][1]) < 1e-5
    assert abs(res["hpt"]["frac"][0] - res["hpt"]["frac"][1]) < 1e-12 and 0 < res["hpt"]["frac"][1] < 1


def test_entropy_metric_tp2(tiny_hf_dir):
    for r in run_distributed(_tp2_worker, 2, tiny_hf_dir):
        assert abs(r["ent"] - r["ref"]) < 1e-5, r
