"""megatron_rl.losses against independent float64 references written as numpy / Python loops.

Batches have uneven lengths, fully masked rows, NaN in masked positions, groups of size 1 and
zero-variance groups. Gradients are checked against hand-derived formulas; micro-batch sums with
the global normaliser must equal the full-batch loss for every aggregation mode.
"""

import math

import numpy as np
import pytest
import torch

from megatron_rl.losses import (AGG_MODES, PolicyLossSettings, entropy_from_logits, entropy_loss,
                                gae_advantages, grpo_advantages, kl_estimate, kl_loss,
                                kl_penalty_rewards, mismatch_correction, policy_loss,
                                reinforce_pp_advantages, rl_loss, rloo_advantages, sft_loss,
                                to_tokens)

B, T, TMAX = 8, 10, 16


def batch(seed=0, spread=0.4):
    g = np.random.default_rng(seed)
    lens = g.integers(1, T + 1, size=B)
    lens[2] = 0  # a fully masked row
    mask = np.arange(T)[None, :] < lens[:, None]
    mask[5, 1] = False  # a hole inside a row (e.g. a tool output)
    old = -g.uniform(0.1, 3.0, size=(B, T))
    logp = old + g.normal(0, spread, size=(B, T))
    adv = g.normal(size=(B, T))
    logp[~mask] = np.nan  # masked positions must never leak
    return logp, old, adv, mask


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def ref_weights(mask, mode, n_tok, n_seq):
    """Aggregation weight of each (b, t) in the global loss, by loops."""
    w = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        nb = mask[b].sum()
        for j in range(mask.shape[1]):
            if mask[b, j]:
                w[b, j] = {"token-mean": 1 / n_tok, "seq-mean-token-mean": 1 / (nb * n_seq),
                           "seq-mean-token-sum-norm": 1 / (n_seq * TMAX)}[mode]
    return w


def ref_ppo(logp, old, adv, mask, lo, hi, c, seq):
    """Per-token surrogate loss and d(loss)/d(logp) for the un-aggregated sum, by loops."""
    loss, dl = np.zeros(mask.shape), np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        idx = [j for j in range(mask.shape[1]) if mask[b, j]]
        s_b = math.exp(sum(logp[b, j] - old[b, j] for j in idx) / len(idx)) if idx else 1.0
        for j in idx:
            r = s_b if seq else math.exp(logp[b, j] - old[b, j])
            a = adv[b, j]
            unclipped, clipped = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
            val, grad = (unclipped, -a * r) if unclipped >= clipped else (clipped, 0.0)
            if c is not None and a < 0 and -a * c < val:
                val, grad = -a * c, 0.0
            loss[b, j], dl[b, j] = val, grad
    return loss, dl


def normalisers(mask):
    return int(mask.sum()), int((mask.sum(1) > 0).sum())


CASES = [(0.2, 0.2, None, False), (0.2, 0.28, None, False), (0.1, 0.3, 1.5, False),
         (0.2, 0.28, None, True), (0.05, 0.05, 1.2, True)]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("lo,hi,c,seq", CASES)
def test_policy_loss_value_and_grad(mode, lo, hi, c, seq):
    logp, old, adv, mask = batch(seed=1)
    if seq:  # GSPO: one advantage per sequence; row 0 dragged outside the clip range
        adv = np.repeat(adv[:, :1], T, axis=1)
        logp[0] += 0.5
    ref_tok, ref_dl = ref_ppo(logp, old, adv, mask, lo, hi, c, seq)
    n_tok, n_seq = normalisers(mask)
    w = ref_weights(mask, mode, n_tok, n_seq)
    x = t(logp).requires_grad_(True)
    loss, m = policy_loss(x, t(old), t(adv), torch.tensor(mask), eps_low=lo, eps_high=hi,
                          dual_clip_c=c, ratio_level="sequence" if seq else "token", agg=mode,
                          max_response_len=TMAX)
    loss.backward()
    assert loss.item() == pytest.approx((w * ref_tok).sum(), rel=1e-10, abs=1e-12)
    if seq:  # hand-derived GSPO gradient: row-b tokens share w_b * (-A_b s_b) / n_b each
        exp_grad = np.zeros(mask.shape)
        for b in range(B):
            nb = mask[b].sum()
            for j in range(T):
                if mask[b, j]:
                    row = [w[b, k] * ref_dl[b, k] for k in range(T) if mask[b, k]]
                    exp_grad[b, j] = sum(row) / nb
    else:
        exp_grad = w * ref_dl
    np.testing.assert_allclose(x.grad.numpy(), exp_grad, rtol=1e-9, atol=1e-12)
    assert 0 <= m["clip_frac_low"] <= 1 and 0 <= m["clip_frac_high"] <= 1


def test_clip_branches_all_exercised():
    """Hand-built tokens hit each branch: inside, low clip, high clip, dual clip."""
    old = torch.zeros(1, 5, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.0, 0.5, 1.5, 3.0, 1.1]], dtype=torch.float64))
    adv = torch.tensor([[1.0, -2.0, 1.0, -1.0, 1.0]], dtype=torch.float64)
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, torch.ones(1, 5, dtype=torch.bool), eps_low=0.2,
                          eps_high=0.28, dual_clip_c=2.0)
    loss.backward()
    # per token: -A r (grad -A r) | clipped 2*0.8 | clipped -1.28 | dual 2.0 | -1.1 (grad -1.1)
    assert loss.item() == pytest.approx((-1.0 + 1.6 - 1.28 + 2.0 - 1.1) / 5)
    np.testing.assert_allclose(x.grad.numpy(), [[-0.2, 0, 0, 0, -1.1 / 5]], atol=1e-12)
    assert m["clip_frac_low"].item() == pytest.approx(0.2)
    assert m["clip_frac_high"].item() == pytest.approx(0.2)
    assert m["dual_clip_frac"].item() == pytest.approx(0.2)


def test_denominator_current_is_reinforce():
    """pi_ref = pi_theta: loss value -mean(A), gradient -A / N (grad log pi), no clipping."""
    logp, _, adv, mask = batch(seed=2, spread=2.0)
    x = t(logp).requires_grad_(True)
    loss, m = policy_loss(x, None, t(adv), torch.tensor(mask), denominator="current")
    loss.backward()
    n = mask.sum()
    assert loss.item() == pytest.approx(-adv[mask].sum() / n)
    np.testing.assert_allclose(x.grad.numpy(), np.where(mask, -adv / n, 0.0), atol=1e-12)
    assert m["clip_frac_low"] == 0 and m["clip_frac_high"] == 0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batch_additivity(mode):
    logp, old, adv, mask = batch(seed=3)
    is_w = np.random.default_rng(3).uniform(0.5, 1.5, size=(B, T))
    n_tok, n_seq = normalisers(mask)
    kw = dict(agg=mode, max_response_len=TMAX, global_num_tokens=n_tok, global_num_seqs=n_seq)
    full, _ = policy_loss(t(logp), t(old), t(adv), torch.tensor(mask), is_weights=t(is_w), **kw)
    total, total_kl, widths = 0.0, 0.0, []
    for a, b in [(0, 1), (1, 4), (4, 8)]:  # uneven micro-batches, each padded to its own width
        width = max(int(np.nonzero(mask[a:b].any(0))[0].max()) + 1 if mask[a:b].any() else 1, 1)
        cut = lambda z: t(z[a:b, :width])  # noqa: E731
        sub_mask = torch.tensor(mask[a:b, :width])
        total += policy_loss(cut(logp), cut(old), cut(adv), sub_mask, is_weights=cut(is_w),
                             **kw)[0].item()
        total_kl += kl_loss(cut(logp), cut(old), sub_mask, coef=0.5, **kw)[0].item()
        widths.append(width)
    assert len(set(widths)) > 1
    full_kl, _ = kl_loss(t(logp), t(old), torch.tensor(mask), coef=0.5, **kw)
    assert total == pytest.approx(full.item(), rel=1e-12)
    assert total_kl == pytest.approx(full_kl.item(), rel=1e-12)


def test_sft_additivity_and_value():
    logp, _, _, mask = batch(seed=4)
    n_tok = int(mask.sum())
    full, m = sft_loss(t(logp), torch.tensor(mask))
    assert full.item() == pytest.approx(-np.nansum(np.where(mask, logp, 0)) / n_tok)
    parts = sum(sft_loss(t(logp[a:b]), torch.tensor(mask[a:b]), global_num_tokens=n_tok)[0].item()
                for a, b in [(0, 3), (3, 4), (4, 8)])
    assert parts == pytest.approx(full.item(), rel=1e-12)
    assert m["sft_nll"].item() == pytest.approx(full.item())


# ---- advantages ---------------------------------------------------------------------------

def groups():
    """Unsorted labels: a size-1 group (7), a zero-variance group (3), ordinary groups."""
    ids = np.array([5, 3, 5, 7, 3, 9, 5, 9, 3, 9, 5])
    r = np.array([1.0, 0.5, 0.0, 2.0, 0.5, 1.0, 1.0, 0.0, 0.5, 3.0, 0.0])
    return ids, r


@pytest.mark.parametrize("norm", [True, False])
def test_grpo(norm):
    ids, r = groups()
    exp = np.zeros_like(r)
    for i in range(len(r)):
        mates = [r[j] for j in range(len(r)) if ids[j] == ids[i]]
        if len(mates) > 1:
            mu = sum(mates) / len(mates)
            sd = math.sqrt(sum((x - mu) ** 2 for x in mates) / (len(mates) - 1))
            exp[i] = (r[i] - mu) / (sd + 1e-6) if norm else r[i] - mu
    got, m = grpo_advantages(t(r), torch.tensor(ids), normalize_std=norm)
    np.testing.assert_allclose(got.numpy(), exp, atol=1e-12)
    assert got[3] == 0 and (got[[1, 4, 8]] == 0).all()  # size-1 and zero-variance groups
    assert m["zero_std_frac"].item() == pytest.approx(3 / 11)
    grid = t(np.array([[1.0, 0.0, 1.0], [2.0, 2.0, 2.0]]))  # [G, n] input form
    g2, _ = grpo_advantages(grid, normalize_std=norm)
    f2, _ = grpo_advantages(grid.reshape(-1), torch.tensor([0, 0, 0, 1, 1, 1]), normalize_std=norm)
    np.testing.assert_allclose(g2.reshape(-1).numpy(), f2.numpy())


def test_rloo():
    ids, r = groups()
    exp = np.zeros_like(r)
    for i in range(len(r)):
        others = [r[j] for j in range(len(r)) if ids[j] == ids[i] and j != i]
        exp[i] = r[i] - sum(others) / len(others) if others else 0.0
    got, _ = rloo_advantages(t(r), torch.tensor(ids))
    np.testing.assert_allclose(got.numpy(), exp, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_reinforce_pp(weighted):
    ids, r = groups()
    base = np.array([r[i] - np.mean(r[ids == ids[i]]) for i in range(len(r))])
    w = np.arange(1, len(r) + 1, dtype=float) if weighted else np.ones(len(r))
    flat = np.repeat(base, w.astype(int))  # token-weighting == repeating each response n_i times
    exp = (base - flat.mean()) / (flat.std() + 1e-6)
    got, _ = reinforce_pp_advantages(t(r), torch.tensor(ids),
                                     token_counts=t(w) if weighted else None)
    np.testing.assert_allclose(got.numpy(), exp, atol=1e-10)


def test_to_tokens():
    _, _, _, mask = batch(seed=5)
    a = t(np.arange(B, dtype=float))
    np.testing.assert_array_equal(to_tokens(a, torch.tensor(mask)).numpy(),
                                  np.where(mask, np.arange(B)[:, None], 0.0))


def test_gae():
    g = np.random.default_rng(6)
    _, _, _, mask = batch(seed=6)
    rew, val = g.normal(size=(B, T)), g.normal(size=(B, T))
    gamma, lam = 0.9, 0.8
    exp_a, exp_r = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):  # textbook recursion on the compacted valid tokens
        idx = [j for j in range(T) if mask[b, j]]
        rs, vs = [rew[b, j] for j in idx], [val[b, j] for j in idx] + [0.0]
        adv = [0.0] * (len(idx) + 1)
        for k in reversed(range(len(idx))):
            adv[k] = rs[k] + gamma * vs[k + 1] - vs[k] + gamma * lam * adv[k + 1]
        for k, j in enumerate(idx):
            exp_a[b, j], exp_r[b, j] = adv[k], adv[k] + vs[k]
    a, ret, _ = gae_advantages(t(rew), t(val), torch.tensor(mask), gamma=gamma, lam=lam)
    np.testing.assert_allclose(a.numpy(), exp_a, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), exp_r, atol=1e-12)


# ---- KL, entropy, mismatch, HPT -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators(kind):
    logp, ref, _, mask = batch(seed=7)
    p, q = np.exp(logp), np.exp(ref)  # samples from p; estimate KL(p || q)
    exp = {"k1": np.log(p / q), "k2": 0.5 * np.log(q / p) ** 2,
           "k3": q / p - 1 - np.log(q / p)}[kind]
    got = kl_estimate(t(logp), t(ref), kind)
    np.testing.assert_allclose(got.numpy()[mask], exp[mask], rtol=1e-10)
    loss, m = kl_loss(t(logp), t(ref), torch.tensor(mask), coef=0.1, kind=kind)
    assert loss.item() == pytest.approx(0.1 * exp[mask].mean())
    off, _ = kl_loss(t(logp), t(ref), torch.tensor(mask))  # off by default
    assert off.item() == 0.0


def test_kl_penalty_rewards():
    logp, ref, _, mask = batch(seed=8)
    scores = np.arange(B, dtype=float) + 1
    exp = np.zeros((B, T))
    for b in range(B):
        idx = [j for j in range(T) if mask[b, j]]
        for j in idx:
            exp[b, j] = -0.05 * (logp[b, j] - ref[b, j])
        if idx:
            exp[b, idx[-1]] += scores[b]
    got, _ = kl_penalty_rewards(t(scores), t(logp), t(ref), torch.tensor(mask), coef=0.05)
    np.testing.assert_allclose(got.numpy(), exp, atol=1e-12)


def test_entropy():
    g = np.random.default_rng(9)
    logits = g.normal(size=(B, T, 6)) * 3
    pr = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    exp = -(pr * np.log(pr)).sum(-1)
    np.testing.assert_allclose(entropy_from_logits(t(logits)).numpy(), exp, rtol=1e-10)
    _, _, _, mask = batch(seed=9)
    loss, _ = entropy_loss(torch.tensor(mask), logits=t(logits), coef=0.01)
    assert loss.item() == pytest.approx(-0.01 * exp[mask].mean())
    with pytest.raises(ValueError):
        entropy_loss(torch.tensor(mask))


def test_mismatch():
    old, roll, _, mask = batch(seed=10, spread=0.5)
    old = np.where(mask, old, 0.0)
    a, b, lo, hi, cap = 0.5, 2.0, 0.8, 1.25, 1.5
    w_exp, keep = np.zeros((B, T)), mask.copy()
    for i in range(B):
        idx = [j for j in range(T) if mask[i, j]]
        geo = math.exp(sum(old[i, j] - roll[i, j] for j in idx) / len(idx)) if idx else 1.0
        for j in range(T):
            rho = math.exp(old[i, j] - roll[i, j])
            w_exp[i, j] = min(rho, cap)
            if mask[i, j] and not (a <= rho <= b and lo <= geo <= hi):
                keep[i, j] = False
    w, k, m = mismatch_correction(t(old), t(roll), torch.tensor(mask), tis_cap=cap,
                                  icepop_bounds=(a, b), seq_bounds=(lo, hi))
    np.testing.assert_allclose(w.numpy()[mask], w_exp[mask], rtol=1e-12)
    np.testing.assert_array_equal(k.numpy(), keep)
    d = (old - roll)[mask]
    assert m["mismatch/abs_logp_diff"].item() == pytest.approx(np.abs(d).mean())
    assert m["mismatch/k3_kl"].item() == pytest.approx((np.exp(d) - 1 - d).mean())
    assert m["mismatch/masked_frac"].item() == pytest.approx(1 - keep.sum() / mask.sum())
    assert 0 < m["mismatch/masked_frac"] < 1
    w0, k0, _ = mismatch_correction(t(old), t(roll), torch.tensor(mask))  # off by default
    assert w0 is None and torch.equal(k0, torch.tensor(mask))


def test_rl_loss_hpt_entropy_kl():
    """The trained loss (``rl_loss``) with HPT rows, the entropy bonus and the KL term, against a
    loop over tokens: SFT NLL on the demonstrations of unsolved prompts, PPO on the rollouts of
    the others, ``- c_H H + c_KL k3`` on the RL tokens, all over one token count."""
    logp, old, adv, mask = batch(seed=11, spread=0.1)
    g = np.random.default_rng(12)
    ent, ref = g.uniform(0.5, 2.0, size=(B, T)), old + g.normal(0, 0.2, size=(B, T))
    gid = np.array([0, 0, 0, 1, 1, 1, 2, 2])  # prompt of each row; row 0, 3, 6: its demonstration
    demo = np.array([True, False, False, True, False, False, True, False])
    use_sft = np.isin(gid, [0, 2])  # HPT, gamma 0: prompts 0 and 2 have no solved rollout
    sft_rows, rl_rows = demo & use_sft, ~demo & ~use_sft
    loss_mask = mask & (sft_rows | rl_rows)[:, None]
    sft_mask = mask & sft_rows[:, None]
    n = int(loss_mask.sum())
    st = PolicyLossSettings(eps_low=0.2, eps_high=0.2, agg="token-mean", max_response_len=TMAX,
                            entropy_coef=0.01, kl_coef=0.1, kl_kind="k3")
    loss, m = rl_loss(t(logp), torch.tensor(loss_mask), t(adv), t(old), st, global_num_tokens=n,
                      global_num_seqs=None, sft_mask=torch.tensor(sft_mask), entropy=t(ent),
                      ref_logprobs=t(ref))
    tok, _ = ref_ppo(logp, old, adv, loss_mask & ~sft_mask, 0.2, 0.2, None, False)
    total, n_rl, kl_sum = 0.0, 0, 0.0
    for b in range(B):
        for j in range(T):
            if sft_mask[b, j]:
                total += -logp[b, j]
            elif loss_mask[b, j]:
                lr = ref[b, j] - logp[b, j]
                k3 = math.exp(lr) - 1 - lr
                total += tok[b, j] - 0.01 * ent[b, j] + 0.1 * k3
                n_rl, kl_sum = n_rl + 1, kl_sum + k3
    assert loss.item() == pytest.approx(total / n, rel=1e-10)
    assert m["tokens"] == n_rl and m["sft_tokens"] == sft_mask.sum() > 0 and m["all_tokens"] == n
    assert m["entropy_sum"] == pytest.approx(ent[loss_mask].sum(), rel=1e-12)
    assert m["kl_sum"] == pytest.approx(kl_sum, rel=1e-10)
    ratio = np.exp(logp - old)[loss_mask & ~sft_mask]
    assert m["ratio_dev_max"] == pytest.approx(max(ratio.max() - 1, 1 - ratio.min()), rel=1e-10)
